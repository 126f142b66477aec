"""Final answers of boxed-answer math generations (MATH, AIME): the last ``\\boxed{...}``.

Pure string code (no sympy, no math-verify), shared by the scoring of ``math_local`` /
``aime_local`` and the data checkers. Which string counts as the model's answer:

1. the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept whole;
   ``\\boxed 5`` takes the token after the space);
2. otherwise the text after the last "answer is" / "Answer:" on its line (``$`` and a final
   period dropped);
3. otherwise the last ``$...$`` inline math;
4. otherwise the last number (``-3``, ``2.5``, ``7/8``);
5. otherwise nothing, which scores 0.
"""

from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS = re.compile(r"(?:answer is|answer:)\s*(.+)", re.IGNORECASE)
_INLINE_MATH = re.compile(r"\$([^$]+)\$")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at ``text[start] == '{'``; ``\\{`` and ``\\}``
    are literal. None when the group never closes."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed X``) in
    ``text``; None when there is none or it never closes."""
    for match in reversed(list(_BOX.finditer(text))):
        i = match.end()
        rest = text[i:]
        if rest.startswith("{"):
            content = _braced(text, i)
        elif rest[:1].isspace():
            token = re.match(r"\s+([^\s$]+)", rest)
            content = token.group(1) if token else None
        else:
            content = None
        if content is not None:
            return content.strip()
    return None


def extract_answer(generation: str) -> str:
    """The model's final answer in ``generation`` (see the module docstring for the order of
    fallbacks); "" when it gives none."""
    boxed = last_boxed(generation)
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(generation)
    if said:
        line = said[-1].strip().splitlines()[0].strip()
        line = line.strip("$ ").rstrip(".").strip("$ ")
        if line:
            return line
    spans = _INLINE_MATH.findall(generation)
    if spans:
        return spans[-1].strip()
    numbers = _NUMBER.findall(generation)
    return numbers[-1] if numbers else ""
