"""The training DataLoader: one dataset index is one whole batch (batch size 1 at the DataLoader level).

Order: each epoch the sampler draws a permutation exactly as `DataLoader(shuffle=True)` does (one seed from the
global torch RNG in a single process, or accelerate's synchronized generator across processes), so a seeded run
sees the reference's order. Two additions make the order a function of (seed, epoch) only, whatever the worker
count, and let a resumed run continue mid-epoch with the same batches:

* every index carries its epoch, and the dataset applies that epoch's bucket shuffle before fetching (the
  reference pushed the epoch from the collate function, after the first batch of each epoch had been fetched with
  the previous epoch's shuffle, and differently per worker process);
* the sampler remembers the epoch's permutation; a state save stores it with the number of positions consumed, and
  `resume_epoch` replays the rest without drawing anything.
"""

from __future__ import annotations

import os
from multiprocessing import Value

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from dataset.image_video_dataset import BatchCollator, DatasetGroup


class EpochIndexedDataset(Dataset):
    """Indices are (epoch, index) pairs: the group is moved to that epoch's shuffle before the batch is read."""

    def __init__(self, group: DatasetGroup):
        self.group = group

    def __len__(self) -> int:
        return len(self.group)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        self.group.set_current_epoch(epoch)
        return self.group[index]

    def set_current_epoch(self, epoch: int) -> None:
        self.group.set_current_epoch(epoch)

    def set_current_step(self, step: int) -> None:
        self.group.set_current_step(step)


class ResumableRandomSampler(RandomSampler):
    """`RandomSampler` order and random draws, yielding (epoch, index), with a replay of a saved epoch remainder."""

    def __init__(self, data_source: Dataset):
        super().__init__(data_source)
        self.epoch = 0
        self.order: list[int] = []  # this epoch's permutation (all processes' positions)
        self._replay: list[int] | None = None

    def resume_epoch(self, epoch: int, order: list[int], consumed: int) -> None:
        """The next iteration yields `order[consumed:]` of `epoch` and draws nothing."""
        self.epoch, self.order, self._replay = epoch, list(order), list(order[consumed:])

    def __iter__(self):
        epoch = self.epoch
        if self._replay is not None:
            remaining, self._replay = self._replay, None
            yield from ((epoch, i) for i in remaining)
            return
        if self.generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator()
            generator.manual_seed(seed)
        else:
            generator = self.generator
        self.order = torch.randperm(len(self.data_source), generator=generator).tolist()
        yield from ((epoch, i) for i in self.order)


def build_dataloader(group: DatasetGroup, max_workers: int, persistent_workers: bool):
    """(DataLoader, sampler, shared epoch, shared step). Workers: min(--max_data_loader_n_workers, CPU count)."""
    epoch, step = Value("i", 0), Value("i", 0)
    dataset = EpochIndexedDataset(group)
    sampler = ResumableRandomSampler(dataset)
    workers = min(max_workers, os.cpu_count() or 1)
    loader = DataLoader(
        dataset,
        batch_size=1,
        sampler=sampler,
        collate_fn=BatchCollator(epoch, step, group),
        num_workers=workers,
        persistent_workers=persistent_workers and workers > 0,
    )
    return loader, sampler, epoch, step
