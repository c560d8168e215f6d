"""Toy domains: seeded determinism, difficulty knobs, the teacher's traces and the verifiers."""

import random

import pytest

from branchmerge.toy import DOMAINS, get_domain
from branchmerge.toy.domain_code import run_program, trace_program


def _problems(domain, seed, n, **knobs):
    rng = random.Random(seed)
    return [get_domain(domain).generate(rng, **knobs) for _ in range(n)]


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_generators_are_deterministic_per_seed(domain):
    a, b, c = _problems(domain, 7, 30), _problems(domain, 7, 30), _problems(domain, 8, 30)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_traces_are_r1_style(domain):
    for p in _problems(domain, 1, 50):
        assert p.trace.startswith("<think>\n") and p.trace.count("</think>") == 1
        think, answer = p.trace.split("</think>")
        assert len(think.strip().splitlines()) >= 2  # step-by-step reasoning
        assert answer.strip() == p.answer


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_verifier_accepts_every_teacher_answer(domain):
    dom = get_domain(domain)
    problems = _problems(domain, 3, 200)
    assert sum(dom.verify(p.trace, p.reference, p.meta) for p in problems) == 200


def _corruptions(domain, p):
    """Wrong or malformed versions of the teacher's response."""
    think = p.trace.split("</think>")[0] + "</think>\n\n"
    unclosed = p.trace.replace("</think>", "")
    if domain == "math":
        wrong = think + f"The answer is \\boxed{{{int(p.reference) + 1}}}."
        decoy = f"<think>\\boxed{{{p.reference}}}</think>\n\nI do not know."
    elif domain == "science":
        other = next(c for c in "ABCD" if c != p.reference)
        wrong = think + f"The answer is \\boxed{{{other}}}."
        decoy = f"<think>\\boxed{{{p.reference}}}</think>\n\nNo idea."
    else:
        wrong = think + f"The program prints:\n```\n{p.reference}0\n```"
        decoy = f"<think>```\n{p.reference}\n```</think>\n\nIt prints something."
    return [wrong, decoy, unclosed, ""]


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_verifier_rejects_corrupted_answers(domain):
    dom = get_domain(domain)
    for p in _problems(domain, 4, 40):
        for bad in _corruptions(domain, p):
            assert not dom.verify(bad, p.reference, p.meta), (domain, bad)


def test_code_verifier_runs_the_program_not_the_reference():
    dom = get_domain("code")
    p = _problems("code", 5, 1)[0]
    # a lying reference does not fool the verifier when the program is there to run
    assert dom.verify(p.trace, "not the output", p.meta)
    assert not dom.verify(p.trace.replace(p.reference, "999999"), p.reference, p.meta)


def test_code_trace_walks_the_real_execution():
    walk, out = trace_program("s = 1\nfor i in range(3):\n    s = s * 2\nprint(s)")
    assert walk.splitlines() == ["s = 1", "i = 0", "s = 2", "i = 1", "s = 4", "i = 2", "s = 8", "print 8"]
    assert out == "8\n" and run_program("s = 1\nfor i in range(3):\n    s = s * 2\nprint(s)") == "8\n"


def test_difficulty_knobs_change_problems():
    easy = _problems("math", 0, 50, min_steps=1, max_steps=1)
    hard = _problems("math", 0, 50, min_steps=5, max_steps=5)
    assert {p.meta["steps"] for p in easy} == {1} and {p.meta["steps"] for p in hard} == {5}
    short = _problems("code", 0, 50, min_snippets=1, max_snippets=1)
    long = _problems("code", 0, 50, min_snippets=3, max_snippets=3)
    assert all(len(p.meta["snippets"]) == 1 for p in short) and all(
        len(p.meta["snippets"]) == 3 for p in long
    )
    formulas = _problems("science", 0, 50, max_operand=3, conversion_share=0.0)
    assert all(p.meta["value"] <= 9 for p in formulas)  # a*b with a, b <= 3
    conversions = _problems("science", 0, 50, conversion_share=1.0)
    assert all(" are in " in p.prompt for p in conversions)


def test_unknown_knob_names_the_knob():
    with pytest.raises(KeyError, match="max_stepz.*valid knobs"):
        _problems("math", 0, 1, max_stepz=3)


def test_science_options_are_shuffled_distinct_and_contain_the_answer():
    letters = []
    for p in _problems("science", 2, 200):
        opts = p.meta["options"]
        assert len(set(opts)) == 4 and all(o > 0 for o in opts)
        assert opts["ABCD".index(p.reference)] == p.meta["value"]
        letters.append(p.reference)
    assert min(letters.count(c) for c in "ABCD") > 25  # the correct letter is spread over A-D
