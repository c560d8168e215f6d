"""Merge methods: one class each, registered by name; the maths only (docs/adding_a_method.md).

    @register
    class Median(Method):
        '''W = B + median_i(θ_i − B)   (element-wise)'''
        name = "median"
        needs_base = True
        def apply(self, ctx, stats, rows):
            b = rows.base()
            return b + torch.stack([rows.model(i) - b for i in range(len(ctx.models))]).median(0).values

A method states its parameters (`model_params`: per model, `global_params`: per step; each a default;
a recipe may give any of them as a number, a per-layer list or a module-name pattern map) and provides
    stats(ctx) -> S                    what it needs about whole tensors (thresholds, norms; may be None)
    apply(ctx, stats, rows) -> rows    one block of rows of every input -> those rows of the output,
                                       in the compute dtype
The executor (`branchmerge.merge.executor`) does the reading, blocking, threads, casting, seeding,
NaN/Inf checks and writing. `view` says what a row is: "flat" (one entry: element-wise methods) or
"matrix" (a row of the (…, last dim) view, for methods with per-row quantities such as a softmax).
A named variant is a subclass that sets a few class attributes (TIES and DARE-TIES share one class).
`method(tensors, base, **params)` runs it on in-memory tensors (tests, notebooks).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class Method:
    """Base class of merge methods; see the module docstring."""

    name: ClassVar[str]
    needs_base: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    model_params: ClassVar[dict[str, Any]] = {}  # per-model parameter -> default
    global_params: ClassVar[dict[str, Any]] = {}  # per-step parameter -> default
    needs_importance: ClassVar[bool] = False  # gets per-model importance tensors (Fisher)
    # its per-model `coef` comes from merge.py's activation pass (branchmerge.merge.activations)
    needs_activations: ClassVar[bool] = False
    view: ClassVar[str] = "flat"  # "flat" | "matrix": what one row of a block is

    def stats(self, ctx) -> Any:
        return None

    def apply(self, ctx, stats: Any, rows) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.apply")

    @property
    def doc(self) -> str:
        return type(self).__doc__ or ""

    def __call__(
        self, tensors: list[torch.Tensor], base: torch.Tensor | None = None, **params
    ) -> torch.Tensor:
        from branchmerge.merge.executor import merge_tensors

        return merge_tensors(self, tensors, base, **params)


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls.name` selectable in recipes."""
    if cls.view not in ("flat", "matrix"):
        raise ValueError(f"{cls.__name__}.view must be 'flat' or 'matrix', got {cls.view!r}")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown merge method '{name}'; known methods: {sorted(METHODS)}")
    return METHODS[name]


from branchmerge.merge.methods import (  # noqa: E402,F401  (each module registers its methods)
    acm,
    arcee_fusion,
    breadcrumbs,
    della,
    fisher,
    importance_fusion,
    iso,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    sce,
    slerp,
    sparse,
    task_arithmetic,
    tsv,
)
