"""Toy code: "what does this short program print"; the answer is the output in a fenced block.

The oracle teacher really executes the program (in-process, under `sys.settrace`) and writes the
walk of the execution: each line's effect on the variables, calls and returns, and every print.
The verifier compares a response to the output of running the program in a separate process with
a timeout (the same sandbox the evaluation of generated code uses).

Example:
    total = 3
    for i in range(3):
        total = total + i
    print(total)
    <think> total = 3 / i = 0 / total = 3 / i = 1 / total = 4 / i = 2 / total = 6 / print 6 </think>
    The program prints:
    ```
    6
    ```
"""

from __future__ import annotations

import io
import random
import re
import sys
from contextlib import redirect_stdout

from branchmerge.toy.domains import Problem, check_knobs, register
from branchmerge.verify.graders import grade_toy_output, run_program  # noqa: F401 (re-exported)

CODE_INSTRUCTION = (
    "What does this program print? Trace the execution step by step, then give the exact output."
)
VARS = ["a", "b", "n", "x", "y", "s", "t", "k"]
WORDS = ["cat", "tree", "moon", "lab", "code", "star", "rain", "box", "sun", "map"]


def _loop_sum(rng, k):
    v, start = rng.choice(VARS[:4]), rng.randint(0, k["max_int"])
    op = rng.choice(["+", "-", "+"])
    return [
        f"{v} = {start}",
        f"for i in range({rng.randint(2, k['max_loop'])}):",
        f"    {v} = {v} {op} i * {rng.randint(1, 3)}",
        f"print({v})",
    ]


def _list_ops(rng, k):
    xs = [rng.randint(0, k["max_int"]) for _ in range(rng.randint(2, 4))]
    lines = [f"xs = {xs}", f"xs.append({rng.randint(0, k['max_int'])})"]
    i, j = rng.randrange(len(xs) + 1), rng.randrange(len(xs) + 1)
    lines.append(f"xs[{i}] = xs[{j}] + {rng.randint(1, 9)}")
    lines.append(rng.choice(["print(xs)", "print(sum(xs))", "print(xs[-1])", "print(len(xs) + xs[0])"]))
    return lines


def _strings(rng, k):
    w = rng.choice(WORDS)
    expr = rng.choice(["w[::-1]", "w.upper()", "w * 2", "w[1:] + w[0]", "w + str(len(w))", "w[0] + w[-1]"])
    return [f'w = "{w}"', f"t = {expr}", "print(t)"]


def _function(rng, k):
    a, b, c = rng.randint(2, 5), rng.randint(0, k["max_int"]), rng.randint(0, k["max_int"])
    if rng.random() < 0.5:
        return ["def f(x):", f"    return x * {a} + {b}", f"print(f({c}))"]
    return [
        "def g(p, q):",
        "    if p > q:",
        "        return p - q",
        "    return q - p",
        f"print(g({c}, {b}))",
    ]


def _while(rng, k):
    return [
        f"n = {rng.randint(5, 12 * k['max_int'])}",
        "steps = 0",
        "while n > 1:",
        f"    n = n // {rng.choice([2, 3])}",
        "    steps = steps + 1",
        "print(steps)",
    ]


def _filter_loop(rng, k):
    xs = [rng.randint(0, k["max_int"]) for _ in range(rng.randint(3, k["max_loop"]))]
    cond = rng.choice(["x % 2 == 0", "x > 5", "x % 3 == 1"])
    return ["c = 0", f"for x in {xs}:", f"    if {cond}:", "        c = c + x", "print(c)"]


SNIPPETS = [_loop_sum, _list_ops, _strings, _function, _while, _filter_loop]


_TARGET = re.compile(r"^\s*(?:([A-Za-z_]\w*)\s*[-+*/]?=[^=]|for\s+([A-Za-z_]\w*)\s+in\b)")


class _Tracer:
    """Records an execution walk of `<toy>` code: variable changes per line, calls, returns, prints."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.events: list[str] = []
        self.snapshots: dict[int, dict] = {}
        self.last_line: dict[int, int] = {}

    def _diff(self, frame) -> None:
        """Report what the previously executed line did: its assignment target (even when the value
        did not change) and every other variable whose value changed."""
        before = self.snapshots.get(id(frame), {})
        now = {k: v for k, v in frame.f_locals.items() if not callable(v) and not k.startswith("__")}
        prev = self.last_line.get(id(frame))
        m = _TARGET.match(self.lines[prev - 1]) if prev else None
        targets = [m.group(1)] if m and m.group(1) in now else []  # a finished for-loop reassigns nothing
        changed = [k for k, v in now.items() if k not in before or before[k] != v]
        for name in targets + [c for c in changed if c not in targets]:
            self.events.append(f"{name} = {now[name]!r}")
        self.snapshots[id(frame)] = {k: (list(v) if isinstance(v, list) else v) for k, v in now.items()}
        self.last_line[id(frame)] = frame.f_lineno

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != "<toy>":
            return None
        if event == "call" and frame.f_code.co_name != "<module>":
            args = ", ".join(
                f"{n}={frame.f_locals[n]!r}" for n in frame.f_code.co_varnames[: frame.f_code.co_argcount]
            )
            self.events.append(f"call {frame.f_code.co_name}({args})")
            self.snapshots[id(frame)] = dict(frame.f_locals)
        elif event == "line":
            self._diff(frame)
        elif event == "return":
            self._diff(frame)
            if frame.f_code.co_name != "<module>":
                self.events.append(f"{frame.f_code.co_name} returns {arg!r}")
        return self


class _PrintLog(io.StringIO):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def write(self, s: str) -> int:
        if s.strip():
            self.tracer.events.append(f"print {s.strip()}")
        return super().write(s)


def trace_program(program: str) -> tuple[str, str]:
    """Execute trusted generated code in-process; returns (execution walk, stdout)."""
    tracer = _Tracer(program.splitlines())
    out = _PrintLog(tracer)
    code = compile(program, "<toy>", "exec")
    old = sys.gettrace()
    try:
        with redirect_stdout(out):
            sys.settrace(tracer)
            exec(code, {"__builtins__": __builtins__})
    finally:
        sys.settrace(old)
    return "\n".join(tracer.events), out.getvalue()


class CodeDomain:
    name = "code"
    default_knobs = {"min_snippets": 1, "max_snippets": 2, "max_loop": 5, "max_int": 9}

    def generate(self, rng: random.Random, **knobs) -> Problem:
        k = check_knobs(self, knobs)
        picks = [rng.choice(SNIPPETS) for _ in range(rng.randint(k["min_snippets"], k["max_snippets"]))]
        program = "\n".join(line for make in picks for line in make(rng, k))
        walk, output = trace_program(program)
        prompt = f"{CODE_INSTRUCTION}\n```python\n{program}\n```"
        answer = f"The program prints:\n```\n{output.rstrip()}\n```"
        return Problem(
            prompt,
            output.rstrip("\n"),
            walk,
            answer,
            {"program": program, "snippets": [p.__name__.lstrip("_") for p in picks]},
        )

    def verify(self, response: str, reference: str, meta: dict | None = None) -> bool:
        """Compare the response's last code block with the real output of `meta["program"]`, run in
        the sandbox; without a program, with `reference`."""
        return grade_toy_output(response, reference, (meta or {}).get("program"))


register(CodeDomain())
