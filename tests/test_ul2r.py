"""UL2R without training: denoiser statistics, masks, sampling, upsampling phases, tokens,
data files, configs and their errors, the `mmath ul2r config` and `preview` commands.

Training, checkpoints, resume and merging are in test_ul2r_train.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import build_tokenizer, make_config
from typer.testing import CliRunner

from mergekit_math.cli.ul2r import ul2r_app
from mergekit_math.errors import UserError
from mergekit_math.ul2r.config import (
    Denoiser,
    load_config,
    max_span_count,
    parse_config,
    raw_length,
)
from mergekit_math.ul2r.denoise import (
    DenoiserRuntime,
    noise_spans,
    prefix_split,
    reconstruct,
    span_corrupt,
)
from mergekit_math.ul2r.mixture import (
    MixtureSampler,
    SourceSchedule,
    example_rng,
    final_phase_start,
)
from mergekit_math.ul2r.presets import PRESETS, build_config, render_config

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
SENTINELS = list(range(10_000, 10_200))
SETTINGS = [(3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (32, 0.15), (64, 0.15), (64, 0.5)]


def _span(mu: float, r: float, weight: float = 1.0, mode: str | None = "[NLU]") -> Denoiser:
    return Denoiser(
        kind="span", mean_span_length=mu, corruption_rate=r, weight=weight, mode_token=mode
    )


def _minimal(tmp_path: Path, **changes) -> dict:
    """A valid config mapping (data file created) with some keys replaced."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    raw = {
        "model": str(tmp_path / "model"),
        "preset": "ul2r",
        "denoisers": [dict(d) for d in PRESETS["ul2r"].denoisers],
        "data": {"paths": [str(data)]},
        "training": {"sequence_length": 128},
    }
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[leaf] = value
    return raw


# --------------------------------------------------------------------------- denoisers


