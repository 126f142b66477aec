"""Vocabulary alignment (tokenizer_source / tokenizer:) against the real mergekit 0.1.5: a base
with a 32000-token vocabulary and fine-tunes that add a pad token (32001), merged with
``union``, ``base``, a model's tokenizer and per-token sources, tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_ulp_close, load_dir, mmath, write_recipe

BASE_VOCAB = 32000


def _tokenizer(folder: Path, extra: list[str]) -> None:
    """A 32000-token word-level tokenizer (characters, then filler words), plus ``extra``
    special tokens appended as a fine-tune's ``add_special_tokens`` does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789 .,?!+-*/=#:\n":
        vocab[c] = len(vocab)
    while len(vocab) < BASE_VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    fast.save_pretrained(folder)


def _model(
    folder: Path, *, extra: list[str], seed: int, base: Path | None = None, tied: bool = False
) -> Path:
    """A tiny Llama whose embeddings cover its tokenizer; a fine-tune is the base plus noise,
    its new rows random."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if base is None:
        config = LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=BASE_VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.resize_token_embeddings(BASE_VOCAB + len(extra), mean_resizing=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            for emb in {model.get_input_embeddings(), model.get_output_embeddings()}:
                emb.weight[BASE_VOCAB:] = torch.randn(len(extra), 16, generator=gen) * 0.2
    model.save_pretrained(folder)
    _tokenizer(folder, extra)
    return folder


@pytest.fixture(scope="module")
def vz(tmp_path_factory) -> dict[str, Path]:
    """base (32000), pad (+[PAD]: 32001), plain (32000), think (+[PAD], <think>: 32002);
    tbase and tpad: the same with tied embeddings."""
    root = tmp_path_factory.mktemp("vocab")
    base = _model(root / "base", extra=[], seed=0)
    tbase = _model(root / "tbase", extra=[], seed=4, tied=True)
    return {
        "base": base,
        "pad": _model(root / "pad", extra=["[PAD]"], seed=1, base=base),
        "plain": _model(root / "plain", extra=[], seed=2, base=base),
        "think": _model(root / "think", extra=["[PAD]", "<think>"], seed=3, base=base),
        "tbase": tbase,
        "tpad": _model(root / "tpad", extra=["[PAD]"], seed=5, base=tbase),
    }


CASES = {
    # the seed experiment's shape: a math fine-tune that added a pad token, merged with union
    "union_task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {pad}
    parameters: {{weight: 0.7}}
  - model: {plain}
    parameters: {{weight: 0.5}}
tokenizer_source: union
dtype: float32
""",
    "tied_union": """
merge_method: task_arithmetic
base_model: {tbase}
models:
  - model: {tpad}
    parameters: {{weight: 0.8}}
tokenizer_source: union
dtype: float32
""",
    # embeddings from the first slice's inputs (base: [PAD] in none of them, zeros), lm_head
    # from the last slice's (pad: its own rows)
    "slices_union": """
merge_method: passthrough
slices:
  - sources:
      - model: {base}
        layer_range: [0, 1]
  - sources:
      - model: {pad}
        layer_range: [1, 2]
tokenizer_source: union
dtype: float32
""",
    "base_ties": """
merge_method: ties
base_model: {base}
models:
  - model: {pad}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {plain}
    parameters: {{weight: 0.5, density: 0.7}}
tokenizer_source: base
dtype: float32
""",
    # [PAD] is in pad and think but not the base: the mean of their rows; <think>: think's
    "union_average_and_donor": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {think}
    parameters: {{weight: 0.4}}
  - model: {pad}
    parameters: {{weight: 0.3}}
  - model: {plain}
    parameters: {{weight: 0.3}}
tokenizer_source: union
dtype: float32
""",
    # (linear, not slerp: slerp's whole-tensor dot product over these 512k-element
    # embeddings is summed in float64 by mmath, thread-count dependent float32 by mergekit)
    "model_tokenizer": """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.6}}
  - model: {pad}
    parameters: {{weight: 0.4}}
