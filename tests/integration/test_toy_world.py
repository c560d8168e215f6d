"""The built toy world: sizes, disjoint splits (checked on disk), manifest, reuse, and the tokenizer."""

import json

import pytest

from branchmerge.data.records import read_records
from branchmerge.foundation import file_hash
from branchmerge.toy.tokenizer import SPECIAL_TOKENS, padded_vocab_size
from branchmerge.toy.world import SplitSpec, build_world, check_disjoint, render_chat
from tests.conftest import SMALL_WORLD


def test_world_layout_and_sizes(toy_world):
    manifest = json.loads((toy_world / "manifest.json").read_text())
    for domain in ("math", "code", "science"):
        for split, size in SMALL_WORLD["splits"].items():
            path = toy_world / "data" / domain / f"{split}.jsonl"
            recs = list(read_records(path, require_response=True))
            assert len(recs) == size == manifest["sizes"][domain][split]
            assert {r.domain for r in recs} == {domain}
            assert len({r.id for r in recs}) == size
            assert manifest["sha256"][f"{domain}/{split}"] == file_hash(path, "sha256")
        assert manifest["sizes"][domain]["test"] >= 200


def test_splits_are_disjoint_on_disk(toy_world):
    for domain in ("math", "code", "science"):
        files = {s: toy_world / "data" / domain / f"{s}.jsonl" for s in SMALL_WORLD["splits"]}
        assert set(check_disjoint(files).values()) == {0}


def test_teacher_verifier_agreement_recorded(toy_world):
    manifest = json.loads((toy_world / "manifest.json").read_text())
    for key, agree in manifest["teacher_verifier_agreement"].items():
        assert agree["checked"] > 0 and agree["accepted"] == agree["checked"], key
    assert manifest["teacher_verifier_agreement"]["code/test"]["checked"] == 200


def test_world_is_reused_when_complete(toy_world):
    before = (toy_world / "manifest.json").read_text()
    again = build_world(
        toy_world,
        seed=0,
        domains=SMALL_WORLD["domains"],
        splits=[SplitSpec(k, v) for k, v in SMALL_WORLD["splits"].items()],
        verify_sample=40,
    )
    assert json.dumps(again, indent=2) == before


def test_same_seed_same_bytes(tmp_path):
    kw = dict(
        seed=3,
        domains={"math": {}, "science": {}},
        splits=[SplitSpec("test", 20), SplitSpec("train", 30)],
        verify_sample=5,
    )
    a, b = build_world(tmp_path / "a", **kw), build_world(tmp_path / "b", **kw)
    assert a["sha256"] == b["sha256"]
    c = build_world(tmp_path / "c", **{**kw, "seed": 4})
    assert c["sha256"] != a["sha256"]


def test_tokenizer_round_trips_every_item_exactly(toy_world, toy_tokenizer):
    n = 0
    for path in (toy_world / "data").glob("*/*.jsonl"):
        for rec in read_records(path):
            for text in (render_chat(rec), rec.prompt, rec.response):
                ids = toy_tokenizer(text, add_special_tokens=False)["input_ids"]
                assert toy_tokenizer.decode(ids, skip_special_tokens=False) == text
                n += 1
    assert n == 3 * 3 * sum(SMALL_WORLD["splits"].values())


def test_tokenizer_special_tokens_and_chat_template(toy_tokenizer):
    for tok in SPECIAL_TOKENS:
        ids = toy_tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, tok
    assert toy_tokenizer.eos_token == "<|im_end|>" and toy_tokenizer.pad_token == "<|endoftext|>"
    text = toy_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\ny"}],
        tokenize=False,
    )
    assert (
        text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nx\n</think>\n\ny<|im_end|>\n"
    )
    digits = toy_tokenizer.convert_ids_to_tokens(toy_tokenizer("x = 12345")["input_ids"])
    assert digits[-5:] == list("12345")  # one token per digit, as in Qwen2


@pytest.mark.parametrize(("n", "rows"), [(867, 896), (896, 896), (151665, 151680)])
def test_padded_vocab(n, rows):
    assert padded_vocab_size(n) == rows
