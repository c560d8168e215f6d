"""What the training path feeds the model: the batches `BranchDataModule.step_batch` builds from a real
train config learn only the assistant turns, and packed documents do not attend to one another."""

from __future__ import annotations

import json

import torch

from branchmerge.lm_loss import IGNORE
from branchmerge.models import build_model
from tests.conftest import load_model_entry
from tests.unit.test_datamodule import _datamodule

OVER = (
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=2",
    "data.max_records=40",
    "data.max_length=512",
)


def _first_row(dm) -> tuple[dict, list[int]]:
    """Micro-batch 0 of step 0 and the document indices of its first row."""
    batch = dm.step_batch(0)["micro_batches"][0]
    return batch, dm._rows(0)[0]


def _records(toy_world) -> dict[str, dict]:
    lines = (toy_world / "data" / "math" / "train.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def test_labels_are_the_assistant_turns_of_each_packed_document(tmp_path, toy_world, toy_tokenizer):
    """Guards against a datamodule that learns the prompt (planted: labels = input_ids in `_encode`):
    the labelled tokens of every document decode to its assistant turn, never to its user prompt."""
    dm = _datamodule(tmp_path, toy_world, toy_tokenizer, 1, 0, *OVER)
    batch, row = _first_row(dm)
    assert len(row) >= 2, "the check needs a packed row of several documents"
    records = _records(toy_world)
    pos = 0
    for i in row:
        n = dm.lengths[i]
        ids, labels = batch["input_ids"][0, pos : pos + n], batch["labels"][0, pos : pos + n]
        learned = labels != IGNORE
        assert torch.equal(labels[learned], ids[learned])
        text = toy_tokenizer.decode(ids[learned])
        rec = records[dm.docs[i]["id"]]
        assert rec["messages"][-1]["content"] in text
        assert rec["messages"][0]["content"] not in text
        assert 0 < int(learned.sum()) < n
        pos += n


def test_packed_documents_see_only_themselves(tmp_path, toy_world, toy_tokenizer):
    """Guards against cross-document attention forced on the training path (planted: collate_packed
    called with cross_document_attention=True): each document's logits in the packed row equal its
    logits alone."""
    dm = _datamodule(tmp_path, toy_world, toy_tokenizer, 1, 0, *OVER)
    batch, row = _first_row(dm)
    model = build_model(load_model_entry("pico", toy_world), toy_tokenizer).eval()
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1], use_cache=False
        ).logits[0]
        pos = 0
        for i in row:
            n = dm.lengths[i]
            alone = model(input_ids=batch["input_ids"][:1, pos : pos + n], use_cache=False).logits[0]
            assert (packed[pos : pos + n] - alone).abs().max() <= 1e-4, dm.docs[i]["id"]
            pos += n
