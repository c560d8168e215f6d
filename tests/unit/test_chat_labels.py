"""Chat templates: Python rendering equals the Jinja template; labels only on assistant tokens."""

import jinja2
import pytest

from branchmerge.data.chat import BOS, END_OF_TURN, TEMPLATES, get_template, render
from branchmerge.data.tokenize import IGNORE, check_template_tokens, encode_messages

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}."},
    {"role": "user", "content": "And 4 * 2?"},
    {"role": "assistant", "content": "<think>\n4 * 2 = 8.\n</think>\n\n\\boxed{8}"},
]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_render_matches_the_jinja_template(template):
    text, spans = render(CONVERSATION, template)
    jinja = jinja2.Template(TEMPLATES[template]).render(messages=CONVERSATION, bos_token=BOS[template] or "")
    assert text == jinja
    learned = [text[a:b] for a, b in spans]
    assert learned == [m["content"] + END_OF_TURN[template] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_labels_are_assistant_tokens_only_token_by_token(template, toy_tokenizer):
    enc = encode_messages(CONVERSATION, toy_tokenizer, template)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    # rebuild the learned text token by token: it must be exactly the assistant turns + end-of-turn
    learned, current = [], []
    for tok_id, lab in zip(ids, labels):
        if lab == IGNORE:
            if current:
                learned.append(toy_tokenizer.decode(current))
                current = []
        else:
            assert lab == tok_id
            current.append(tok_id)
    if current:
        learned.append(toy_tokenizer.decode(current))
    expected = [m["content"] + END_OF_TURN[template] for m in CONVERSATION if m["role"] == "assistant"]
    assert learned == expected
    # and the tokens carry the whole rendered text
    assert toy_tokenizer.decode(ids) == render(CONVERSATION, template)[0]


def test_end_of_turn_is_learned_and_is_one_token(toy_tokenizer):
    for template in TEMPLATES:
        check_template_tokens(toy_tokenizer, template)
        enc = encode_messages(CONVERSATION[:3], toy_tokenizer, template)
        eot = toy_tokenizer.convert_tokens_to_ids(END_OF_TURN[template])
        assert enc["labels"][enc["input_ids"].index(eot, len(enc["input_ids"]) - 3)] == eot


def test_unknown_template_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown chat template 'llama3'; choose one of"):
        get_template("llama3")
    with pytest.raises(KeyError, match="unknown chat template"):
        render(CONVERSATION, "llama3")
