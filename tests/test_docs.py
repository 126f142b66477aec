"""The README's example commands: what a new user copies must not litter the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where examples may write: git ignores out/ and demo/ (see .gitignore).
ALLOWED = ("out/", "demo/")
OUTPUT_FLAGS = {"-o", "--output"}


def _commands(text: str) -> list[str]:
    """The `mmath ...` command lines of the README's bash blocks, continuations joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("mmath "):
                commands.append(line)
    return commands


def _outputs(command: str) -> list[str]:
    words = shlex.split(command)
    found = [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_FLAGS]
    if words[1] == "merge":  # mmath merge RECIPE OUT_DIR
        positional = [w for w in words[2:] if not w.startswith("-")]
        found.append(positional[1])
    return found


def _placeholder(word: str) -> bool:
    """FILE.jsonl, SWEEP_DIR, PATCH: a name the user fills in."""
    return re.match(r"[A-Z][A-Z_]*(\.|$)", word) is not None


def test_readme_examples_write_only_under_ignored_folders() -> None:
    commands = _commands((ROOT / "README.md").read_text())
    assert len(commands) > 20  # the parser found the examples
    outputs = [(c, o) for c in commands for o in _outputs(c)]
    assert any(o.startswith("out/") for _, o in outputs)
    bad = [(c, o) for c, o in outputs if not o.startswith(ALLOWED) and not _placeholder(o)]
    assert not bad, "README examples writing outside out/ or demo/:\n" + "\n".join(
        f"  {o}  ({c})" for c, o in bad
    )


def test_ignored_folders_are_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/out/" in ignored and "demo/" in ignored


def test_eval_recipe_writes_its_data_under_out() -> None:
    text = (ROOT / "recipes" / "ties_eval_push.yaml").read_text()
    assert "-o out/problems.jsonl" in text
    assert "data: ../out/problems.jsonl" in text
