"""Validation loss: the flow-matching loss of held-out batches at fixed timesteps with fixed noise.

Every validation item gets its own noise, drawn from a generator seeded with `--seed` + the item's position, so
the values of one run are comparable between steps, and the training run's random state is never touched (the
same LoRA with or without validation). Each batch is scored at every `--validation_timesteps` value; the result
is the mean loss per timestep and their mean. No gradients; the models' train/eval modes are restored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dataset.config import load_dataset_params
from dataset.image_video_dataset import BaseDataset, DatasetGroup, build_dataset_group
from training.rng import preserved_rng
from utils.cli import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationResult:
    per_timestep: dict[int, float]  # timestep -> mean loss over the validation batches
    mean: float  # mean over the timesteps

    def logs(self) -> dict[str, float]:
        """Tracker values: `loss/validation` and `loss/validation_t<timestep>`."""
        return {"loss/validation": self.mean, **{f"loss/validation_t{t}": v for t, v in self.per_timestep.items()}}

    def summary(self) -> str:
        return f"{self.mean:.5f} (" + ", ".join(f"t={t}: {v:.5f}" for t, v in self.per_timestep.items()) + ")"


def item_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of one item from its own CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)


class Validator:
    """The validation batches (every dataset's unshuffled arrangement) and their fixed noise seeds."""

    def __init__(self, datasets: list[BaseDataset], timesteps: list[int], seed: int):
        self.timesteps = list(timesteps)
        self.batches = [(d, d.arrangement(0).batch_items(b)) for d in datasets for b in range(len(d))]
        self.seed = seed
        self.num_items = sum(len(items) for _, items in self.batches)

    def batch_noise(self, first_item: int, latents: torch.Tensor) -> torch.Tensor:
        shape = tuple(latents.shape[1:])
        noises = [item_noise(shape, self.seed + first_item + i, latents.dtype) for i in range(latents.shape[0])]
        return torch.stack(noises)

    def run(self, loss: Callable[[dict, torch.Tensor, int], torch.Tensor], models: list[torch.nn.Module]):
        """`loss(batch, noise, timestep)` → the batch's mean loss; models are put in eval mode meanwhile."""
        modes = [(m, m.training) for model in models for m in model.modules()]
        for model in models:
            model.eval()
        totals = dict.fromkeys(self.timesteps, 0.0)
        try:
            with torch.no_grad(), preserved_rng():
                first_item = 0
                for dataset, items in self.batches:
                    batch = dataset.load_batch([item.latent_cache_path for item in items])
                    noise = self.batch_noise(first_item, batch["latents"])
                    for t in self.timesteps:
                        totals[t] += float(loss(batch, noise, t))
                    first_item += len(items)
        finally:
            for module, training in modes:
                module.training = training
        per_timestep = {t: total / len(self.batches) for t, total in totals.items()}
        return ValidationResult(per_timestep, sum(per_timestep.values()) / len(per_timestep))


def load_datasets(flags) -> tuple[DatasetGroup, list[BaseDataset]]:
    """(training group, validation datasets) of --dataset_config, with --validation_split applied. The training
    group draws the shared shuffle seed from the global generator as musubi-tuner; validation datasets draw
    nothing (they are never shuffled), so adding them leaves the training run as it was."""
    path = flags.dataset_config
    params = load_dataset_params(path, flags)
    group = build_dataset_group([p for p in params if not p.is_validation], training=True)
    if group.num_train_items == 0:
        raise UsageError(f"--dataset_config {path}: no cached items (run the caching scripts)")
    validation_params = [p for p in params if p.is_validation]
    validation = build_dataset_group(validation_params, training=True, seed=0).datasets if validation_params else []
    for dataset in validation:
        if dataset.num_train_items == 0:
            raise UsageError(f"--dataset_config {path}: {dataset.params.label} has no cached items (cache it too)")
    if flags.validation_split > 0:
        validation += [dataset.split_off(flags.validation_split) for dataset in group.datasets]
        group = DatasetGroup(group.datasets)
    scheduled = flags.validate_every_n_steps or flags.validate_every_n_epochs
    if scheduled and not validation:
        raise UsageError(
            "--validate_every_n_steps/--validate_every_n_epochs need validation data: [[validation_datasets]] in "
            f"--dataset_config {path}, or --validation_split"
        )
    if validation and not scheduled:
        logger.warning("validation data given but neither --validate_every_n_steps nor --validate_every_n_epochs")
    return group, validation