@pytest.mark.parametrize("mu,r", SETTINGS)
def test_span_statistics_on_long_sequences(mu, r):
    """Corruption rate within ±0.02 of r and mean span length within 15% of μ, over many
    training-length examples cut from a long synthetic sequence."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, 5000, size=200_000).tolist()
    d = _span(mu, r)
    length = raw_length(d, 512)
    noise = spans = total = 0
    for start in range(0, len(text) - length, length):
        chunk = text[start : start + length]
        for a, b in noise_spans(len(chunk), r, mu, rng):
            noise += b - a
            spans += 1
        total += len(chunk)
    assert abs(noise / total - r) <= 0.02
    assert abs(noise / spans - mu) <= 0.15 * mu
    # And in one very long sequence.
    long_spans = noise_spans(len(text), r, mu, rng)
    corrupted = sum(b - a for a, b in long_spans)
    assert abs(corrupted / len(text) - r) <= 0.02
    assert abs(corrupted / len(long_spans) - mu) <= 0.15 * mu


@pytest.mark.parametrize("mu,r", SETTINGS)
def test_span_corruption_sentinels_in_order_and_exact_reconstruction(mu, r):
    rng = np.random.default_rng(1)
    for length in (2, 3, 17, 100, 509):
        tokens = rng.integers(0, 5000, size=length).tolist()
        inputs, targets = span_corrupt(tokens, r, mu, SENTINELS, rng)
        in_sent = [t for t in inputs if t in SENTINELS]
        tg_sent = [t for t in targets if t in SENTINELS]
        n = len(in_sent)
        assert 1 <= n <= max_span_count(length, r, mu)
        assert in_sent == SENTINELS[:n] and tg_sent == SENTINELS[:n]
        assert targets[0] == SENTINELS[0]
        assert len(inputs) + len(targets) == length + 2 * n
        assert reconstruct(inputs, targets, SENTINELS) == tokens


def test_reconstruction_restores_text_exactly(tmp_path):
    """With a real (character-level) tokenizer: inputs + targets give back the text."""
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.add_tokens([f"<extra_id_{k}>" for k in range(40)], special_tokens=True)
    sentinels = tok.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(40)])
    text = "Natalia sold 48 clips in April, and half as many in May.\nHow many? #### 72"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(2)
    for mu, r in [(3, 0.15), (3, 0.5), (8, 0.5)]:
        inputs, targets = span_corrupt(ids, r, mu, sentinels, rng)
        back = reconstruct(inputs, targets, sentinels)
        assert "".join(tok.convert_ids_to_tokens(back)) == text
        shown = "".join(tok.convert_ids_to_tokens(inputs))
        assert "<extra_id_0>" in shown and shown != text


def test_prefix_split_statistics():
    rng = np.random.default_rng(3)
    for fraction in (0.5, 0.25):
        cuts = [prefix_split(200, fraction, rng) for _ in range(4000)]
        assert min(cuts) >= 1 and max(cuts) <= 199
        assert abs(np.mean([(200 - c) / 200 for c in cuts]) - fraction) < 0.02


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_example_fits_the_sequence(preset):
    rng = np.random.default_rng(4)
    for i, raw in enumerate(PRESETS[preset].denoisers):
        d = Denoiser(**raw)
        runtime = DenoiserRuntime.build(i, d, 256, 7 if d.mode_token else None, SENTINELS)
        for _ in range(20):
            ex = runtime.apply(rng.integers(0, 5000, size=runtime.raw_length).tolist(), rng)
            assert len(ex.tokens) <= 256
            assert ex.loss_mask == [0] * len(ex.inputs) + [1] * len(ex.targets)
            if d.mode_token:
                assert ex.inputs[0] == 7
            if d.kind == "causal":
                assert ex.inputs == [] and len(ex.targets) == 256


# --------------------------------------------------------------------------- masks


def test_prefix_lm_mask_rules_and_loss_mask():
    import torch

    from mergekit_math.ul2r.batch import collate, prefix_lm_mask
    from mergekit_math.ul2r.denoise import Example

    examples = [Example([1, 2, 3], [4, 5], 0), Example([9], [8, 7, 6, 5, 4, 3], 1)]
    batch = collate(examples, 8, pad_id=0)
    mask = prefix_lm_mask(batch.valid, batch.prefix_lengths)[:, 0]
    assert mask.shape == (2, 8, 8)
    for b, ex in enumerate(examples):
        n, p = len(ex.tokens), ex.prefix_length
        for i in range(8):
            for j in range(8):
                if i >= n:  # padding query: itself only
                    expect = i == j
                elif j >= n:  # padding key
                    expect = False
                else:
                    expect = j <= i or j < p
                assert bool(mask[b, i, j]) == expect, (b, i, j)
        assert batch.loss_mask[b].tolist() == [False] * p + [True] * (n - p) + [False] * (8 - n)
    assert torch.equal(batch.input_ids[0, 5:], torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_mask_in_a_model_inputs_bidirectional_targets_causal(arch):
    """Changing a late input token changes an early input position's output; changing a target
    token changes no earlier position."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_math.ul2r.batch import collate, model_inputs, probe_prefix_attention
    from mergekit_math.ul2r.denoise import Example

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch, False, 2)).eval()
    style, reason = probe_prefix_attention(model, torch.float32)
    assert style is not None, reason

    def run(inputs, targets):
        batch = collate([Example(inputs, targets, 0)], 10, pad_id=0)
        with torch.no_grad():
            return model(**model_inputs(batch, "prefix_lm", style, torch.float32)).logits[0]

    base = run([5, 6, 7, 8], [9, 10, 11, 12])
    late_input = run([5, 6, 7, 30], [9, 10, 11, 12])
    assert (late_input[0] - base[0]).abs().max() > 1e-5  # position 0 sees input 3
    late_target = run([5, 6, 7, 8], [9, 10, 40, 12])
    assert torch.allclose(late_target[:6], base[:6], atol=1e-6)  # positions before target 2
    assert (late_target[6] - base[6]).abs().max() > 1e-5


