r"""Toy math: multi-step integer arithmetic word problems; the answer goes in `\boxed{}` (as in AIME).

Example (steps=3):
    Ava has 14 marbles. She buys 3 boxes with 6 marbles in each. Then she gives away 9 marbles.
    How many marbles does Ava have now?
    <think> Ava starts with 14 marbles. / 3 boxes of 6 is 3 * 6 = 18. / 14 + 18 = 32. / ... </think>
    The answer is \boxed{23}.
"""

from __future__ import annotations

import random

from branchmerge.toy.domains import Problem, check_knobs, register
from branchmerge.verify.graders import grade_toy_math

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lea", "Milo", "Nia"]
ITEMS = ["apples", "marbles", "stamps", "coins", "books", "cards", "shells", "pens", "beads", "eggs"]
BOXES = ["boxes", "bags", "packs", "jars", "crates"]


class MathDomain:
    name = "math"
    default_knobs = {"min_steps": 2, "max_steps": 4, "max_operand": 20, "max_value": 200}

    def generate(self, rng: random.Random, **knobs) -> Problem:
        k = check_knobs(self, knobs)
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        value = rng.randint(2, k["max_operand"])
        story = [f"{who} has {value} {item}."]
        steps = [f"{who} starts with {value} {item}."]
        ops = []
        for _ in range(rng.randint(k["min_steps"], k["max_steps"])):
            value, sentence, reasoning, op = self._step(rng, who, item, value, k)
            story.append(sentence)
            steps.extend(reasoning)
            ops.append(op)
        story.append(f"How many {item} does {who} have now?")
        steps.append(f"So {who} has {value} {item}.")
        prompt = " ".join(story) + "\n" + MATH_INSTRUCTION
        answer = f"The answer is \\boxed{{{value}}}."
        return Problem(prompt, str(value), "\n".join(steps), answer, {"ops": ops, "steps": len(ops)})

    @staticmethod
    def _step(rng, who, item, value, k):
        """One story step: (new value, sentence, reasoning lines, op name); values stay in [0, max_value]."""
        hi = k["max_operand"]
        choices = ["gain", "lose", "groups", "double", "share"]
        while True:
            op = rng.choice(choices)
            if op == "gain":
                n = rng.randint(1, hi)
                if value + n <= k["max_value"]:
                    return (
                        value + n,
                        f"Then {who} finds {n} more {item}.",
                        [f"{value} + {n} = {value + n}."],
                        op,
                    )
            elif op == "lose" and value > 1:
                n = rng.randint(1, min(hi, value - 1))
                return (
                    value - n,
                    f"Then {who} gives away {n} {item}.",
                    [f"Giving away {n}: {value} - {n} = {value - n}."],
                    op,
                )
            elif op == "groups":
                g, per = rng.randint(2, 5), rng.randint(2, min(hi, 12))
                if value + g * per <= k["max_value"]:
                    box = rng.choice(BOXES)
                    return (
                        value + g * per,
                        f"Then {who} buys {g} {box} with {per} {item} in each.",
                        [
                            f"{g} {box} of {per} is {g} * {per} = {g * per}.",
                            f"{value} + {g * per} = {value + g * per}.",
                        ],
                        op,
                    )
            elif op == "double" and value * 2 <= k["max_value"]:
                return (
                    value * 2,
                    f"Then the number of {item} {who} has doubles.",
                    [f"{value} * 2 = {value * 2}."],
                    op,
                )
            elif op == "share" and value >= 4:
                parts = [d for d in (2, 3, 4, 5) if value % d == 0]
                if parts:
                    d = rng.choice(parts)
                    return (
                        value // d,
                        f"Then {who} splits the {item} into {d} equal groups and keeps one group.",
                        [f"{value} / {d} = {value // d}."],
                        op,
                    )

    def verify(self, response: str, reference: str, meta: dict | None = None) -> bool:
        return grade_toy_math(response, reference)


register(MathDomain())
