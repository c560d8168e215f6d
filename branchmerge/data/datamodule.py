"""LightningDataModule for branch SFT: records -> cached token Arrow -> packed rows -> step batches.

    dm = BranchDataModule(cfg.data, tokenizer, cfg.trainer, cache_dir, world_size)
    dm.prepare_data(); dm.setup("fit")
    for step_batch in dm.train_dataloader():   # one item = one optimizer step for this rank
        step_batch["micro_batches"]            # list of model-input dicts (accumulation steps)
        step_batch["n_label_tokens"]           # label tokens in the *global* batch (loss normaliser)

Tokenization runs once through `datasets` (Arrow on disk, memory-mapped, `map` with num_proc worker
processes, cached by content fingerprint) and is reused by every later run on the same data.
The data order is a pure function of (seed, epoch), and the loader is stateful: its position is the
number of optimizer steps done, so a run resumed mid-epoch continues with exactly the next batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
from datasets import Dataset, concatenate_datasets

from branchmerge.data.packing import collate_packed, collate_padded, pack, packing_efficiency
from branchmerge.data.records import read_records, read_records_counted
from branchmerge.data.tokenize import encode_messages
from branchmerge.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


ENCODE_VERSION = 2  # bump when encode_messages or _encode changes what it produces


def tokenizer_key(tokenizer: Any) -> str:
    """A content hash of the tokenizer (vocabulary, merges, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _records_gen(path: str, key: str, on_bad_row: str):
    """Generator for Dataset.from_generator (the key makes the cache follow the file's content)."""
    if on_bad_row == "skip":
        recs, _ = read_records_counted(path, require_response=True)
    else:
        recs = read_records(path, require_response=True)
    for r in recs:
        yield {"id": r.id, "domain": r.domain, "messages": r.messages}


def _encode(row: dict, tokenizer: Any, template: str) -> dict:
    enc = encode_messages(row["messages"], tokenizer, template)
    n_learn = sum(1 for x in enc["labels"] if x != -100)
    n_label = sum(1 for x in enc["labels"][1:] if x != -100)  # what the loss counts (first token masked)
    return {**enc, "length": len(enc["input_ids"]), "n_learn": n_learn, "n_label": n_label}


class StepLoader:
    """Yields one step batch per optimizer step; `state_dict` = steps done (resumes mid-epoch).

    Its length is the run's planned steps whatever the resume point: Lightning restores its own count
    of batches done and compares it with this length, so a resumed run ends at the planned step."""

    def __init__(
        self, n_steps: int, make_batch: Callable[[int], dict], steps_done: Callable[[], int]
    ) -> None:
        self.n_steps, self.make_batch, self.steps_done = n_steps, make_batch, steps_done
        self.start = 0

    def __len__(self) -> int:
        return self.n_steps

    def __iter__(self) -> Iterator[dict]:
        for step in range(self.start, self.n_steps):
            yield self.make_batch(step)

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done()}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["steps_done"])


class BranchDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_cfg: Any,
        tokenizer: Any,
        trainer_cfg: Any,
        cache_dir: str | Path,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.data_cfg, self.tokenizer, self.trainer_cfg = data_cfg, tokenizer, trainer_cfg
        self.cache_dir = Path(cache_dir)
        self.world_size, self.rank = world_size, rank
        self.stats: dict[str, Any] = {}
        self.docs: Dataset | None = None

    # ---- tokenization (cached) ------------------------------------------------------------------
    def _tokenized(self) -> Dataset:
        cfg = self.data_cfg
        parts, skipped = [], 0
        for f in cfg.train_files:
            path = Path(f)
            if not path.is_file():
                raise MissingFileError(
                    f"training file {path} does not exist (data.train_files). For the toy world run "
                    "`python distill.py +experiment=toy_data` first; for real data see README 'Datasets'."
                )
            if cfg.on_bad_row == "skip":
                skipped += len(read_records_counted(path, require_response=True)[1])
            raw = Dataset.from_generator(
                _records_gen,
                gen_kwargs={"path": str(path), "key": _file_key(path), "on_bad_row": cfg.on_bad_row},
                cache_dir=str(self.cache_dir),
            )
            if cfg.max_records is not None:
                raw = raw.select(range(min(cfg.max_records, len(raw))))
            key = hashlib.sha256(
                f"{_file_key(path)}|{cfg.template}|{cfg.max_records}|{tokenizer_key(self.tokenizer)}|"
                f"{ENCODE_VERSION}".encode()
            ).hexdigest()[:20]
            cache_file = self.cache_dir / "tokenized" / f"{path.stem}-{key}.arrow"
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            parts.append(
                raw.map(
                    _encode,
                    fn_kwargs={"tokenizer": self.tokenizer, "template": cfg.template},
                    remove_columns=["messages"],
                    num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                    cache_file_name=str(cache_file),
                    new_fingerprint=key,
                    load_from_cache_file=True,
                    desc=f"tokenizing {path.name}",
                )
            )
        self.stats["bad_rows_skipped"] = skipped
        return concatenate_datasets(parts)

    def prepare_data(self) -> None:
        self._tokenized()  # fills the cache once (rank 0); setup() then reads it on every rank

    # ---- plan: rows per epoch, steps ------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.docs is not None:
            return
        if self.trainer is not None:
            self.world_size, self.rank = self.trainer.world_size, self.trainer.global_rank
        cfg, tcfg = self.data_cfg, self.trainer_cfg
        docs = self._tokenized()
        lengths = docs["length"]
        n_learn = docs["n_learn"]
        over = [i for i, n in enumerate(lengths) if n > cfg.max_length]
        no_learn = [i for i, n in enumerate(n_learn) if n == 0]
        if no_learn:
            raise DataError(
                f"{len(no_learn)} records have no assistant tokens to learn from "
                f"(first: {docs[no_learn[0]]['id']})"
            )
        self.keep = [
            i for i in range(len(docs)) if not (cfg.overlong == "drop" and lengths[i] > cfg.max_length)
        ]
        self.lengths = [min(n, cfg.max_length) for n in lengths]
        self.docs = docs
        per_step = tcfg.micro_batch_size * self.world_size
        if tcfg.global_batch_size % per_step:
            raise ConfigError(
                f"trainer.global_batch_size={tcfg.global_batch_size} is not a multiple of micro_batch_size "
                f"({tcfg.micro_batch_size}) x world size ({self.world_size}); pick a multiple of {per_step}"
            )
        self.accumulation = tcfg.global_batch_size // per_step
        self.rows_by_epoch: dict[int, list[list[int]]] = {}
        rows0 = self._rows(0)
        self.steps_per_epoch, self.total_steps = self._plan_steps(len(rows0))
        self.label_counts = self._label_counts(docs)
        kept_lengths = [self.lengths[i] for i in self.keep]
        self.stats.update(
            {
                "records": len(docs),
                "overlong": len(over),
                "overlong_action": cfg.overlong,
                "dropped": len(docs) - len(self.keep),
                "truncated": len(over) if cfg.overlong == "truncate" else 0,
                "tokens": sum(kept_lengths),
                "learned_tokens": sum(n_learn[i] for i in self.keep),
                "rows_per_epoch": len(rows0),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "accumulation": self.accumulation,
                "packing_efficiency": (
                    packing_efficiency(self.lengths, rows0, cfg.max_length) if cfg.packing else None
                ),
            }
        )

    def _plan_steps(self, rows0: int) -> tuple[int, int]:
        """(steps per epoch, total steps): every epoch is repacked with its own seed and may hold fewer
        rows than epoch 0, so an epoch's steps are the fewest full global batches any planned epoch
        packs (the rows past them are left out, like a dropped last batch). Every rank computes the
        same plan, so every rank runs the same number of micro-batches."""
        g, tcfg = self.trainer_cfg.global_batch_size, self.trainer_cfg
        per_epoch = rows0 // g
        if per_epoch == 0:
            raise ConfigError(
                f"only {rows0} rows for a global batch of {g}: lower trainer.global_batch_size or add data"
            )
        checked = 1
        while True:
            total = tcfg.max_steps if tcfg.max_steps > 0 else math.ceil(tcfg.epochs * per_epoch)
            epochs = math.ceil(total / per_epoch)
            if checked >= epochs:
                return per_epoch, total
            per_epoch = min(per_epoch, len(self._rows(checked)) // g)
            checked += 1

    def _label_counts(self, docs: Dataset) -> list[int]:
        """Per document: the label tokens the loss counts (labels[1:n] that are not -100, n = its kept
        length), so a step's global normaliser reads no other rank's documents. Only truncated
        documents are read again."""
        counts = list(docs["n_label"])
        for i, n in enumerate(docs["length"]):
            if n > self.lengths[i]:
                labels = docs[i]["labels"]
                counts[i] = sum(1 for x in labels[1 : self.lengths[i]] if x != -100)
        return counts

    def _rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self.rows_by_epoch:
            seed = self.data_cfg.shuffle_seed * 1000 + epoch
            if self.data_cfg.packing:
                sub = pack([self.lengths[i] for i in self.keep], self.data_cfg.max_length, seed)
                self.rows_by_epoch[epoch] = [[self.keep[j] for j in row] for row in sub]
            else:
                import random

                order = list(self.keep)
                random.Random(seed).shuffle(order)
                self.rows_by_epoch[epoch] = [[i] for i in order]
            self.rows_by_epoch = {epoch: self.rows_by_epoch[epoch]}  # keep one epoch in memory
        return self.rows_by_epoch[epoch]

    def _doc(self, i: int) -> dict:
        d = self.docs[i]
        n = self.lengths[i]
        return {"input_ids": d["input_ids"][:n], "labels": d["labels"][:n]}

    def step_batch(self, step: int) -> dict:
        """Everything this rank needs for optimizer step `step` (global, 0-based)."""
        g = self.trainer_cfg.global_batch_size
        epoch, offset = divmod(step, self.steps_per_epoch)
        rows = self._rows(epoch)[offset * g : (offset + 1) * g]
        n_label = sum(self.label_counts[i] for row in rows for i in row)
        n_tokens = sum(self.lengths[i] for row in rows for i in row)
        if self.data_cfg.packing and self.data_cfg.cross_document_attention:
            spans = [sum(self.lengths[i] for i in row) for row in rows]  # attention runs over the row
        else:
            spans = [self.lengths[i] for row in rows for i in row]
        mine = [[self._doc(i) for i in row] for row in rows[self.rank :: self.world_size]]
        mb = self.trainer_cfg.micro_batch_size
        pad = self.tokenizer.pad_token_id
        micro = []
        for k in range(0, len(mine), mb):
            chunk = mine[k : k + mb]
            if self.data_cfg.packing:
                micro.append(
                    collate_packed(
                        chunk, self.data_cfg.max_length, pad, self.data_cfg.cross_document_attention
                    )
                )
            else:
                micro.append(collate_padded([row[0] for row in chunk], pad))
        return {
            "micro_batches": micro,
            "n_label_tokens": n_label,
            "n_tokens": n_tokens,
            "attn_spans": spans,
            "step": step,
            "epoch": epoch,
        }

    def train_dataloader(self) -> StepLoader:
        trainer = self.trainer
        return StepLoader(
            self.total_steps,
            self.step_batch,
            steps_done=lambda: trainer.global_step if trainer is not None else 0,
        )