def test_probe_rejects_a_model_that_ignores_4d_masks():
    import torch

    from mergekit_math.ul2r.batch import probe_prefix_attention

    class MaskBlind(torch.nn.Module):
        """A causal model (running mean of embeddings) that ignores attention_mask."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.head = torch.nn.Linear(8, 50)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, position_ids=None, attention_mask=None, **_):
            h = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
            return type("Out", (), {"logits": self.head(h)})

    style, reason = probe_prefix_attention(MaskBlind(), torch.float32)
    assert style is None and "ignored" in reason


# --------------------------------------------------------------------------- sampling


def test_mixture_sampler_matches_weights_within_3_sigma():
    weights = [d["weight"] for d in PRESETS["ul2"].denoisers]
    sampler = MixtureSampler(weights)
    n = 10_000
    draws = [sampler.draw(example_rng(0, 0, i)) for i in range(n)]
    counts = np.bincount(draws, minlength=len(weights))
    for w, c in zip(weights, counts):
        sigma = math.sqrt(n * w * (1 - w))
        assert abs(c - n * w) <= 3 * sigma, (w, c)


def test_domain_upsampling_switches_phase_at_the_right_step():
    assert final_phase_start(100, 0.15) == 85
    assert final_phase_start(1000, 0.1) == 900
    assert final_phase_start(10, 0.01) == 9  # at least one final step
    sched = SourceSchedule([0.9, 0.1], [0.4, 0.6], steps=100, final_fraction=0.15)
    assert [sched.phase(s) for s in (0, 84, 85, 99)] == ["base", "base", "final", "final"]
    # Degenerate weights make the switch visible in every draw.
    hard = SourceSchedule([1.0, 0.0], [0.0, 1.0], steps=40, final_fraction=0.25)
    picks = [hard.sampler(step).draw(example_rng(0, 0, step)) for step in range(40)]
    assert picks == [0] * 30 + [1] * 10
    # Frequencies per phase follow the weights.
    base = [sched.sampler(10).draw(example_rng(1, 0, i)) for i in range(4000)]
    final = [sched.sampler(90).draw(example_rng(1, 0, i)) for i in range(4000)]
    assert abs(np.mean(base) - 0.1) < 0.02 and abs(np.mean(final) - 0.6) < 0.03


def test_examples_use_the_upsampled_source_in_the_final_phase(tmp_path):
    from mergekit_math.ul2r.data import DocumentIndex, ExampleFactory, TokenStream

    files = []
    for name, char in (("web", "a"), ("math", "b")):
        f = tmp_path / f"{name}.txt"
        f.write_text("\n\n".join(char * 30 for _ in range(5)) + "\n")
        files.append(f)
    streams = [
        TokenStream(
            DocumentIndex([f]),
            np.arange(5),
            lambda t: [ord(c) for c in t],
            0,
            seed=0,
            source=i,
            shuffle=True,
            packing=True,
        )
        for i, f in enumerate(files)
    ]
    runtime = DenoiserRuntime.build(0, Denoiser(kind="causal", weight=1.0), 16, None, [])
    sched = SourceSchedule([1.0, 0.0], [0.0, 1.0], steps=20, final_fraction=0.2)
    factory = ExampleFactory([runtime], streams, sched, seed=0, stream=0)
    seen = {step: factory.make(step, step)[0].targets[0] for step in range(20)}
    assert {seen[s] for s in range(16)} <= {ord("a"), 0}
    assert {seen[s] for s in range(16, 20)} <= {ord("b"), 0}


# --------------------------------------------------------------------------- data


def test_data_files_jsonl_and_text(tmp_path):
    from mergekit_math.ul2r.data import DocumentIndex, TokenStream

    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "first doc"}\n\n{"text": "  "}\n{"text": "second"}\n')
    t = tmp_path / "b.txt"
    t.write_text("para one\nline two\n\n\npara two\n")
    index = DocumentIndex([j, t])
    assert [index.text(i) for i in range(len(index))] == [
        "first doc",
        "second",
        "para one\nline two",
        "para two",
    ]
    stream = TokenStream(
        index, np.arange(4), lambda s: list(s), "|", seed=0, source=0, shuffle=False, packing=True
    )
    assert "".join(stream.take(12)) == "first doc|se"
    state = stream.state_dict()
    rest = stream.take(30)
    stream.load_state_dict(state)
    assert stream.take(30) == rest
    unpacked = TokenStream(
        index, np.arange(4), lambda s: list(s), "|", seed=0, source=0, shuffle=False, packing=False
    )
    assert "".join(unpacked.take(100)) == "first doc|"
    assert "".join(unpacked.take(4)) == "seco"
    assert "".join(unpacked.take(100)) == "nd|"


def test_bad_jsonl_names_file_and_line(tmp_path):
    from mergekit_math.ul2r.data import DocumentIndex

    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: no 'text' field"):
        DocumentIndex([f])
    f.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match=r"x\.jsonl:2: not valid JSON"):
        DocumentIndex([f])


# --------------------------------------------------------------------------- tokens


def _reserved_tokenizer(folder: Path, reserved: int) -> None:
    """The test tokenizer plus ``reserved`` Llama-3-style reserved special tokens."""
    from transformers import AutoTokenizer

    build_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    names = [f"<|reserved_special_token_{k}|>" for k in range(reserved)]
    tok.add_tokens(names, special_tokens=True)
    tok.save_pretrained(folder)


def test_reserved_tokens_are_reused_before_adding(tmp_path):
    from transformers import AutoTokenizer

    from mergekit_math.ul2r.tokens import resolve_tokens

    _reserved_tokenizer(tmp_path, 8)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    before = len(tok)
    short = {"tokens.num_sentinels": 6, "training.sequence_length": 32}
    config = parse_config(_minimal(tmp_path, **short))
    tokens = resolve_tokens(tok, config)
    assert len(tok) == before + 1  # 6 sentinels + 2 of 3 mode tokens reuse; 1 added
    assert tokens.added == ["[NLG]"]
    assert tokens.reused["<extra_id_0>"] == "<|reserved_special_token_0|>"
    assert tokens.reused["[NLU]"] == "<|reserved_special_token_7|>"
    assert tokens.sentinels == tok.convert_tokens_to_ids(
        [f"<|reserved_special_token_{k}|>" for k in range(6)]
    )
    again = resolve_tokens(tok, config)  # what --resume does: same ids, nothing added
    assert again.sentinels == tokens.sentinels and again.modes == tokens.modes
    assert len(tok) == before + 1 and not again.added


def test_added_tokens_grow_the_embedding_with_mean_rows(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_math.ul2r.tokens import init_embeddings, resolve_tokens

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama", False, 2))
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    config = parse_config(_minimal(tmp_path, **{"tokens.num_sentinels": 40}))
    tokens = resolve_tokens(tok, config)
    assert len(tokens.added) == 43 and len(tok) > emb0.shape[0]
    rows = init_embeddings(model, tokens, len(tok))
    assert rows == emb0.shape[0]
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == len(tok) == model.config.vocab_size
    n = tokens.original_vocab
    for w, w0 in ((emb, emb0), (head, head0)):
        torch.testing.assert_close(w[:n], w0[:n])
        for tid in tokens.sentinels + list(tokens.modes.values()):
            torch.testing.assert_close(w[tid], w0[:n].mean(dim=0))


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"denoisers.0.weight": 0.4}, "denoisers: the weights sum to 0.9"),
        ({"denoisers.1.corruption_rate": 1.5}, "denoisers[1].corruption_rate: must be strictly"),
        ({"denoisers.1.corruption_rate": 0.0}, "denoisers[1].corruption_rate: must be strictly"),
        (
            {"denoisers.2.mean_span_length": 0.5},
            "denoisers[2].mean_span_length: must be at least 1",
        ),
        ({"preset": "ul3"}, "preset: unknown preset 'ul3'"),
        ({"training.learnig_rate": 1e-4}, "training.learnig_rate: unknown key"),
        ({"denoisers.0.corruption_rate": 0.7}, "denoisers[0].corruption_rate: a prefix_lm"),
        ({"denoisers.1.mean_span_length": None}, "denoisers[1].mean_span_length: required"),
        ({"tokens.num_sentinels": 3}, "tokens.num_sentinels: denoisers[3]"),
        ({"training.sequence_length": 8}, "training.sequence_length: Input should be greater"),
    ],
)
def test_bad_configs_give_one_clear_error(tmp_path, changes, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_minimal(tmp_path, **changes)))
    with pytest.raises(UserError) as exc:
        load_config(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: ") and message in text, text
    assert "\n" not in text


def test_bad_configs_through_the_cli_exit_2_with_one_line(tmp_path):
    cases = {
        "weights": ({"denoisers.0.weight": 0.4}, "they must sum to 1"),
        "rate": ({"denoisers.1.corruption_rate": 1.2}, "denoisers[1].corruption_rate"),
        "mu": ({"denoisers.1.mean_span_length": 0}, "denoisers[1].mean_span_length"),
        "preset": ({"preset": "ul2x"}, "unknown preset 'ul2x'"),
        "data": ({"data.paths": ["missing.jsonl"]}, "data.paths[0]: file not found"),
    }
    for name, (changes, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_minimal(tmp_path, **changes)))
        res = runner.invoke(ul2r_app, ["preview", str(path)])
        assert res.exit_code == 2, (name, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], name
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_minimal(tmp_path)))
    res = runner.invoke(ul2r_app, ["train", str(good), "--data", "nope.jsonl", "-o", "x"])
    assert res.exit_code == 2 and "--data: file not found: nope.jsonl" in res.output
    res = runner.invoke(
        ul2r_app, ["config", "--model", "m", "-o", str(tmp_path / "n.yaml"), "--preset", "u2"]
    )
    assert res.exit_code == 2
    assert "--preset: unknown preset 'u2' (choose from ul2r, ul2, causal-mix)" in res.output


def test_domain_upsampling_config_checks(tmp_path):
    raw = _minimal(tmp_path)
    raw["data"] = {}
    raw["domain_upsampling"] = {
        "sources": [
            {"name": "web", "paths": ["w.jsonl"], "weight": 0.9, "final_weight": 0.5},
            {"name": "math", "paths": ["m.jsonl"], "weight": 0.1, "final_weight": 0.4},
        ]
    }
    with pytest.raises(UserError, match=r"domain_upsampling.sources: the final_weights sum to 0.9"):
        parse_config(raw)
    raw["domain_upsampling"]["sources"][1]["final_weight"] = 0.5
    config = parse_config(raw)
    assert config.domain_upsampling.final_fraction == 0.15
    from mergekit_math.ul2r.data import resolve_sources

    with pytest.raises(UserError, match=r"domain_upsampling.sources\[0\].paths\[0\]: file not"):
        resolve_sources(config, tmp_path)
    (tmp_path / "m.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="--data: this config mixes sources"):
        resolve_sources(config, tmp_path, [str(tmp_path / "m.jsonl")])
    sources = resolve_sources(config, tmp_path, [f"web={tmp_path / 'm.jsonl'}"])
    assert [s.name for s in sources] == ["web", "math"]
    assert sources[0].paths == sources[1].paths == ((tmp_path / "m.jsonl").resolve(),)


@pytest.mark.parametrize("preset", ["ul2r", "ul2", "causal-mix"])
def test_config_command_writes_a_commented_config_that_parses_back(tmp_path, preset):
    out = tmp_path / "ul2r.yaml"
    args = ["config", "--model", "some/model", "-o", str(out), "--preset", preset]
    res = runner.invoke(ul2r_app, [*args, "--sequence-length", "256", "--steps", "50"])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert text.startswith(f"# mmath ul2r train {out} --data FILE -o out/ul2r\n")
    assert "arxiv.org/abs/22" in text and "disagree" in text
    config = load_config(out)
    expect = build_config(
        "some/model",
        preset,
        overrides={"training.sequence_length": 256, "training.steps": 50},
    )
    assert config == expect
    assert [d.model_dump() for d in config.denoisers] == [
        Denoiser(**d).model_dump() for d in PRESETS[preset].denoisers
    ]
    assert render_config(config, "x").count("\n") > 60
    res = runner.invoke(ul2r_app, args)
    assert res.exit_code == 2 and "already exists" in res.output


def test_preset_weights_as_the_issue_describes():
    def share(preset, kind=None, mode=None):
        return sum(
            d["weight"]
            for d in PRESETS[preset].denoisers
            if (kind is None or d["kind"] == kind) and (mode is None or d["mode_token"] == mode)
        )

    assert share("ul2r", "prefix_lm") == 0.5
    assert share("ul2r", mode="[NLU]") == 0.25 and share("ul2r", mode="[NLG]") == 0.25
    assert share("ul2", mode="[NLU]") == pytest.approx(0.4)
    assert share("ul2", mode="[NLG]") == pytest.approx(0.4)
    assert share("ul2", "prefix_lm") == pytest.approx(0.2)
    assert share("causal-mix", "causal") == 0.6 and share("causal-mix", "prefix_lm") == 0.2
    spans = {
        (d["mean_span_length"], d["corruption_rate"])
        for d in PRESETS["causal-mix"].denoisers
        if d["kind"] == "span"
    }
    assert spans == {(3, 0.15), (32, 0.5)}


def test_preset_only_config_fills_denoisers(tmp_path):
    config = parse_config({"model": "m", "preset": "ul2"})
    assert len(config.denoisers) == 7
    with pytest.raises(UserError, match="denoisers: required key is missing"):
        parse_config({"model": "m"})


def test_shipped_example_config_parses():
    path = ROOT / "examples" / "ul2r_smollm2.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mmath ul2r train examples/ul2r_smollm2.yaml")
    config = load_config(path)
    assert config.preset == "ul2r"


def test_ul2r_help_and_config_do_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from mergekit_math.cli.ul2r import ul2r_app\n"
        "for args in (['--help'], ['config', '--model', 'm', '-o', sys.argv[1]]):\n"
        "    try:\n        ul2r_app(args)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "HEAVY []" in out.stdout
    assert "preview" in out.stdout and "train" in out.stdout


# --------------------------------------------------------------------------- preview


def test_preview_shows_every_denoiser_with_sentinels_targets_and_mask(tmp_path):
    from conftest import make_model

    make_model(tmp_path / "model", layers=2)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"Tom has {i} apples and buys {i + 3} more. "}) + "\n"
            for i in range(20)
        )
    )
    config = tmp_path / "c.yaml"
    runner.invoke(
        ul2r_app,
        [
            "config",
            "--model",
            str(tmp_path / "model"),
            "-o",
            str(config),
            "--preset",
            "causal-mix",
            "--sequence-length",
            "64",
        ],
    )
    res = runner.invoke(ul2r_app, ["preview", str(config), "--data", str(data), "-n", "1"])
    assert res.exit_code == 0, res.output
    out = res.output
    for i in range(4):
        assert f"denoiser[{i}]" in out
    assert "<extra_id_0>" in out and "[S2S]" in out and "[NLU]" in out and "[NLG]" in out
    assert "loss mask:" in out and "█" in out and "\x1b[" not in out
    assert "bidirectional over the" in out
    colored = runner.invoke(
        ul2r_app, ["preview", str(config), "--data", str(data), "-n", "1", "--color"]
    )
    assert "\x1b[1;36m<extra_id_0>\x1b[0m" in colored.output
