r"""Toy science: multiple-choice quantitative questions (formulas, unit conversions), options A–D.

As in GPQA-Diamond the options are shuffled by a seed and the answer is the letter in `\boxed{}`.
The teacher computes the value, then checks the options in order until one holds it.

Example:
    A cart of mass 4 kg accelerates at 3 m/s^2. What net force acts on it?
    A) 7 N  B) 12 N  C) 1 N  D) 120 N
    <think> F = m * a. / F = 4 * 3 = 12 N. / A) 7 N: no. / B) 12 N: yes. </think>  The answer is \boxed{B}.
"""

from __future__ import annotations

import random

from branchmerge.toy.domains import Problem, check_knobs, register
from branchmerge.verify.graders import grade_toy_letter

LETTERS = "ABCD"
SCIENCE_INSTRUCTION = "Please reason step by step, and put the letter of your final answer within \\boxed{}."


def _formula(rng, hi):
    """(question, formula line, computation line, value, unit, wrong-formula value)."""
    kind = rng.choice(["force", "speed", "density", "ohm", "work", "pressure", "power"])
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    if kind == "force":
        return (
            f"A cart of mass {a} kg accelerates at {b} m/s^2. What net force acts on it?",
            "F = m * a",
            f"F = {a} * {b} = {a * b} N",
            a * b,
            "N",
            a + b,
        )
    if kind == "speed":
        return (
            f"A train travels {a * b} km in {b} hours. What is its average speed?",
            "v = d / t",
            f"v = {a * b} / {b} = {a} km/h",
            a,
            "km/h",
            a * b * b,
        )
    if kind == "density":
        return (
            f"A block has mass {a * b} g and volume {b} cm^3. What is its density?",
            "rho = m / V",
            f"rho = {a * b} / {b} = {a} g/cm^3",
            a,
            "g/cm^3",
            a * b - b,
        )
    if kind == "ohm":
        return (
            f"A current of {a} A flows through a {b} ohm resistor. What is the voltage across it?",
            "V = I * R",
            f"V = {a} * {b} = {a * b} V",
            a * b,
            "V",
            a + b,
        )
    if kind == "work":
        return (
            f"A force of {a} N pushes a box {b} m along the floor. How much work is done?",
            "W = F * d",
            f"W = {a} * {b} = {a * b} J",
            a * b,
            "J",
            a + b,
        )
    if kind == "pressure":
        return (
            f"A force of {a * b} N acts on an area of {b} m^2. What is the pressure?",
            "p = F / A",
            f"p = {a * b} / {b} = {a} Pa",
            a,
            "Pa",
            a * b + b,
        )
    return (
        f"A motor does {a * b} J of work in {b} s. What is its power?",
        "P = W / t",
        f"P = {a * b} / {b} = {a} W",
        a,
        "W",
        a * b * b,
    )


UNITS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("h", "min", 60),
    ("min", "s", 60),
    ("L", "mL", 1000),
    ("cm", "mm", 10),
]


def _conversion(rng, hi):
    src, dst, factor = rng.choice(UNITS)
    a = rng.randint(2, hi)
    return (
        f"How many {dst} are in {a} {src}?",
        f"1 {src} = {factor} {dst}",
        f"{a} * {factor} = {a * factor} {dst}",
        a * factor,
        dst,
        a + factor,
    )


class ScienceDomain:
    name = "science"
    default_knobs = {"max_operand": 12, "conversion_share": 0.3}

    def generate(self, rng: random.Random, **knobs) -> Problem:
        k = check_knobs(self, knobs)
        make = _conversion if rng.random() < k["conversion_share"] else _formula
        question, rule, calc, value, unit, wrong = make(rng, k["max_operand"])
        options = {value}
        for cand in (
            wrong,
            value * 10,
            value + rng.randint(1, 9),
            value * 2,
            max(1, value - rng.randint(1, 9)),
            value + 10,
            value * 3,
        ):
            if len(options) == 4:
                break
            if cand > 0:
                options.add(cand)
        options = sorted(options)
        rng.shuffle(options)
        letter = LETTERS[options.index(value)]
        listing = "\n".join(f"{LETTERS[i]}) {v} {unit}" for i, v in enumerate(options))
        prompt = f"{question}\n{listing}\n{SCIENCE_INSTRUCTION}"
        # check the options in order until the computed value turns up: copying the option lines and
        # comparing one number at a time is a skill a small student learns; a one-shot lookup is not
        checks = []
        for i, v in enumerate(options):
            checks.append(f"{LETTERS[i]}) {v} {unit}: {'yes' if v == value else 'no'}.")
            if v == value:
                break
        reasoning = f"{rule}.\n{calc}.\n" + "\n".join(checks)
        return Problem(
            prompt,
            letter,
            reasoning,
            f"The answer is \\boxed{{{letter}}}.",
            {"options": options, "value": value, "unit": unit},
        )

    def verify(self, response: str, reference: str, meta: dict | None = None) -> bool:
        return grade_toy_letter(response, reference, LETTERS)


register(ScienceDomain())
