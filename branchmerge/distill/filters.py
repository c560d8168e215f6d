"""Selection filters and their counts: which teacher traces become branch training data.

A stage runs filters in order over records; a record is removed by the *first* filter it fails, so

    stats = {"input": N, "removed": {"bad_row": a, "select": b, ...}, "kept": K}   with  N == sum(removed) + K

(every filter appears in `removed`, with 0 when it removed nothing). Filters, by name:

| name | removes a record when |
|---|---|
| select | a `select:` metadata condition fails (e.g. question_type not in [math-word-problem]) |
| format | no closed `<think>…</think>`, nothing after it, or the teacher stopped at its token limit |
| length | prompt + response exceed `max_tokens` tokens of the student's tokenizer (training chat template) |
| decontam | the prompt contains most n-grams of an evaluation item (AIME 2024, GPQA-D, LCB, toy test) |
| verify | the domain verifier says the answer is wrong (or cannot check it, with on_unverifiable=drop) |
| duplicate | the same prompt (+ response, for trace stages) was kept before (case/whitespace folded) |
| near_duplicate | the prompt's MinHash matches an earlier kept prompt of another question (Jaccard >= t) |
| teacher_error | the teacher failed on the question (only with teacher.on_error=skip) |
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from branchmerge.data.records import Record
from branchmerge.distill.dedup import MinHashIndex, NgramIndex, exact_key
from branchmerge.distill.verify import verify_all
from branchmerge.verify.extract import THINK_CLOSE, THINK_OPEN

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """Kept records and the audit trail of one stage."""

    name: str
    input: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    kept: list[Record] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)  # one {"id", "reason", "detail"} per removed record

    def remove(self, rec_id: str, reason: str, detail: str = "") -> None:
        self.removed[reason] = self.removed.get(reason, 0) + 1
        self.log.append({"id": rec_id, "reason": reason, "detail": detail})

    def stats(self) -> dict[str, Any]:
        out = {"input": self.input, "removed": dict(self.removed), "kept": len(self.kept)}
        assert out["input"] == sum(out["removed"].values()) + out["kept"], out
        return out


def check_format(rec: Record) -> str | None:
    """Why the response is not `<think>reasoning</think> answer`, or None when it is."""
    text = rec.response
    if text is None:
        return "no assistant turn"
    if rec.metadata.get("finish_reason") == "length":
        return "the teacher hit its max_new_tokens (truncated)"
    if THINK_OPEN not in text:
        return "no <think>"
    close = text.rfind(THINK_CLOSE)
    if close < text.find(THINK_OPEN):
        return "<think> is never closed"
    if text.count(THINK_OPEN) != text.count(THINK_CLOSE):
        return "unbalanced <think>/</think>"
    if not text[close + len(THINK_CLOSE) :].strip():
        return "no answer after </think>"
    return None


def check_select(rec: Record, select: dict[str, list]) -> str | None:
    for key, allowed in select.items():
        got = rec.metadata.get(key, rec.domain if key == "domain" else None)
        if got not in allowed:
            return f"{key}={got!r} not in {allowed}"
    return None


class TokenCounter:
    """Tokens of a record as the student trains on it: rendered with the training chat template
    (branchmerge.data.chat: "chatml" for the paper's branches), then tokenized without extra specials.

    Not the tokenizer's own chat template: R1-Distill's drops the reasoning of assistant turns, which
    would undercount a trace by its whole <think> block.
    """

    def __init__(self, tokenizer, template: str = "chatml"):
        from branchmerge.data.chat import get_template

        get_template(template)  # fail early on an unknown name
        self.tok, self.template = tokenizer, template

    def __call__(self, rec: Record) -> int:
        from branchmerge.data.chat import render

        text, _ = render(rec.messages, self.template)
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def run_stage(
    name: str,
    records: Iterable[Record],
    filters: list[tuple[str, Callable[[Record], str | None]]],
    result: StageResult | None = None,
) -> StageResult:
    """Apply per-record filters in order; `result` may already hold counted bad rows."""
    res = result or StageResult(name)
    for fname, _ in filters:
        res.removed.setdefault(fname, 0)
    for rec in records:
        res.input += 1
        for fname, check in filters:
            why = check(rec)
            if why is not None:
                res.remove(rec.id, fname, why)
                break
        else:
            res.kept.append(rec)
    return res


def verify_stage(res: StageResult, kind: str, on_unverifiable: str, workers: int, max_tests: int) -> None:
    """Run the domain verifier over `res.kept` (batched: code runs in parallel) and drop the failures."""
    res.removed.setdefault("verify", 0)
    verdicts = verify_all(res.kept, kind, workers=workers, max_tests=max_tests)
    kept = []
    for rec, ok in zip(res.kept, verdicts):
        if ok is True or (ok is None and on_unverifiable == "keep"):
            kept.append(rec)
        else:
            res.remove(rec.id, "verify", "wrong answer" if ok is False else "cannot be verified")
    res.kept = kept


def dedup_stage(res: StageResult, with_response: bool, near: MinHashIndex | None) -> None:
    """Exact duplicates (prompt, or prompt + response), then near-duplicate prompts across questions."""
    res.removed.setdefault("duplicate", 0)
    if near is not None:
        res.removed.setdefault("near_duplicate", 0)
    seen: dict[str, str] = {}
    kept = []
    for rec in res.kept:
        key = exact_key(rec.prompt + ("\x00" + (rec.response or "") if with_response else ""))
        if key in seen:
            res.remove(rec.id, "duplicate", f"same as {seen[key]}")
            continue
        seen[key] = rec.id
        group = rec.metadata.get("seed_id", rec.id)
        other = near.add_if_new(rec.id, rec.prompt, group) if near is not None else None
        if other is not None:
            res.remove(rec.id, "near_duplicate", f"near {other}")
            continue
        kept.append(rec)
    res.kept = kept


def decontam_check(index: NgramIndex | None) -> Callable[[Record], str | None]:
    def check(rec: Record) -> str | None:
        hit = index.match(rec.prompt) if index is not None else None
        return None if hit is None else f"{hit[0]} item {hit[1]} ({hit[2]:.0%} of its n-grams)"

    return check


def length_check(count: Callable[[Record], int] | None, max_tokens: int | None):
    def check(rec: Record) -> str | None:
        if count is None or max_tokens is None:
            return None
        n = count(rec)
        return f"{n} tokens > {max_tokens}" if n > max_tokens else None

    return check
