"""ACM's activation pass (Yao et al. 2025, arXiv 2505.14009): per decoder layer, how much of the base's
hidden states each branch's still carries on calibration rows, turned into that layer's coefficient.
Run by merge.py before the streaming merge for every `method: acm` input without a `coef`
(`branchmerge.merge.run`); the engine itself never instantiates a model.

    rows     calibration.files read in turn (the dataset record schema), rendered with the chat template,
             tokenized by the base's tokenizer, cut to max_tokens; every model sees the same tokens
    a_m(ℓ)   decoder layer ℓ's output hidden states of model m, all rows' tokens end to end: (T, H)
    S        `samples` (token, channel) entries of that matrix, drawn once (seeded), the same in every
             model and layer
    NMI_iℓ = I(X; Y) / sqrt(H(X) H(Y)),  X, Y = the S entries of a_B(ℓ), a_i(ℓ) under `bins`
             equal-frequency bins of each model (plug-in estimate from the bins × bins histogram)
    c_iℓ = 1 − NMI_iℓ            a layer the branch left redundant with the base gets little weight,
                                 a layer that diverged keeps its task vector
    c_i  = mean_ℓ c_iℓ           for tensors outside the decoder layers (embeddings, final norm, lm_head)

Memory: one model at a time (the base first, then each branch), each forwarded once over the rows, one
row at a time; only the S sampled values per layer are kept (L × S floats per model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from branchmerge.data.records import read_records_counted
from branchmerge.data.tokenize import encode_messages
from branchmerge.errors import CheckpointError, DataError, MergeRecipeError, MissingFileError
from branchmerge.foundation import file_hash

log = logging.getLogger(__name__)


# ---- which inputs need the pass ----------------------------------------------------------------------
def _coef(step, inp) -> Any:
    return inp.params.get("coef", step.params.get("coef"))


def pending(steps) -> list[tuple[Any, Any]]:
    """(step, input) of every input whose method reads activations and that has no `coef` yet."""
    return [(s, i) for s in steps if s.method.needs_activations for i in s.inputs if _coef(s, i) is None]


def check(steps, models: dict[str, Path], files: list[str]) -> None:
    """Every problem with the activation pass's inputs at once, before anything runs."""
    todo = pending(steps)
    for f in map(Path, files if todo else []):
        if not f.is_file():
            raise MissingFileError(
                f"calibration file {f} does not exist: set calibration.files to JSONL record files "
                "(e.g. the branches' train splits)"
            )
    problems = []
    if todo and not files:
        s, i = todo[0]
        problems.append(
            f"step {s.name}: {s.method.name} needs per-layer coefficients for '{i.ref}': give "
            "calibration.files=[<records.jsonl>] (the activation pass), or `coef` per input"
        )
    for s, i in todo:
        for ref in (i.ref, s.base):
            if ref not in models:
                problems.append(
                    f"step {s.name}: the activation pass forwards checkpoints, '{ref}' is a step "
                    f"(save it and merge from the folder, or give `coef` for '{i.ref}')"
                )
    if problems:
        raise MergeRecipeError("cannot run the activation pass:\n" + "\n".join(f"  - {p}" for p in problems))


# ---- calibration rows --------------------------------------------------------------------------------
def calibration_rows(cal, tokenizer) -> list[list[int]]:
    """Token ids of the first `rows` records, taken in turn from each file, each cut to `max_tokens`."""
    groups = []
    for f in map(Path, cal.files):
        recs, skipped = read_records_counted(f)
        if skipped:
            raise DataError(f"{skipped[0]} (a calibration row: fix or remove it)")
        if not recs:
            raise DataError(f"calibration file {f} holds no records: give a JSONL file of records")
        groups.append(recs)
    chosen = [r for turn in zip_longest(*groups) for r in turn if r is not None][: cal.rows]
    ids = [
        encode_messages(r.messages, tokenizer, cal.template)["input_ids"][: cal.max_tokens] for r in chosen
    ]
    ids = [x for x in ids if x]
    if not ids:
        raise DataError(f"calibration files {list(cal.files)} give no tokens: give records with text")
    return ids