tokenizer_source: {pad}
dtype: float32
""",
    "tokens_section": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {think}
    parameters: {{weight: 0.6}}
  - model: {plain}
    parameters: {{weight: 0.6}}
tokenizer:
  source: union
  tokens:
    <think>:
      source: {{kind: zero}}
    "[PAD]":
      source: {think}
      force: true
    </s>:
      source: {{kind: model_token, model: {plain}, token: <s>}}
      force: true
    <extra>:
      source: {{kind: model_token, model: {think}, token_id: 7}}
  pad_to_multiple_of: 64
dtype: float32
""",
}


def _run_mergekit(text: str, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), options=MergeOptions(write_model_card=False, quiet=True))


@pytest.mark.mergekit
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_and_vocabulary_as_mergekit(tmp_path, vz, case):
    pytest.importorskip("mergekit")
    from transformers import AutoTokenizer

    text = CASES[case].format(**{k: str(v) for k, v in vz.items()})
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    ours, theirs = tmp_path / "mmath", tmp_path / "mergekit"
    res = mmath("merge", recipe, ours, "-q")
    assert res.exit_code == 0, res.output
    _run_mergekit(text, theirs)
    got, ref = load_dir(ours), load_dir(theirs)
    assert set(got) == set(ref)
    worst = 0.0
    for key in sorted(ref):
        assert got[key].shape == ref[key].shape, key
        worst = max(worst, assert_ulp_close(got[key], ref[key], ulps=1))
    assert AutoTokenizer.from_pretrained(ours).get_vocab() == (
        AutoTokenizer.from_pretrained(theirs).get_vocab()
    )
    ours_cfg = json.loads((ours / "config.json").read_text())
    theirs_cfg = json.loads((theirs / "config.json").read_text())
    rows = got["model.embed_tokens.weight"].shape[0]
    assert ours_cfg["vocab_size"] == theirs_cfg["vocab_size"] == rows
    print(f"{case}: max abs diff vs mergekit = {worst:.3g}")


def test_union_rows_come_from_where_mergekit_says(tmp_path, vz):
    """The rows themselves, against a reference computed here: [PAD] (absent from base and
    plain) takes the mean of think's and pad's rows in every input lacking it; <think> takes
    think's row everywhere (so every delta is zero); tokens every input has keep each
    input's own row."""
    from safetensors.torch import load_file

    text = CASES["union_average_and_donor"].format(**{k: str(v) for k, v in vz.items()})
    out = tmp_path / "out"
    assert mmath("merge", write_recipe(tmp_path / "r.yaml", text), out, "-q").exit_code == 0
    w = {k: load_file(vz[k] / "model.safetensors") for k in vz}
    name = "model.embed_tokens.weight"
    pad_row = (w["think"][name][BASE_VOCAB] + w["pad"][name][BASE_VOCAB]) / 2
    think_row = w["think"][name][BASE_VOCAB + 1]
    rows = {k: w[k][name] for k in ("base", "think", "pad", "plain")}
    weights = {"think": 0.4, "pad": 0.3, "plain": 0.3}

    def merged(own: dict, base_row):
        return base_row + sum(weights[k] * (own[k] - base_row) for k in weights)

    # output ids: 32000 = [PAD] (base and plain lack it), 32001 = <think> (only think has it)
    expect_pad = merged(
        {"think": rows["think"][BASE_VOCAB], "pad": rows["pad"][BASE_VOCAB], "plain": pad_row},
        pad_row,
    )
    expect_5 = merged({k: rows[k][5] for k in weights}, rows["base"][5])
    got = load_dir(out)[name]
    assert got.shape == (BASE_VOCAB + 2, 16)
    torch.testing.assert_close(got[BASE_VOCAB], expect_pad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[BASE_VOCAB + 1], think_row, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[5], expect_5, rtol=1e-6, atol=1e-6)


