"""Merging models whose vocabularies differ (mergekit's `tokenizer_source` / `tokenizer:`).

    spec = {"source": "union" | "base" | <model>, "base": <model>,
            "tokens": {token: {"source": <model> | {"kind": "zero"}
                                         | {"kind": "model_token", "model": m, "token_id"|"token": ...},
                               "force": bool}},
            "pad_to_multiple_of": int | None}

The output tokenizer is the base's (`base`), a model's, or the union: the base's, plus every other
model's tokens it lacks (in model order), plus `tokens` it lacks. Each vocabulary tensor
(embed_tokens, lm_head: rows are tokens) of each input is re-indexed to the output vocabulary before
the merge: row j of model m = m's row of token j when m has it (and the token is not `force`d), else
the token's default row, as mergekit (tokenizer/embed.py) defines it:
    a `tokens` rule: zeros, model m's row of the same token, or of a given token / id of m;
    otherwise: the base's row if the base has the token; else the mean of the rows of the models
    that have it (one model: its row; none: zeros).
Rows past the vocabulary (`pad_to_multiple_of`) get the mean of the real rows. The arithmetic runs in
the compute dtype (mergekit's gather dtype). When every input already has exactly the output's
vocabulary and the same number of rows, nothing is re-indexed and padded rows stay (Qwen's 152064
rows for 151665 tokens; mergekit would cut them to the tokenizer's length).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from branchmerge.merge.io import Checkpoint, CheckpointError

log = logging.getLogger(__name__)
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def is_vocab_tensor(name: str) -> bool:
    """A tensor whose rows are tokens (axis 0)."""
    return name.endswith(VOCAB_TENSORS)


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def _load(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def _rows(ck: Checkpoint) -> int:
    """A model's vocabulary rows: config vocab_size, else its embedding's first dim."""
    emb = [i.shape[0] for n, i in ck.info.items() if is_vocab_tensor(n)]
    return int(ck.config.get("vocab_size") or (emb[0] if emb else 0))


@dataclass(frozen=True)
class Rule:
    """A `tokens` entry: `source` None = zeros; `token_id` None = the same token of `source`."""

    source: str | None
    token_id: int | None
    force: bool


class Vocabulary:
    """The output tokenizer and each model's row map (`perm[m][j]`: m's row of output token j, or −1)."""

    def __init__(self, spec: dict[str, Any], ckpts: dict[str, Checkpoint]) -> None:
        self.ckpts, self.base = ckpts, spec.get("base") or next(iter(ckpts))
        source = spec.get("source") or "base"
        self.pad = spec.get("pad_to_multiple_of")
        toks = self._tokenizers()
        if source == "union":
            out = self._union(toks)
        elif source == "base":
            out = _copy(toks[self.base])
        elif source in ckpts:
            out = _copy(toks[source])
        else:
            raise CheckpointError(
                f"tokenizer source '{source}' is neither union, base nor one of {sorted(ckpts)}"
            )
        for tok in spec.get("tokens") or {}:
            if tok not in out.get_vocab():
                out.add_tokens(tok)
        self.tokenizer, self.vocab = out, out.get_vocab()
        n = len(self.vocab)
        self.rows = n if not self.pad or n % self.pad == 0 else (n // self.pad + 1) * self.pad
        self.original = {m: t.get_vocab() for m, t in toks.items()}
        self.perm = {m: self._perm(m) for m in ckpts}
        self.rules = {t: _rule(t, r, ckpts) for t, r in (spec.get("tokens") or {}).items()}
        self.forced = torch.zeros(n, dtype=torch.bool)
        for t, r in self.rules.items():
            self.forced[self.vocab[t]] = r.force
        self.identity = not self.rules and self.rows == n and self._same_everywhere()

    # ---- building --------------------------------------------------------------------------------
    def _tokenizers(self) -> dict[str, Any]:
        """Every model's tokenizer; a model without one is assumed to have the base's (as mergekit)."""
        if not has_tokenizer(self.ckpts[self.base].path):
            raise CheckpointError(
                f"{self.ckpts[self.base].path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}): a "
                "tokenizer source needs the base model's tokenizer"
            )
        toks = {self.base: _load(self.ckpts[self.base].path)}
        for m, ck in self.ckpts.items():
            if m not in toks:
                if has_tokenizer(ck.path):
                    toks[m] = _load(ck.path)
                else:
                    log.warning("%s has no tokenizer; assuming the base's (%s)", ck.path, self.base)
                    toks[m] = toks[self.base]
        for m, t in toks.items():
            beyond = [tok for tok, i in t.get_vocab().items() if i >= _rows(self.ckpts[m])]
            if beyond and m == self.base:
                raise CheckpointError(
                    f"{self.ckpts[m].path}: tokenizer has {len(beyond)} token(s) past vocab_size "
                    f"{_rows(self.ckpts[m])} (e.g. {beyond[0]!r}); add their rows or remove them"
                )
        return toks

    def _union(self, toks: dict[str, Any]):
        """The base's tokenizer plus every other model's regular tokens, then added tokens, it lacks."""
        out = _copy(toks[self.base])
        have = set(out.get_vocab())
        added: dict[str, Any] = {}
        for m, t in toks.items():
            rows, special = _rows(self.ckpts[m]), {a.content for a in t.added_tokens_decoder.values()}
            for tok, i in t.get_vocab().items():
                if i < rows and tok not in special and tok not in have:
                    out.add_tokens(tok)
                    have.add(tok)
            for i, info in t.added_tokens_decoder.items():
                if i < rows:
                    added.setdefault(info.content, info)
        for content, info in added.items():
            if content not in have:
                out.add_tokens(info)
                have.add(content)
        return out

    def _perm(self, m: str) -> torch.Tensor:
        """(n,) m's row of each output token, −1 where m lacks it (or its id is past m's rows)."""
        own, rows = self.original[m], _rows(self.ckpts[m])
        p = torch.full((len(self.vocab),), -1, dtype=torch.long)
        for tok, j in self.vocab.items():
            i = own.get(tok, -1)
            p[j] = i if i < rows else -1
        return p

    def _same_everywhere(self) -> bool:
        n = len(self.vocab)
        ids = torch.arange(n)
        return len({_rows(ck) for ck in self.ckpts.values()}) == 1 and all(
            bool((p == ids).all()) and len(self.original[m]) == n for m, p in self.perm.items()
        )

    # ---- per tensor ------------------------------------------------------------------------------
    def align(
        self, tensors: dict[str, torch.Tensor], base: str | None, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Each model's vocabulary tensor (rows_m, …) -> (rows, …) in the output's token order, in
        `dtype`; rows a model lacks take the token's default (module docstring)."""
        models, n = list(tensors), len(self.vocab)
        perm = torch.stack([self.perm[m] for m in models])  # (M, n)
        present = perm >= 0
        need = (~present.all(0) | self.forced).nonzero().flatten()
        fill = self._defaults(tensors, perm[:, need], need, base, dtype)
        out = {}
        for i, m in enumerate(models):
            t = tensors[m]
            o = torch.zeros((self.rows, *t.shape[1:]), dtype=dtype, device=t.device)
            keep = present[i] & ~self.forced
            rows = keep.nonzero().flatten()
            o[rows] = t[perm[i][rows]].to(dtype)
            own = keep[need]
            o[need[~own]] = fill[~own]
            if self.rows > n:
                o[n:] = o[:n].mean(0)
            out[m] = o
        return out

    def _defaults(
        self, tensors, perm: torch.Tensor, ids: torch.Tensor, base: str | None, dtype
    ) -> torch.Tensor:
        """(len(ids), …) default rows of output tokens `ids` (perm: (M, len(ids)) those columns)."""
        models = list(tensors)
        t0 = tensors[models[0]]
        acc = torch.zeros((len(ids), *t0.shape[1:]), dtype=dtype, device=t0.device)
        count = torch.zeros(len(ids), dtype=dtype, device=t0.device)
        for i, m in enumerate(models):  # sum in model order, then divide: mergekit's rounding
            have = perm[i] >= 0
            acc[have] = acc[have] + tensors[m][perm[i][have]].to(dtype)
            count += have.to(dtype)
        acc /= count.clamp_min(1).view(-1, *[1] * (acc.dim() - 1))
        if base in tensors:
            b = models.index(base)
            have = perm[b] >= 0
            acc[have] = tensors[base][perm[b][have]].to(dtype)
        tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        for k, tok in enumerate(tokens):
            if tok in self.rules:
                acc[k] = self._rule_row(tok, tensors, dtype, t0)
        return acc

    def _rule_row(self, tok: str, tensors: dict, dtype, t0: torch.Tensor) -> torch.Tensor:
        r = self.rules[tok]
        if r.source is None:
            return torch.zeros(t0.shape[1:], dtype=dtype)
        if r.source not in tensors:
            raise CheckpointError(
                f"tokens: '{tok}' takes its row from '{r.source}', which this tensor does not read"
            )
        i = r.token_id if r.token_id is not None else int(self.perm[r.source][self.vocab[tok]])
        if i < 0:
            raise CheckpointError(
                f"tokens: '{tok}' takes its row from '{r.source}', whose vocabulary lacks it"
            )
        return tensors[r.source][i].to(dtype)

    def save(self, folder: Path) -> None:
        """Write the output tokenizer (over the copied one)."""
        self.tokenizer.save_pretrained(str(folder))


