"""Build the toy world on disk: per-domain datasets in the record schema, and the tokenizer.

    <out>/data/<domain>/{test,train,base,val}.jsonl   records (test: the fixed held-out set; val: the
                                                  held-out set sweeps select on)
    <out>/tokenizer/                              HF tokenizer (byte-level BPE, ChatML template)
    <out>/manifest.json                           sizes, seeds, knobs, file hashes, the disjointness
                                                  check and the teacher/verifier agreement

Splits are generated in order (test first, then the others) from independent seeded streams; an item
whose prompt already appeared in an earlier split is regenerated, so no test prompt is ever trained on.
Every split is checked disjoint from every other after writing, not assumed. The held-out splits
(test and val) are never seen by the tokenizer's training either, and val comes last, so adding or
resizing it changes no other split and not the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from branchmerge.data.chat import CHATML
from branchmerge.data.records import Record, read_records, write_records
from branchmerge.foundation import file_hash
from branchmerge.toy.domains import Problem, check_knobs, get_domain
from branchmerge.toy.tokenizer import save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)
GENERATOR_VERSION = 2  # bump whenever a domain's problems or traces change: a built world is then rebuilt
HELD_OUT = ("test", "val")  # evaluation splits: no tokenizer or model is ever trained on them


@dataclass(frozen=True)
class SplitSpec:
    name: str
    size: int


def _stream_seed(seed: int, domain: str, split: str) -> int:
    digest = hashlib.sha256(f"{seed}/{domain}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def problem_to_record(p: Problem, domain: str, split: str, index: int, with_response: bool = True) -> Record:
    messages = [{"role": "user", "content": p.prompt}]
    if with_response:
        messages.append({"role": "assistant", "content": p.trace})
    return Record(
        id=f"toy-{domain}-{split}-{index:06d}",
        domain=domain,
        source=f"toy/{domain}",
        messages=messages,
        reference=p.reference,
        metadata={**p.meta, "split": split},
    )


def generate_split(
    domain: str, split: str, size: int, seed: int, knobs: Mapping, seen: set[str], max_tries_factor: int = 50
) -> list[Problem]:
    """`size` problems whose prompts are not in `seen` (which is updated)."""
    dom = get_domain(domain)
    knobs = check_knobs(dom, dict(knobs))
    rng = random.Random(_stream_seed(seed, domain, split))
    out: list[Problem] = []
    tries = 0
    while len(out) < size:
        tries += 1
        if tries > size * max_tries_factor:
            raise RuntimeError(
                f"toy domain '{domain}' produced only {len(out)} distinct prompts for split '{split}' "
                f"after {tries} tries; raise its difficulty knobs or lower the split size"
            )
        p = dom.generate(rng, **knobs)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


@lru_cache(maxsize=1)
def _chatml():
    import jinja2

    return jinja2.Environment().from_string(CHATML)


def render_chat(record: Record) -> str:
    """The record as ChatML text (what the tokenizer is trained on and must round-trip)."""
    return _chatml().render(messages=record.messages, add_generation_prompt=False)


def check_disjoint(files: Mapping[str, Path]) -> dict[str, int]:
    """Prompt overlap between every pair of split files (all zero for a valid world)."""
    prompts = {name: {r.prompt for r in read_records(p)} for name, p in files.items()}
    names = sorted(prompts)
    return {f"{a}&{b}": len(prompts[a] & prompts[b]) for i, a in enumerate(names) for b in names[i + 1 :]}


def teacher_verifier_agreement(domain: str, records: list[Record], sample: int | None, seed: int) -> dict:
    """Run the domain verifier on the teacher's own traces: how many it accepts (should be all)."""
    dom = get_domain(domain)
    if sample is not None and sample < len(records):
        records = random.Random(seed).sample(records, sample)
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:  # code runs in subprocesses
        verdicts = pool.map(lambda r: dom.verify(r.response or "", r.reference, r.metadata), records)
        accepted = sum(verdicts)
    return {"checked": len(records), "accepted": accepted}


def build_world(
    out_dir: str | Path,
    *,
    seed: int,
    domains: Mapping[str, Mapping],
    splits: list[SplitSpec],
    vocab_size: int = 1024,
    verify_sample: int | None = 500,
    overwrite: bool = False,
) -> dict:
    """Write datasets, tokenizer and manifest under `out_dir`; reuse a finished world with the same spec."""
    out = Path(out_dir)
    spec = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "domains": {d: dict(k) for d, k in domains.items()},
        "splits": [[s.name, s.size] for s in splits],
        "vocab_size": vocab_size,
    }
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not overwrite:
        old = json.loads(manifest_path.read_text())
        if old.get("spec") == spec and all((out / f).exists() for f in old["files"].values()):
            log.info("toy world at %s is complete and matches the config; reusing it", out)
            return old
    t0 = time.time()
    files: dict[str, Path] = {}
    sizes: dict[str, dict[str, int]] = {}
    agreement: dict[str, dict] = {}
    train_texts: list[str] = []
    for domain, knobs in domains.items():
        seen: set[str] = set()
        sizes[domain] = {}
        for split in splits:
            problems = generate_split(domain, split.name, split.size, seed, knobs, seen)
            records = [problem_to_record(p, domain, split.name, i) for i, p in enumerate(problems)]
            path = out / "data" / domain / f"{split.name}.jsonl"
            sizes[domain][split.name] = write_records(path, records)
            files[f"{domain}/{split.name}"] = path
            held_out = split.name in HELD_OUT
            agreement[f"{domain}/{split.name}"] = teacher_verifier_agreement(
                domain, records, None if held_out else verify_sample, seed
            )
            if not held_out:
                train_texts.extend(render_chat(r) for r in records)
    overlap = {}
    for domain in domains:
        overlap.update(
            {
                f"{domain}:{k}": v
                for k, v in check_disjoint({s.name: files[f"{domain}/{s.name}"] for s in splits}).items()
            }
        )
    if any(overlap.values()):
        raise RuntimeError(
            f"toy splits overlap (prompt collisions): { {k: v for k, v in overlap.items() if v} }"
        )
    tok = train_tokenizer(train_texts, vocab_size=vocab_size)
    save_tokenizer(tok, out / "tokenizer")
    manifest = {
        "spec": spec,
        "sizes": sizes,
        "files": {k: str(p.relative_to(out)) for k, p in files.items()},
        "sha256": {k: file_hash(p, "sha256") for k, p in files.items()},
        "split_overlap": overlap,
        "teacher_verifier_agreement": agreement,
        "tokenizer": {"path": "tokenizer", "n_tokens": len(tok)},
        "build_seconds": round(time.time() - t0, 2),
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(manifest_path)
    return manifest


def check_knobs_all(domains: Mapping[str, Mapping]) -> None:
    """Fail early, naming the domain and knob, before any generation starts."""
    for name, knobs in domains.items():
        check_knobs(get_domain(name), dict(knobs))