def test_merged_model_and_tokenizer_load_and_generate(tmp_path, vz):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = CASES["union_task_arithmetic"].format(**{k: str(v) for k, v in vz.items()})
    out = tmp_path / "out"
    assert mmath("merge", write_recipe(tmp_path / "r.yaml", text), out, "-q").exit_code == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == BASE_VOCAB + 1 and tok.convert_tokens_to_ids("[PAD]") == BASE_VOCAB
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok("1+1=", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert gen.shape[1] == ids.shape[1] + 4


def test_different_vocabularies_without_a_setting_are_refused(tmp_path, vz):
    text = CASES["union_task_arithmetic"].format(**{k: str(v) for k, v in vz.items()})
    text = text.replace("tokenizer_source: union\n", "")
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2
    msg = " ".join(res.output.split())
    expected = ("models[0]", "32001", "32000", "tokenizer_source: union", "tokenizer_source: base")
    for part in expected:
        assert part in msg, (part, msg)
    assert not (tmp_path / "out").exists()


def test_same_vocabulary_is_not_gathered(tmp_path, vz):
    """Inputs that already share the output vocabulary keep their tokenizer files verbatim
    and merge exactly as without the setting."""
    text = CASES["base_ties"].format(**{k: str(v) for k, v in vz.items()})
    text = text.replace(str(vz["pad"]), str(vz["plain"]))
    plain = text.replace("tokenizer_source: base\n", "")
    a, b = tmp_path / "a", tmp_path / "b"
    assert mmath("merge", write_recipe(tmp_path / "a.yaml", text), a, "-q").exit_code == 0
    assert mmath("merge", write_recipe(tmp_path / "b.yaml", plain), b, "-q").exit_code == 0
    got, ref = load_dir(a), load_dir(b)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    tok = "tokenizer.json"
    assert (a / tok).read_bytes() == (vz["base"] / tok).read_bytes()


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ("tokenizer_source: union\ntokenizer: {source: base}\n", "not both"),
        (
            "tokenizer:\n  tokens:\n    x: {source: {kind: model_token, model: M, token: a, "
            "token_id: 1}}\n",
            "exactly one of token_id and token",
        ),
        ("tokenizer:\n  pad_to_multiple_of: 0\n", "tokenizer.pad_to_multiple_of"),
        (
            "tokenizer:\n  tokens:\n    x: {source: {kind: model_token, model: {pad}, "
            "token: nope}}\n",
            "'nope' is not in",
        ),
    ],
)
def test_tokenizer_setting_errors(tmp_path, vz, extra, expect):
    text = CASES["union_task_arithmetic"].format(**{k: str(v) for k, v in vz.items()})
    text = text.replace("tokenizer_source: union\n", extra.replace("{pad}", str(vz["pad"])))
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert expect in " ".join(res.output.split()), res.output


def test_dry_run_plans_the_vocabulary_and_reads_no_tensor(tmp_path, vz, monkeypatch):
    from mergekit_math.io.reader import Checkpoint

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read while planning")

    monkeypatch.setattr(Checkpoint, "read_range", no_reads)
    text = CASES["tokens_section"].format(**{k: str(v) for k, v in vz.items()})
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out", "--dry-run")
    assert res.exit_code == 0, res.output
    # union of 32000 + [PAD], <think> + the configured <extra>, padded to a multiple of 64
    assert "vocabulary:    union: 32003 tokens (32064 rows)" in res.output
    assert not (tmp_path / "out").exists()


def test_the_shipped_recipe_merges_a_pad_token_fine_tune(tmp_path, vz):
    """recipes/vocab_union.yaml, unchanged but for the model paths (math_a: the fine-tune
    with [PAD]): the output has the union vocabulary, padded to a multiple of 64."""
    from transformers import AutoTokenizer

    text = (Path(__file__).resolve().parent.parent / "recipes" / "vocab_union.yaml").read_text()
    for demo, key in (("base", "base"), ("math_a", "pad"), ("math_b", "plain")):
        text = text.replace(f"../demo/{demo}", str(vz[key]))
    out = tmp_path / "out"
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), out, "-q")
    assert res.exit_code == 0, res.output
    assert len(AutoTokenizer.from_pretrained(out)) == BASE_VOCAB + 1
    got = load_dir(out)
    assert got["model.embed_tokens.weight"].shape == (32064, 16)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32064