def build(spec: dict[str, Any] | None, ckpts: dict[str, Checkpoint]) -> Vocabulary | None:
    """The output vocabulary `spec` asks for; None when there is nothing to re-index (no spec, or no
    input has a tokenizer and every input has the same rows: the copied files stay)."""
    if not spec:
        return None
    plain = not spec.get("tokens") and not spec.get("pad_to_multiple_of")
    no_files = not any(has_tokenizer(ck.path) for ck in ckpts.values())
    if plain and no_files and len({_rows(ck) for ck in ckpts.values()}) == 1:
        return None
    return Vocabulary(spec, ckpts)


def _copy(tok):
    """A fresh copy of a tokenizer (adding tokens must not change the source's)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, use_fast=True)


def _rule(tok: str, raw: dict, ckpts: dict[str, Checkpoint]) -> Rule:
    """A `tokens` entry -> Rule; a model it names must be one of the inputs."""
    src, force = (raw or {}).get("source"), bool((raw or {}).get("force", False))
    if isinstance(src, dict) and src.get("kind") == "zero":
        return Rule(None, None, force)
    token_id = None
    if isinstance(src, dict) and src.get("kind") == "model_token":
        model = str(src.get("model"))
        if model not in ckpts:
            raise CheckpointError(f"tokens: '{tok}': model '{model}' is not one of {sorted(ckpts)}")
        if src.get("token") is not None:
            if has_tokenizer(ckpts[model].path):
                vocab = _load(ckpts[model].path).get_vocab()
            else:
                raise CheckpointError(
                    f"tokens: '{tok}': {ckpts[model].path} has no tokenizer to look up {src['token']!r}"
                )
            if src["token"] not in vocab:
                raise CheckpointError(
                    f"tokens: '{tok}': token {src['token']!r} is not in {model}'s vocabulary"
                )
            token_id = vocab[src["token"]]
        else:
            token_id = int(src["token_id"])
        return Rule(model, token_id, force)
    if isinstance(src, str) and src in ckpts:
        return Rule(src, None, force)
    raise CheckpointError(
        f"tokens: '{tok}': source {src!r} is not a model of {sorted(ckpts)}, {{kind: zero}} or "
        "{kind: model_token, model, token_id | token}"
    )