def sample_positions(n_tokens: int, hidden: int, samples: int, seed: int) -> torch.Tensor:
    """Sorted flat indices into a layer's (n_tokens × hidden) outputs: all of them when there are at most
    `samples`, else `samples` distinct ones drawn uniformly (seeded; from 16× more entries on, by draws
    with replacement whose repeats, under 1/32 of them, are dropped)."""
    total = n_tokens * hidden
    if total <= samples:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    if total <= 16 * samples:
        return torch.randperm(total, generator=g)[:samples].sort().values
    return torch.randint(total, (samples,), generator=g).unique()


# ---- one model's forward pass ------------------------------------------------------------------------
def _decoder_layers(model, where: Path) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        raise CheckpointError(
            f"{where}: no decoder layers at model.model.layers; ACM reads decoder-only models (Qwen2, Llama)"
        )
    return layers


@torch.no_grad()
def layer_samples(model_dir: Path, rows: list[list[int]], positions: torch.Tensor, cal, progress=False):
    """(L, S) float32: every decoder layer's output at the sampled entries (rows' tokens end to end)."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(cal.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cal.dtype)).to(dev).eval()
    layers, hidden = _decoder_layers(model, model_dir), model.config.hidden_size
    out = torch.empty(len(layers), positions.numel())
    at: dict[str, Any] = {}  # this row's (token, channel) picks and their slots in `out`

    def keep(k: int):
        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            out[k, at["a"] : at["z"]] = h[0, at["tok"], at["ch"]].float().cpu()

        return hook

    hooks = [layer.register_forward_hook(keep(k)) for k, layer in enumerate(layers)]
    try:
        start = 0  # flat index of this row's first entry
        for r, ids in enumerate(tqdm(rows, desc=f"activations {model_dir.name}", disable=not progress)):
            stop = start + len(ids) * hidden
            a, z = torch.searchsorted(positions, torch.tensor([start, stop])).tolist()
            local = positions[a:z] - start
            at.update(a=a, z=z, tok=(local // hidden).to(dev), ch=(local % hidden).to(dev))
            model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
            if not torch.isfinite(out[:, a:z]).all():
                raise CheckpointError(f"{model_dir}: NaN or Inf hidden states on calibration row {r}")
            start = stop
    finally:
        for h in hooks:
            h.remove()
    return out


# ---- the estimate ------------------------------------------------------------------------------------
def equal_frequency_bins(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Each entry's bin: rank · bins // n (ties ranked by position), so every bin holds n/bins entries."""
    n = x.numel()
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(x, stable=True)] = torch.arange(n)
    return rank * bins // n


def normalized_mutual_information(x: torch.Tensor, y: torch.Tensor, bins: int) -> float:
    """I(X; Y) / sqrt(H(X) H(Y)) in [0, 1] for paired samples x, y, each cut into equal-frequency bins:
    1 when one determines the other's bin, about 0 when independent."""
    bx, by = equal_frequency_bins(x, bins), equal_frequency_bins(y, bins)
    joint = torch.bincount(bx * bins + by, minlength=bins * bins).double().reshape(bins, bins) / x.numel()

    def entropy(p: torch.Tensor) -> torch.Tensor:
        p = p[p > 0]
        return -(p * p.log()).sum()

    hx, hy = entropy(joint.sum(1)), entropy(joint.sum(0))
    if hx <= 0 or hy <= 0:
        return 0.0
    return float(((hx + hy - entropy(joint.flatten())) / (hx * hy).sqrt()).clamp(0.0, 1.0))


