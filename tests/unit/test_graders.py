"""Graders: math-verify equivalence, letters, and code run against tests in the sandbox."""

import json

from branchmerge.data.benchmarks import load_gpqa_diamond, load_livecodebench
from branchmerge.verify.graders import grade_code, grade_letter, grade_math
from tests.conftest import ROOT

FIX = ROOT / "tests" / "fixtures" / "eval"


def test_grade_math():
    assert grade_math("<think>maybe 3</think>The answer is \\boxed{24}.", "24")
    assert grade_math("<think>x</think>\\boxed{\\frac{1}{2}}", "0.5")
    assert grade_math("<think>x</think>\\boxed{024}", "24")
    assert not grade_math("<think>\\boxed{24}</think>No answer.", "24")
    assert not grade_math("<think>x</think>\\boxed{25}", "24")
    assert not grade_math("<think>x</think>\\boxed{\\frac{1}{}", "24")


def test_grade_letter():
    assert grade_letter("<think>A?</think>\\boxed{C}", "C") and not grade_letter("<think>C</think>B", "C")


def test_grade_code_stdin_and_functional():
    problems = {d["id"]: d for d in load_livecodebench(str(FIX))["test"]}
    assert set(problems) == {"abc370_a", "3400"}  # the 2023 problem is outside the paper's window
    add = json.loads(problems["abc370_a"]["tests"])
    assert len(add) == 3  # public + decoded private tests
    good = "<think>read, add</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "<think>x</think>\n```python\na, b = map(int, input().split())\nprint(a - b)\n```"
    decoy = "<think>```python\nprint(3)\n```</think>\n```python\nprint(3)\n```"
    assert grade_code(good, add)["passed"]
    assert not grade_code(wrong, add)["passed"] and not grade_code(decoy, add)["passed"]
    assert grade_code("no code", add)["reason"] == "no code block"
    dbl = json.loads(problems["3400"]["tests"])
    fn = (
        "<think>x</think>\n```python\nclass Solution:\n    def doubleIt(self, nums: List[int]) -> List[int]:\n"
        "        return [2 * x for x in nums]\n```"
    )
    assert grade_code(fn, dbl, "doubleIt")["passed"]
    assert not grade_code(fn.replace("2 * x", "x + 2"), dbl, "doubleIt")["passed"]
    assert not grade_code("```python\nwhile True: pass\n```", add)["passed"]


def test_gpqa_options_shuffled_per_sample_with_recorded_seed():
    docs = list(load_gpqa_diamond(str(FIX), n_samples=4, seed=0)["test"])
    assert len(docs) == 12 and len({d["shuffle_seed"] for d in docs}) == 12
    for d in docs:
        correct_line = next(line for line in d["prompt"].splitlines() if line.startswith(f"{d['answer']})"))
        assert correct_line.split(") ", 1)[1] in ("newton", "carbon", "RNA")
    first_q = [d["answer"] for d in docs if d["id"] == "rec000"]
    assert len(set(first_q)) > 1  # the correct letter moves between samples
    again = list(load_gpqa_diamond(str(FIX), n_samples=4, seed=0)["test"])
    assert [d["prompt"] for d in again] == [d["prompt"] for d in docs]


def test_grade_math_works_off_the_main_thread():
    """math-verify's SIGALRM timeout only works in the main thread; graders must not silently fail."""
    from concurrent.futures import ThreadPoolExecutor

    from branchmerge.verify.graders import grade_math

    with ThreadPoolExecutor(2) as pool:
        right = pool.submit(grade_math, r"so \boxed{0.75}", r"\frac{3}{4}").result()
        wrong = pool.submit(grade_math, r"so \boxed{0.7}", r"\frac{3}{4}").result()
    assert right is True and wrong is False
