"""Answer extraction from R1-style generations: `<think> reasoning </think> final answer`.

Used by the toy verifiers, the distillation filters and the lm-eval tasks, so every stage grades
the same way. Rule everywhere: the answer is read from the text *after* the last `</think>`
(decoy answers inside the reasoning never count); a generation with an unclosed `<think>` has no answer.

R1-family chat templates open the think block themselves: the generation prompt ends with
`<｜Assistant｜><think>\n`, so the model's text starts inside the reasoning and carries no `<think>`.
Every place that renders a prompt puts that opening back (`reopen_think(prompt, text)`) before the
text is filtered, stored or graded, so a generation cut off before `</think>` still reads as unclosed.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_OPENED = re.compile(re.escape(THINK_OPEN) + r"\s*\Z")


def opened_think(prompt: str) -> str:
    """What the prompt ended with when it ends inside an opened think block (`<think>` + whitespace,
    e.g. "<think>\\n" for R1's templates), else ""."""
    m = _OPENED.search(prompt)
    return m.group(0) if m else ""


def reopen_think(prompt: str, text: str) -> str:
    """`text` generated after `prompt`, with the think block the prompt opened put back in front.

        reopen_think("...<｜Assistant｜><think>\\n", "a</think>b") == "<think>\\na</think>b"

    Unchanged when the prompt opened nothing, or when the model wrote its own `<think>` anyway.
    """
    prefix = opened_think(prompt)
    if not prefix or text.lstrip().startswith(THINK_OPEN):
        return text
    return prefix + text


def final_part(text: str) -> str | None:
    """Text after the last `</think>`; the whole text if no think block was opened; None if unclosed."""
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE) :]
    return None if THINK_OPEN in text else text


def boxed_contents(text: str) -> list[str]:
    r"""Contents of every top-level `\boxed{...}` (or `\fbox{...}`), balanced braces, in order."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    # drop boxes nested inside an earlier box (they are part of that answer, not a new one)
    return [b for j, b in enumerate(out) if not any(b in a and a != b for a in out[:j])]


def last_boxed(text: str) -> str | None:
    r"""The last `\boxed{}` answer after the think block, stripped; None when there is none."""
    part = final_part(text)
    if part is None:
        return None
    boxes = boxed_contents(part)
    return boxes[-1].strip() if boxes else None


_LETTER_PATTERNS = (
    r"\\boxed\s*\{\s*\(?\s*(?:\\text\{)?\s*([A-Z])\s*\}?\s*\)?\s*\}",
    r"(?i:answer)\s*(?:is)?\s*[:：]?\s*\(?\*{0,2}([A-Z])\b",
    r"^\s*\(?([A-Z])\)?[.)]?\s*$",
    r"\(([A-Z])\)",
)


def extract_letter(text: str, letters: str = "ABCD") -> str | None:
    r"""The chosen option letter: `\boxed{B}`, `\boxed{(B)}`, `Answer: B`, `(B)`, or a bare `B` line.

    Patterns are tried from most to least explicit; within a pattern the last match wins.
    """
    part = final_part(text)
    if part is None:
        return None
    for pat in _LETTER_PATTERNS:
        hits = [h for h in re.findall(pat, part, flags=re.MULTILINE) if h in letters]
        if hits:
            return hits[-1]
    return None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str, languages: tuple[str, ...] | None = None) -> str | None:
    """Body of the last fenced code block after the think block (optionally of given languages)."""
    part = final_part(text)
    if part is None:
        return None
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(part)]
    if languages is not None:
        blocks = [b for b in blocks if b[0] in languages]
    return blocks[-1][1] if blocks else None


def normalize_output(text: str) -> str:
    """Program output compared line by line, ignoring trailing spaces and trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip("\n")
