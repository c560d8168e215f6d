"""A persistent cache of greedy generations: a model already scored on a prompt is not run again.

    store = GenerationStore("outputs/eval_cache")          # generations.sqlite inside
    lm = cache_generations(lm, store, model_key(folder, settings))

Key = sha256 of (model key, prompt text, the request's generation settings); the model key hashes
the weights (*.safetensors), the files that shape the prompt's tokens and the decoding (config,
generation config, tokenizer, chat template) and the settings that move an output (dtype, device,
decoder, max length, library versions). Only greedy requests are cached: a sampled request (n
samples of one prompt share its key) always runs. SQLite (WAL) lets evaluations running side by
side share one store; rows are written once per `generate_until` call. The same store keeps the
outputs of the toy code task's reference programs (table `program`, branchmerge/eval/prefetch.py):
they depend on the test set and the sandbox, not on the model, so every later evaluation of the
set skips them.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

# files besides the weights that change which tokens a prompt becomes or how they decode
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def model_key(folder: Path, weights_hash: str, settings: dict[str, Any]) -> str:
    """sha256 over the weights' hash, MODEL_FILES' bytes (those present) and `settings`."""
    h = hashlib.sha256(weights_hash.encode())
    for name in MODEL_FILES:
        f = Path(folder) / name
        if f.exists():
            h.update(f"{name}:".encode() + f.read_bytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def request_key(model: str, prompt: str, gen_kwargs: dict) -> str:
    return hashlib.sha256(json.dumps([model, prompt, gen_kwargs], sort_keys=True).encode()).hexdigest()


class GenerationStore:
    """key -> generated text, in `<folder>/generations.sqlite`."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "generations.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS gen (key TEXT PRIMARY KEY, model TEXT, text TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS program (key TEXT PRIMARY KEY, output TEXT)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)

    def get(self, keys: list[str], table: str = "gen") -> dict[str, str]:
        """key -> stored text (gen) or program output (program) for the keys present."""
        column = {"gen": "text", "program": "output"}[table]
        found: dict[str, str] = {}
        with self._db() as db:
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, {column} FROM {table} WHERE key IN ({marks})"
                found.update(db.execute(query, chunk).fetchall())
        return found

    def put(self, rows: list[tuple[str, str, str]]) -> None:
        """rows: (key, model key, text)."""
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO gen VALUES (?, ?, ?)", rows)

    def put_outputs(self, rows: list[tuple[str, str]]) -> None:
        """rows: (program key, stdout of a program that ran to completion)."""
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO program VALUES (?, ?)", rows)


def is_sampled(gen_kwargs: dict) -> bool:
    return bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0


def cache_generations(lm: Any, store: GenerationStore, model: str) -> Any:
    """Serve lm.generate_until's greedy requests from `store`, run the rest and store them.

    `lm.generation_cache` counts {"hits", "misses", "sampled"} over the lm's life (a greedy prompt
    repeated within one call runs once and counts as hits after the first).
    """
    inner = lm.generate_until
    lm.generation_cache = {"path": str(store.path), "hits": 0, "misses": 0, "sampled": 0}
    counts = lm.generation_cache

    def generate_until(requests: list, disable_tqdm: bool = False) -> list[str]:
        keys = [None if is_sampled(r.args[1]) else request_key(model, *r.args[:2]) for r in requests]
        found = store.get([k for k in keys if k is not None])
        first: dict[str, int] = {}  # a greedy prompt repeated within the call runs once
        todo = [
            i for i, k in enumerate(keys) if k is None or (k not in found and first.setdefault(k, i) == i)
        ]
        outs = inner([requests[i] for i in todo], disable_tqdm=disable_tqdm) if todo else []
        ran = dict(zip(todo, outs))
        new = {keys[i]: ran[i] for i in todo if keys[i] is not None}
        store.put([(k, model, text) for k, text in new.items()])
        counts["sampled"] += sum(k is None for k in keys)
        counts["misses"] += len(new)
        counts["hits"] += len(requests) - len(todo)
        return [
            ran[i] if keys[i] is None else new.get(keys[i], found.get(keys[i])) for i in range(len(requests))
        ]

    lm.generate_until = generate_until
    return lm
