"""The domain interface and registry of the toy world.

A domain turns a seeded RNG and difficulty knobs into a `Problem`, writes the oracle teacher's
R1-style trace for it, and verifies any model response against the problem's reference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

THINK_TEMPLATE = "<think>\n{reasoning}\n</think>\n\n{answer}"


@dataclass(frozen=True)
class Problem:
    prompt: str
    reference: str  # the gold answer in the domain's canonical form
    reasoning: str  # the teacher's step-by-step reasoning (inside <think>)
    answer: str  # the teacher's final answer text (after </think>)
    meta: dict = field(default_factory=dict)

    @property
    def trace(self) -> str:
        """The oracle teacher's full response: `<think>\\n…\\n</think>\\n\\n<answer>`."""
        return THINK_TEMPLATE.format(reasoning=self.reasoning, answer=self.answer)


class Domain(Protocol):
    name: str
    default_knobs: dict

    def generate(self, rng: random.Random, **knobs) -> Problem: ...

    def verify(self, response: str, reference: str, meta: dict | None = None) -> bool: ...


DOMAINS: dict[str, Domain] = {}


def register(domain: Domain) -> Domain:
    DOMAINS[domain.name] = domain
    return domain


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise KeyError(f"unknown toy domain '{name}'; known: {sorted(DOMAINS)}")
    return DOMAINS[name]


def check_knobs(domain: Domain, knobs: dict) -> dict:
    """Defaults overlaid with `knobs`; an unknown knob is an error naming it and the valid ones."""
    unknown = set(knobs) - set(domain.default_knobs)
    if unknown:
        raise KeyError(
            f"unknown knob(s) {sorted(unknown)} for toy domain '{domain.name}'; "
            f"valid knobs: {sorted(domain.default_knobs)}"
        )
    return {**domain.default_knobs, **knobs}


# the domain modules register themselves on import
from branchmerge.toy import domain_code, domain_math, domain_science  # noqa: E402,F401
