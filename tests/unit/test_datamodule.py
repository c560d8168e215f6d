"""The step plan of branch SFT: every epoch yields exactly the planned steps, identical on every rank."""

from __future__ import annotations

import pytest

from tests.conftest import compose


def _datamodule(tmp_path, toy_world, toy_tokenizer, world: int, rank: int, *overrides: str):
    from branchmerge.config import validate
    from branchmerge.config.schema import TrainConfig
    from branchmerge.data.datamodule import BranchDataModule

    cfg = compose(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            f"paths.toy_dir={toy_world}",
            "model=pico",
            "data=toy_math",
            "data.max_length=256",
            "logger=csv",
            *overrides,
        ],
    )
    cfg = validate(cfg, TrainConfig)
    dm = BranchDataModule(
        cfg.data, toy_tokenizer, cfg.trainer, tmp_path / "cache", world_size=world, rank=rank
    )
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("records", [43, 44])
def test_every_epoch_yields_the_planned_steps_on_every_rank(tmp_path, toy_world, toy_tokenizer, records):
    """Bug guarded: steps per epoch came from epoch 0's packing, but each epoch repacks with a new seed;
    with 43 records (global batch 8, 2 ranks, 2 epochs) epoch 0 packs 40 rows and epoch 1 only 39, so
    the last step of epoch 1 had 7 rows: one rank got 4 micro-batches and the other 3, and the FSDP2
    collectives hung. Every step must hold exactly the global batch, split evenly over the ranks."""
    over = (f"data.max_records={records}", "trainer.global_batch_size=8", "trainer.micro_batch_size=1")
    over = (*over, "trainer.epochs=2")
    ranks = [_datamodule(tmp_path, toy_world, toy_tokenizer, 2, r, *over) for r in (0, 1)]
    assert ranks[0].total_steps == ranks[1].total_steps == 2 * ranks[0].steps_per_epoch
    for step in range(ranks[0].total_steps):
        a, b = (dm.step_batch(step) for dm in ranks)
        assert len(a["micro_batches"]) == len(b["micro_batches"]) == 4, (step, records)
        assert a["n_label_tokens"] == b["n_label_tokens"] > 0


def test_a_rank_reads_only_its_own_rows_and_reports_attention_spans(tmp_path, toy_world, toy_tokenizer):
    """Bug guarded: every rank converted all rows of the global batch from Arrow to Python lists each
    step (at 32 ranks, 32x the work); a rank now reads only its rows, and the global label count comes
    from per-document counts made once. Also: the attention spans behind MFU are the documents for
    per-document attention and the whole rows for plain packing (cross-document attention)."""
    over = ("trainer.global_batch_size=8", "trainer.micro_batch_size=1")
    dms = [_datamodule(tmp_path, toy_world, toy_tokenizer, 2, r, *over) for r in (0, 1)]
    rows = dms[0]._rows(0)[:8]
    for rank, dm in enumerate(dms):
        read: list[int] = []
        real = dm._doc
        dm._doc = lambda i, real=real, read=read: read.append(i) or real(i)
        batch = dm.step_batch(0)
        assert sorted(read) == sorted(i for row in rows[rank::2] for i in row)
        full = sum(sum(1 for x in dm.docs[i]["labels"][1:] if x != -100) for row in rows for i in row)
        assert batch["n_label_tokens"] == full
        assert sorted(batch["attn_spans"]) == sorted(dm.lengths[i] for row in rows for i in row)
    plain = _datamodule(tmp_path, toy_world, toy_tokenizer, 2, 0, *over, "data.cross_document_attention=true")
    spans = plain.step_batch(0)["attn_spans"]
    assert spans == [sum(plain.lengths[i] for i in row) for row in plain._rows(0)[:8]]
