"""Merge methods: pure tensor functions registered by name.

A method is `fn(tensors, base, **params) -> Tensor` where `tensors` are the input models' versions of
one tensor (compute dtype, same shape), `base` the base model's (or None), and params its
parameters, already resolved for this tensor (per-model ones as lists aligned with `tensors`).
No I/O or device logic inside: the executor streams, chunks and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    model_params: dict[str, Any] = field(default_factory=dict)  # per-model parameter -> default
    global_params: dict[str, Any] = field(default_factory=dict)  # method parameter -> default
    fixed: dict[str, Any] = field(default_factory=dict)  # a named variant's settings of a general method
    row_separable: bool = False  # rows of the output depend only on the same rows of the inputs
    needs_importance: bool = False  # takes per-model importance tensors (Fisher)
    takes_name: bool = False  # gets tensor_name= (per-tensor seeds, so order never changes results)
    takes_layer: bool = False  # gets layer_fraction= (depth of the tensor's layer in [0, 1], or None)
    casts_inputs: bool = False  # takes stored-dtype inputs, dtype= and out_dtype= (casts block by block)
    nonfinite_propagates: bool = False  # a NaN/Inf in any input always makes a NaN/Inf in the output
    doc: str = ""

    def __call__(self, tensors, base, **params):
        return self.fn(tensors, base, **self.fixed, **params)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown merge method '{name}'; known methods: {sorted(METHODS)}")
    return METHODS[name]


from branchmerge.merge.methods import (  # noqa: E402,F401  (each module registers its methods)
    arcee_fusion,
    fisher,
    importance_fusion,
    linear,
    slerp,
    sparse,
    task_arithmetic,
)
