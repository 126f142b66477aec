"""The built-in chat templates (alpaca, chatml, exaone, llama3, mistral): each renders a
conversation as its format's published description says, and as mergekit 0.1.5's template of
the same name renders it through transformers' ``apply_chat_template``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import build_tokenizer, mmath

from mergekit_math.io.chat_templates import BUILTIN_TEMPLATES

CONVERSATION = [
    {"role": "system", "content": "You are terse. "},
    {"role": "user", "content": " What is 2+2?\n"},
    {"role": "assistant", "content": "4"},
]

# The conversation above in each format, written from the format's description (BOS is <s>,
# EOS </s> in the test tokenizer); add_generation_prompt is set.
EXPECTED = {
    "alpaca": "You are terse.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4",
    "chatml": "<|im_start|>system\nYou are terse. <|im_end|>\n"
    "<|im_start|>user\n What is 2+2?\n<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n",
    "exaone": "[|system|]You are terse. [|endofturn|]\n[|user|] What is 2+2?\n\n"
    "[|assistant|]4[|endofturn|]\n[|assistant|]",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] You are terse. \n\n What is 2+2?\n [/INST] 4</s>",
}

# mergekit's own files leak template whitespace into two formats; the rest must be identical.
# llama3: a "\n" after every <|eot_id|> (not in Meta's format); exaone: the file's indentation
# and line breaks (EXAONE's format has none), so only the non-whitespace text can be compared.
MERGEKIT_DIFFERS = {
    "llama3": lambda s: s.replace("<|eot_id|>\n", "<|eot_id|>"),
    "exaone": lambda s: re.sub(r"\s+", "", s),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def render(tokenizer, template: str, messages=CONVERSATION, generation: bool = True) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
    )


def test_every_mergekit_name_is_built_in():
    assert sorted(BUILTIN_TEMPLATES) == ["alpaca", "chatml", "exaone", "llama3", "mistral"]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_renders_the_format(tokenizer, name):
    assert render(tokenizer, BUILTIN_TEMPLATES[name]) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_whitespace_control_is_explicit(name):
    """The same text from a plain Jinja environment (no trim_blocks/lstrip_blocks), so the
    template does not depend on the settings of whoever renders it."""
    import jinja2

    text = jinja2.Environment().from_string(BUILTIN_TEMPLATES[name])
    got = text.render(
        messages=CONVERSATION, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    assert got == EXPECTED[name]


def test_generation_prompt_and_roles(tokenizer):
    user_only = CONVERSATION[:2]
    assert render(tokenizer, BUILTIN_TEMPLATES["alpaca"], user_only).endswith(
        "What is 2+2?\n\n### Response:\n"
    )
    assert render(tokenizer, BUILTIN_TEMPLATES["alpaca"], user_only, generation=False).endswith(
        "What is 2+2?"
    )
    assert render(tokenizer, BUILTIN_TEMPLATES["exaone"], CONVERSATION[1:2]).startswith(
        "[|system|][|endofturn|]\n[|user|]"
    )
    with pytest.raises(Exception, match="must alternate"):
        render(tokenizer, BUILTIN_TEMPLATES["mistral"], [CONVERSATION[0], CONVERSATION[2]])


@pytest.mark.mergekit
@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_same_string_as_mergekit(tokenizer, name):
    mergekit = pytest.importorskip("mergekit")
    theirs_file = Path(mergekit.__file__).parent / "_data" / "chat_templates" / f"{name}.jinja"
    theirs = render(tokenizer, theirs_file.read_text())
    ours = render(tokenizer, BUILTIN_TEMPLATES[name])
    same = MERGEKIT_DIFFERS.get(name, lambda s: s)
    print(f"{name}: mergekit {theirs!r}\n{' ' * len(name)}  mmath    {ours!r}")
    assert same(ours) == same(theirs)
    if name not in MERGEKIT_DIFFERS:
        assert ours == theirs


RECIPE = """\
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 1.0}}
chat_template: {template}
"""


def test_a_named_template_is_written_and_an_unknown_name_lists_the_known(tmp_path, zoo):
    from transformers import AutoTokenizer

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(a=zoo["a"], template="llama3"))
    r = mmath("merge", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["llama3"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    got = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert got == EXPECTED["llama3"]

    recipe.write_text(RECIPE.format(a=zoo["a"], template="vicuna"))
    r = mmath("merge", recipe, tmp_path / "bad")
    assert r.exit_code == 2
    assert "chat_template: 'vicuna' is neither a Jinja template nor a known name" in r.output
    assert "(alpaca, chatml, exaone, llama3, mistral, auto)" in " ".join(r.output.split())
