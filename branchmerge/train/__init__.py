"""Branch SFT: LightningModule, strategies (single / DDP / FSDP2), checkpoints, HF export, Fisher."""
