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
