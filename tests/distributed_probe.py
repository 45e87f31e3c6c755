"""A callback for the data-parallel test: each rank writes what it ended with, to compare across ranks."""

import json
from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save_file


class RankSnapshot(pl.Callback):
    """Write ``<out>/rank<r>.safetensors``: every weight, every mask's indices, the prompts the rank trained on.

    Args:
        out: Folder of the snapshots.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.prompts: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.prompts += [episode.user_turns[0] for episode in batch]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        tensors = {f"weight/{name}": p.detach().clone().contiguous() for name, p in model.named_parameters()}
        if pl_module.sparse_state is not None:
            tensors.update({f"mask/{name}": idx.clone() for name, idx in pl_module.sparse_state.masks.items()})
        path = Path(self.out) / f"rank{trainer.global_rank}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"prompts": json.dumps(self.prompts), "world_size": str(trainer.world_size)})
