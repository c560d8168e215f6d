"""One branch dataset: import -> (seed filters -> teacher) -> trace filters -> <output_dir>/<domain>/.

    <output_dir>/<domain>/train.jsonl          kept records (record schema), written atomically
    <output_dir>/<domain>/stats.json           {"seeds"?: stage counts, "traces": stage counts, ...}
    <output_dir>/<domain>/removed.jsonl        one {"stage", "id", "reason", "detail"} per removed item
    <output_dir>/<domain>/teacher/generations.jsonl   the resumable teacher journal (generate: true)

Imported traces (generate: false) go through one stage:
    bad_row, select, format, length, decontam, verify, duplicate, near_duplicate
Seed questions (generate: true) are filtered before anything is paid for, then each kept seed gets n
samples, which are filtered as traces:
    seeds:  bad_row, select, decontam, duplicate, near_duplicate
    traces: teacher_error, format, length, verify, duplicate (same prompt and response)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from branchmerge.data.records import Record, write_records
from branchmerge.distill import filters as F
from branchmerge.distill.dedup import MinHashIndex, NgramIndex
from branchmerge.distill.sources import BadRow, InputError, import_source
from branchmerge.distill.teachers import GenRequest, TeacherError, generate
from branchmerge.errors import DataError
from branchmerge.foundation import write_json

log = logging.getLogger(__name__)


def plain(x: Any) -> Any:
    """A config node as plain dicts/lists (JSON-serialisable)."""
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


@dataclass
class Context:
    """What every domain shares: settings, the decontamination index, the token counter, the teacher."""

    selection: Any
    teacher_cfg: Any
    on_bad_row: str
    decontam: NgramIndex | None
    count_tokens: Any  # Record -> int, or None
    make_teacher: Any = None  # () -> Teacher, called once, when a request is pending
    _teacher: Any = None

    def teacher(self) -> Any:
        if self._teacher is None:
            self._teacher = self.make_teacher()
        return self._teacher


def iter_sources(name: str, dcfg: Any, on_bad_row: str, stage: F.StageResult) -> Iterator[Record]:
    """Records of every source in order, with source-level `select` recorded in metadata."""
    stage.removed.setdefault("bad_row", 0)
    for i, src in enumerate(dcfg.sources):
        tag = f"{i}-" if len(dcfg.sources) > 1 else ""
        for item in import_source(
            src.format, src.path, domain=name, instruction=src.instruction, limit=src.limit, tag=tag
        ):
            if isinstance(item, BadRow):
                if on_bad_row == "raise":
                    raise InputError(f"{item} (set on_bad_row=skip to skip and count malformed rows)")
                stage.input += 1
                stage.remove(item.where, "bad_row", item.why)
                continue
            yield Record(
                item.id,
                item.domain,
                item.source,
                item.messages,
                item.reference,
                {**item.metadata, "_select": plain(src.select)},
            )


def _select(rec: Record) -> str | None:
    return F.check_select(rec, rec.metadata.get("_select", {}))


def _near(sel: Any) -> MinHashIndex | None:
    if not sel.dedup or sel.near_dup_threshold is None:
        return None
    return MinHashIndex(sel.minhash_perm, sel.minhash_bands, sel.shingle, sel.near_dup_threshold)


def import_stage(name: str, dcfg: Any, ctx: Context) -> F.StageResult:
    sel, st = ctx.selection, F.StageResult("traces")
    checks = [("select", _select)]
    if sel.format:
        checks.append(("format", F.check_format))
    checks += [
        ("length", F.length_check(ctx.count_tokens, sel.max_tokens)),
        ("decontam", F.decontam_check(ctx.decontam)),
    ]
    F.run_stage("traces", iter_sources(name, dcfg, ctx.on_bad_row, st), checks, st)
    F.verify_stage(st, dcfg.verifier, dcfg.on_unverifiable, sel.verify_workers, sel.code_max_tests)
    if sel.dedup:
        F.dedup_stage(st, with_response=False, near=_near(sel))
    return st


def seed_stage(name: str, dcfg: Any, ctx: Context) -> F.StageResult:
    st = F.StageResult("seeds")
    checks = [("select", _select), ("decontam", F.decontam_check(ctx.decontam))]
    F.run_stage("seeds", iter_sources(name, dcfg, ctx.on_bad_row, st), checks, st)
    if ctx.selection.dedup:
        F.dedup_stage(st, with_response=False, near=_near(ctx.selection))
    return st


def teacher_settings(t: Any) -> dict[str, Any]:
    keys = (
        "name",
        "model",
        "n",
        "temperature",
        "top_p",
        "max_new_tokens",
        "seed",
        "n_per_request",
        "extra_body",
        "corrupt",
    )
    return {k: plain(t[k]) for k in keys}


def requests_for(seeds: list[Record], t: Any) -> list[GenRequest]:
    """One request of n samples per seed, or n requests of 1 (keys "<id>#<k>") with n_per_request=false."""
    out = []
    ids = [s.id for s in seeds]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"seed id {dup!r} appears twice: request keys (and the journal) need unique ids")
    for s in seeds:
        upto = max(i for i, m in enumerate(s.messages) if m["role"] == "user")
        msgs = s.messages[: upto + 1]
        if t.n_per_request:
            out.append(GenRequest(s.id, s.id, msgs, t.n))
        else:
            out += [GenRequest(f"{s.id}#{k}", s.id, msgs, 1) for k in range(t.n)]
    return out


def trace_stage(seeds: list[Record], out: Path, ctx: Context) -> F.StageResult:
    """Generate (resumably) n samples per seed, then filter them as traces."""
    t, sel = ctx.teacher_cfg, ctx.selection
    reqs = requests_for(seeds, t)
    results, failed = generate(ctx.teacher, reqs, out / "teacher" / "generations.jsonl", teacher_settings(t))
    if failed and t.on_error == "raise":
        raise TeacherError(
            f"{len(failed)} of {len(reqs)} teacher requests failed (first: {failed[:3]}); the "
            f"{len(results)} finished are in {out / 'teacher'}: rerun the same command to resume"
        )
    st = F.StageResult("traces")
    st.removed.setdefault("teacher_error", 0)
    by_seed: dict[str, list] = {}
    for r in reqs:
        by_seed.setdefault(r.seed_id, []).append(results.get(r.key))
    candidates = []
    for s in seeds:
        samples = [
            x
            for res in by_seed[s.id]
            for x in (res.samples if res else [None] * (t.n if t.n_per_request else 1))
        ]
        for k, smp in enumerate(samples):
            rid = f"{s.id}-s{k}"
            if smp is None:
                st.input += 1
                st.remove(rid, "teacher_error", "request failed after every retry")
                continue
            msgs = [
                *(m for m in s.messages if m["role"] != "assistant"),
                {"role": "assistant", "content": smp["text"]},
            ]
            meta = {**s.metadata, "seed_id": s.id, "sample": k, "finish_reason": smp["finish_reason"]}
            candidates.append(Record(rid, s.domain, s.source, msgs, s.reference, meta))
    checks = [("format", F.check_format)] if sel.format else []
    checks.append(("length", F.length_check(ctx.count_tokens, sel.max_tokens)))
    F.run_stage("traces", candidates, checks, st)
    return st


def _clean(rec: Record) -> Record:
    """The record as written: bulky or internal metadata dropped (test cases -> their count)."""
    meta = {k: v for k, v in rec.metadata.items() if k not in ("tests", "_select")}
    if "tests" in rec.metadata:
        meta["n_tests"] = len(rec.metadata["tests"]["inputs"])
    return Record(rec.id, rec.domain, rec.source, rec.messages, rec.reference, meta)


def run_domain(name: str, dcfg: Any, out_dir: str | Path, ctx: Context) -> dict[str, Any]:
    """Build <out_dir>/<name>/ and return its stats."""
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"verifier": dcfg.verifier, "generate": dcfg.generate}
    stages = []
    if dcfg.generate:
        seeds = seed_stage(name, dcfg, ctx)
        stages.append(seeds)
        stats["seeds"] = seeds.stats()
        traces = trace_stage(seeds.kept, out, ctx)
        stats["samples_per_seed"] = ctx.teacher_cfg.n
        F.verify_stage(
            traces,
            dcfg.verifier,
            dcfg.on_unverifiable,
            ctx.selection.verify_workers,
            ctx.selection.code_max_tests,
        )
        if ctx.selection.dedup:
            F.dedup_stage(traces, with_response=True, near=None)
    else:
        traces = import_stage(name, dcfg, ctx)
    stages.append(traces)
    stats["traces"] = traces.stats()
    stats["kept"] = stats["traces"]["kept"]
    bad = [f"{e['id']}: {e['detail']}" for s in stages for e in s.log if e["reason"] == "bad_row"]
    if bad:  # the first few, so a malformed file shows up without opening removed.jsonl
        stats["bad_rows"] = bad[:20]
    write_records(out / "train.jsonl", (_clean(r) for r in traces.kept))
    write_json(out / "removed.jsonl", [{"stage": s.name, **e} for s in stages for e in s.log], lines=True)
    write_json(out / "stats.json", stats)
    return stats
