"""Answer extraction on crafted generations: nested/multiple boxes, decoys in the think block,
missing answers, letter variants and several code blocks."""

import pytest

from branchmerge.verify.extract import (
    boxed_contents,
    extract_letter,
    final_part,
    last_boxed,
    last_code_block,
    normalize_output,
    opened_think,
    reopen_think,
)


def test_final_part_rules():
    assert final_part("<think>a</think>b") == "b"
    assert final_part("<think>a</think>b</think>c") == "c"
    assert final_part("no think at all") == "no think at all"
    assert final_part("<think>never closed \\boxed{3}") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>maybe \\boxed{7}</think>So \\boxed{12}.", "12"),  # decoy inside think
        ("<think>x</think>\\boxed{1} then \\boxed{2}", "2"),  # the last box wins
        ("<think>x</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("<think>x</think>\\boxed{ 42 }", "42"),
        ("<think>\\boxed{5}</think>The answer is five.", None),  # only a decoy
        ("<think>\\boxed{5}", None),  # unclosed think
        ("<think>x</think>\\boxed{unbalanced", None),
        ("<think>x</think>\\fbox{9}", "9"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_boxed_inside_box_is_one_answer():
    assert boxed_contents("\\boxed{a \\boxed{b} c}") == ["a \\boxed{b} c"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>A looks right</think>The answer is \\boxed{B}.", "B"),
        ("<think>x</think>\\boxed{(C)}", "C"),
        ("<think>x</think>\\boxed{\\text{D}}", "D"),
        ("<think>x</think>Answer: B", "B"),
        ("<think>x</think>The answer is (A)", "A"),
        ("<think>x</think>\nC\n", "C"),
        ("<think>\\boxed{A}</think>I am not sure.", None),
        ("<think>x</think>\\boxed{E}", None),  # not an option letter
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_last_code_block():
    text = "<think>```\n1\n```</think>First:\n```python\nprint(1)\n```\nthen\n```\n2\n3\n```\n"
    assert last_code_block(text) == "2\n3\n"
    assert last_code_block(text, languages=("python",)) == "print(1)\n"
    assert last_code_block("<think>x</think>no code") is None
    assert last_code_block("<think>```\n9\n```") is None


def test_normalize_output():
    assert normalize_output("a  \nb\n\n") == "a\nb"
    assert normalize_output("\n[1, 2]\n") == "[1, 2]"


@pytest.mark.parametrize(
    ("prompt", "text", "expected"),
    [
        ("<｜User｜>q<｜Assistant｜><think>\n", "a</think>b", "<think>\na</think>b"),  # R1: put back
        ("<｜User｜>q<｜Assistant｜><think>\n", "cut off \\boxed{3}", "<think>\ncut off \\boxed{3}"),
        ("<｜User｜>q<｜Assistant｜><think>", "a</think>b", "<think>a</think>b"),  # exactly as it ended
        ("<｜User｜>q<｜Assistant｜><think>\n", "<think>a</think>b", "<think>a</think>b"),  # model reopened
        ("<|im_start|>assistant\n", "a</think>b", "a</think>b"),  # ChatML opens nothing
        ("<think>\n\n</think>\n\n", "b", "b"),  # thinking switched off: the block is already closed
    ],
)
def test_reopen_think_puts_back_what_the_prompt_opened(prompt, text, expected):
    """Bug planted: reopen_think returning text unchanged -> the cut-off R1 generation keeps a gradable
    box (final_part sees no think block) instead of having none."""
    got = reopen_think(prompt, text)
    assert got == expected
    if got != text:
        assert opened_think(prompt) + text == got
    if "cut off" in text:
        assert last_boxed(got) is None and last_boxed(text) == "3"
