"""Where every output tensor comes from: output name -> (the steps that make it, each model's source
tensor name, the depth t its per-layer parameters are read at). The engine only reads this map.

Plain recipe (`inputs`): every tensor of the inputs, read under its own name, through every step.
A step with `slices` (mergekit's layer stacking; recipe.py's docstring has the format):

    output layers = slice 0's layers ++ slice 1's ++ ...      (renumbered from 0)
    layer offset_s + i  <-  layer a_m + i of each source m of slice s, merged by the step's method
                            with slice s's inputs, base and parameters (slice params over the step's)
    t = i / (n_s − 1) within slice s (1 when n_s = 1)          [per-layer lists; as mergekit]
    embeddings (names holding `embed`)  <-  slice 0's sources, t = 0
    every other tensor outside the layers (final norm, lm_head)  <-  the last slice's sources, t = 0

and config.json gets num_hidden_layers = Σ_s n_s and, when present, `layer_types` of the source layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from branchmerge.merge.io import Checkpoint, CheckpointError
from branchmerge.merge.recipe import LAYER, Slice, Step


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: `steps` run in order (the last one is written); `sources[m]` is the tensor
    read from model m; `t` the depth for per-layer parameters (None: from the output name)."""

    steps: tuple[Step, ...]
    sources: dict[str, str]
    t: float | None = None

    @property
    def first(self) -> tuple[str, str]:
        """(model, tensor) whose header gives the output's shape and stored dtype."""
        return next(iter(self.sources.items()))


@dataclass
class Layout:
    """`names`: output tensors in write order; `plans[name]`; `n_layers`: the output's decoder layers;
    `config`: keys to set in the output's config.json."""

    names: list[str]
    plans: dict[str, TensorPlan]
    n_layers: int | None
    config: dict[str, Any] = field(default_factory=dict)


def model_refs(step: Step) -> list[str]:
    """The names a step reads: inputs, then base."""
    return [i.ref for i in step.inputs] + ([step.base] if step.base else [])


def plain_layout(steps: list[Step], ckpts: dict[str, Checkpoint], names: list[str]) -> Layout:
    """Every tensor under its own name, through every step; read from the models the steps name."""
    steps_t = tuple(steps)
    models = [m for s in steps for m in model_refs(s) if m in ckpts]
    models = list(dict.fromkeys(models))
    first = ckpts[models[0]]
    plans = {n: TensorPlan(steps_t, {m: n for m in models}) for n in names}
    return Layout(list(names), plans, first.config.get("num_hidden_layers"))


def _n_layers(ck: Checkpoint) -> int:
    found = {int(m.group(1)) for n in ck.info if (m := LAYER.search(n))}
    return int(ck.config.get("num_hidden_layers", max(found, default=-1) + 1))


def _layer_names(ck: Checkpoint, layer: int) -> list[tuple[str, str]]:
    """(prefix up to `.layers.`, suffix after the index) of layer `layer`'s tensors, in file order."""
    out = []
    for n in ck.names:
        m = LAYER.search(n)
        if m and int(m.group(1)) == layer:
            out.append((n[: m.start(1)], n[m.end(1) :]))
    return out


def slice_step(step: Step, sl: Slice) -> Step:
    """The step that merges one slice: its inputs, base and parameters (over the step's)."""
    return replace(step, base=sl.base, inputs=sl.inputs, params={**step.params, **sl.params}, slices=None)


def sliced_layout(step: Step, ckpts: dict[str, Checkpoint], vocab_names: set[str] = frozenset()) -> Layout:
    """The layout of a step with `slices` (module docstring); every problem is reported at once.
    `vocab_names`: tensors whose rows are remapped per model (their first dims may differ)."""
    problems: list[str] = []
    plans: dict[str, TensorPlan] = {}
    layer_types: list[Any] = []
    k = 0
    for s_i, sl in enumerate(step.slices):
        sub = slice_step(step, sl)
        refs = list(sl.ranges)
        for m in refs:
            a, b = sl.ranges[m]
            if b > _n_layers(ckpts[m]):
                problems.append(
                    f"slices[{s_i}]: layer_range [{a}, {b}] of '{m}' passes its "
                    f"{_n_layers(ckpts[m])} layers ({ckpts[m].path}/config.json)"
                )
        if problems:
            continue
        for i in range(sl.length):
            t = i / (sl.length - 1) if sl.length > 1 else 1.0
            m0 = refs[0]
            src_layer = sl.ranges[m0][0] + i
            types = ckpts[m0].config.get("layer_types")
            if isinstance(types, list) and src_layer < len(types):
                layer_types.append(types[src_layer])
            for prefix, suffix in _layer_names(ckpts[m0], src_layer):
                sources = {m: f"{prefix}{sl.ranges[m][0] + i}{suffix}" for m in refs}
                _check_sources(ckpts, sources, f"slices[{s_i}]", problems)
                plans[f"{prefix}{k}{suffix}"] = TensorPlan((sub,), sources, t)
            k += 1
    if problems:
        raise CheckpointError("the slices cannot be built:\n" + "\n".join(f"  - {p}" for p in problems))
    head, tail = _outside_layers(step, ckpts, vocab_names)
    plans = {**head, **plans, **tail}
    config: dict[str, Any] = {"num_hidden_layers": k}
    first = ckpts[next(iter(step.slices[0].ranges))]
    if isinstance(first.config.get("layer_types"), list) and len(layer_types) == k:
        config["layer_types"] = layer_types
    return Layout(list(plans), plans, k, config)


def _outside_layers(
    step: Step, ckpts: dict[str, Checkpoint], vocab_names: set[str]
) -> tuple[dict[str, TensorPlan], dict[str, TensorPlan]]:
    """Tensors outside the decoder layers: embeddings from slice 0's sources, the rest (final norm,
    lm_head) from the last slice's, at t = 0 (mergekit's pre- and post-weights)."""
    problems: list[str] = []
    head, tail = {}, {}
    first_ck = ckpts[next(iter(step.slices[0].ranges))]
    for n in first_ck.names:
        if LAYER.search(n):
            continue
        which = 0 if "embed" in n else -1
        sl = step.slices[which]
        sources = {m: n for m in sl.ranges}
        _check_sources(ckpts, sources, f"slices[{which}]", problems, rows_may_differ=n in vocab_names)
        (head if which == 0 else tail)[n] = TensorPlan((slice_step(step, sl),), sources, 0.0)
    if problems:
        raise CheckpointError("the slices cannot be built:\n" + "\n".join(f"  - {p}" for p in problems))
    return head, tail


def _check_sources(
    ckpts: dict[str, Checkpoint],
    sources: dict[str, str],
    where: str,
    problems: list[str],
    rows_may_differ: bool = False,
) -> None:
    """Every source tensor exists, with the first source's shape (past the first dim: vocabularies)."""
    found = {m: ckpts[m].info[n] for m, n in sources.items() if n in ckpts[m].info}
    for m, n in sources.items():
        if m not in found:
            problems.append(f"{where}: {ckpts[m].path} has no tensor '{n}'")
    if not found:
        return
    m0, info0 = next(iter(found.items()))
    cut = 1 if rows_may_differ else 0
    for m, info in found.items():
        if info.shape[cut:] != info0.shape[cut:]:
            problems.append(
                f"{where}: {info.file}: tensor '{sources[m]}' has shape {list(info.shape)}, "
                f"'{sources[m0]}' of {m0} has {list(info0.shape)}"
            )
