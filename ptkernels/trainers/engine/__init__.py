"""What every stage shares to train: the configs, the loop, checkpoints and torchrun (DDP / FSDP2)."""