def coef_map(coef: list[float]) -> dict[str, float]:
    """The per-model `coef` parameter: a module-name pattern per decoder layer, the mean elsewhere."""
    return {**{f".layers.{k}.": c for k, c in enumerate(coef)}, "default": sum(coef) / len(coef)}


# ---- the pass ----------------------------------------------------------------------------------------
def _key(cal, models: dict[str, Path], refs: set[str]) -> str:
    """What the coefficients depend on: the settings, the calibration files and the models' weights."""
    from branchmerge.merge.io import Checkpoint

    settings = {k: v for k, v in dataclasses.asdict(cal).items() if k not in ("files", "device")}
    weights = {r: {f.name: file_hash(f) for f in Checkpoint(models[r]).files()} for r in sorted(refs)}
    files = {f: file_hash(Path(f)) for f in cal.files}
    blob = json.dumps([settings, files, weights], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def prepare(
    steps, models: dict[str, Path], cal, cached: dict | None = None, hashed: bool = True, progress=False
) -> dict:
    """Fill `coef` of every input that needs it (`pending`); returns the record merge_provenance.json
    keeps under "acm". `cal`: a CalibrationConfig. A `cached` record (the output's previous provenance)
    with the same key is reused instead of forwarding any model; `hashed=False` (options.hash_inputs)
    hashes nothing and reuses nothing."""
    todo = pending(steps)
    check(steps, models, list(cal.files))
    pairs = {(s.base, i.ref) for s, i in todo}
    key = _key(cal, models, {r for p in pairs for r in p}) if hashed else None
    reuse = key is not None and cached is not None and cached.get("key") == key
    if reuse and all(f"{b}->{m}" in cached["pairs"] for b, m in pairs):
        log.info("ACM: reusing the coefficients in the output's provenance (same models and calibration)")
        record = cached
    else:
        record = _measure(sorted(pairs), models, cal, key, progress)
    for s, i in todo:
        i.params["coef"] = coef_map(record["pairs"][f"{s.base}->{i.ref}"]["coef"])
    return record


def _measure(pairs: list[tuple[str, str]], models: dict[str, Path], cal, key, progress: bool) -> dict:
    """Forward each base, then its branches, one model at a time; NMI and coefficients per pair."""
    from transformers import AutoTokenizer

    t0 = time.time()
    record: dict[str, Any] = {"key": key, "calibration": dataclasses.asdict(cal), "pairs": {}}
    record["calibration"]["files"] = calibration_hashes(cal.files)
    for base in sorted({b for b, _ in pairs}):
        rows = calibration_rows(cal, AutoTokenizer.from_pretrained(models[base]))
        hidden = json.loads((models[base] / "config.json").read_text())["hidden_size"]
        positions = sample_positions(sum(map(len, rows)), hidden, cal.samples, cal.seed)
        ref = layer_samples(models[base], rows, positions, cal, progress)
        record.update(rows=len(rows), tokens=sum(map(len, rows)), samples=positions.numel())
        for _, branch in (p for p in pairs if p[0] == base):
            vals = layer_samples(models[branch], rows, positions, cal, progress)
            if vals.shape != ref.shape:
                raise CheckpointError(
                    f"{models[branch]}: {vals.shape[0]} decoder layers, {models[base]} has {ref.shape[0]}: "
                    "ACM pairs layers one to one (merge branches of the same architecture)"
                )
            nmi = [normalized_mutual_information(x, y, cal.bins) for x, y in zip(ref, vals)]
            record["pairs"][f"{base}->{branch}"] = {"nmi": nmi, "coef": [1.0 - v for v in nmi]}
            log.info("ACM %s -> %s: coefficients %s", base, branch, [round(1 - v, 3) for v in nmi])
    record["seconds"] = round(time.time() - t0, 3)
    return record


def calibration_hashes(files: list[str]) -> dict[str, str]:
    """Content hash of every calibration file, as the provenance records them (to reuse a merge)."""
    return {f: file_hash(Path(f)) for f in files if Path(f).is_file()}
