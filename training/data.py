"""The training DataLoader and the order of its batches: musubi-tuner's order, without its repeats.

One DataLoader index is one whole batch (batch size 1 at the DataLoader level). Each epoch the sampler draws a
permutation of the group's batch indices exactly as `DataLoader(shuffle=True)` does (one seed from the global torch
RNG in a single process, or accelerate's synchronized generator across processes), so the random draws of a
seeded run are musubi-tuner's.

Which arrangement a position reads (`BaseDataset.arrangement`): musubi-tuner tells the datasets the epoch in the
collate function, i.e. after a batch has been fetched, separately in each loader process (the main process with 0
workers, else every worker process on its own dataset copy). So the first fetch of every loader process in an
epoch still reads the arrangement that process had before: the previous epoch's with 0 workers or persistent
workers, the unshuffled one with fresh workers (their copy comes from the main process, which never shuffles);
every later position reads the epoch's own arrangement. Worker `w` of `W` fetches positions `w, w + W, ...`, and
with several training processes process `p` of `P` gets positions `p, p + P, ...`, so the positions read from the
earlier arrangement are those with `position // P < max(W, 1)`.

This mix can draw a batch twice in an epoch and skip another (musubi-tuner fixed it later by shuffling before
the first fetch, which changed its order). Here, for datasets of batch size 1, a batch drawn a second time within
an epoch is replaced by one the mix skipped, in order: the order is musubi-tuner's at every other position.
Datasets with a larger batch size read every position from the epoch's own arrangement (an earlier arrangement
cuts the buckets into different batches, so repeats cannot be avoided by swapping whole batches).

The sampler yields the batch itself, `(dataset index, latent cache files)`, so worker processes need no epoch
state, the order is the same with and without workers for a given plan, and a saved state replays the rest of an
interrupted epoch (`resume_epoch`) without drawing anything.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from dataset.image_video_dataset import DatasetGroup

BatchKey = tuple[int, tuple[str, ...]]  # (dataset index in the group, latent cache files of the batch)


class PlannedBatchDataset(Dataset):
    """Reads the batch a `BatchKey` names."""

    def __init__(self, group: DatasetGroup):
        self.group = group

    def __len__(self) -> int:
        return len(self.group)

    def __getitem__(self, key: BatchKey):
        dataset_index, paths = key
        return self.group.datasets[dataset_index].load_batch(list(paths))


def first_example(examples: list):
    """Collate function: the DataLoader's batch of one index is that index's (already whole) batch."""
    return examples[0]


def locate(group: DatasetGroup, index: int) -> tuple[int, int]:
    """(dataset index, index inside that dataset) of a group index."""
    dataset_index = bisect.bisect_right(group.cumulative_sizes, index)
    start = group.cumulative_sizes[dataset_index - 1] if dataset_index else 0
    return dataset_index, index - start


def batch_key(dataset_index: int, arrangement, local: int) -> BatchKey:
    return dataset_index, tuple(item.latent_cache_path for item in arrangement.batch_items(local))


def epoch_plan(
    group: DatasetGroup, epoch: int, permutation: list[int], carried_positions: int, carried_from: int
) -> list[BatchKey]:
    """The batches of `epoch` in order. The first `carried_positions` positions read arrangement `carried_from`,
    the others arrangement `epoch`; then, in batch-size-1 datasets, each repeat is replaced by a skipped batch."""
    plan: list[BatchKey] = []
    for position, index in enumerate(permutation):
        dataset_index, local = locate(group, index)
        dataset = group.datasets[dataset_index]
        carried = position < carried_positions and dataset.batch_size == 1
        plan.append(batch_key(dataset_index, dataset.arrangement(carried_from if carried else epoch), local))
    for dataset_index, dataset in enumerate(group.datasets):
        if dataset.batch_size == 1:
            _replace_repeats(plan, dataset_index, dataset.arrangement(epoch), permutation, group, carried_positions)
    return plan


def _replace_repeats(plan, dataset_index, arrangement, permutation, group, carried_positions) -> None:
    """Within one batch-size-1 dataset: keep each batch's earliest draws up to its count in the epoch's arrangement;
    later draws beyond it take, in order, the batches the epoch's arrangement had at the carried positions and
    that were not drawn."""
    positions = [p for p, (d, _) in enumerate(plan) if d == dataset_index]
    wanted = Counter(batch_key(dataset_index, arrangement, b) for b in range(len(arrangement)))
    repeats = []
    for p in positions:
        if wanted[plan[p]] > 0:
            wanted[plan[p]] -= 1
        else:
            repeats.append(p)
    skipped = []
    for p in positions:
        if p >= carried_positions:
            break
        key = batch_key(dataset_index, arrangement, locate(group, permutation[p])[1])
        if wanted[key] > 0:
            wanted[key] -= 1
            skipped.append(key)
    for p, key in zip(repeats, skipped, strict=True):
        plan[p] = key


class PlannedRandomSampler(RandomSampler):
    """`RandomSampler`'s permutation and random draws, yielding the planned `BatchKey`s of the epoch.

    `workers`, `persistent_workers` and `num_processes` describe the loaders whose first fetches musubi-tuner
    reads from an earlier arrangement (see the module docstring)."""

    def __init__(self, dataset: PlannedBatchDataset, workers: int, persistent_workers: bool, num_processes: int):
        super().__init__(dataset)
        self.group = dataset.group
        self.workers, self.persistent_workers, self.num_processes = workers, persistent_workers, num_processes
        self.epoch = 0
        self.order: list[BatchKey] = []  # this epoch's plan (all processes' positions)
        self._replay: list[BatchKey] | None = None

    def carried(self, epoch: int) -> tuple[int, int]:
        """(number of leading positions read from an earlier arrangement, that arrangement's epoch)."""
        positions = max(self.workers, 1) * self.num_processes
        fresh_workers = self.workers > 0 and not self.persistent_workers
        return positions, 0 if fresh_workers else epoch - 1

    def plan(self, epoch: int, permutation: list[int]) -> list[BatchKey]:
        return epoch_plan(self.group, epoch, permutation, *self.carried(epoch))

    def knows(self, order: list) -> bool:
        """Whether a saved plan names batches of this group (the dataset did not change since it was saved)."""
        if len(order) != len(self.group):
            return False
        datasets = self.group.datasets
        return all(
            isinstance(key, (list, tuple))
            and len(key) == 2
            and isinstance(key[0], int)
            and 0 <= key[0] < len(datasets)
            and all(p in datasets[key[0]].items_by_path for p in key[1])
            for key in order
        )

    def resume_epoch(self, epoch: int, order: list, consumed: int) -> None:
        """The next iteration yields `order[consumed:]` of `epoch` and draws nothing."""
        order = [(d, tuple(paths)) for d, paths in order]
        self.epoch, self.order, self._replay = epoch, order, order[consumed:]

    def __iter__(self):
        if self._replay is not None:
            remaining, self._replay = self._replay, None
            yield from remaining
            return
        if self.generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator()
            generator.manual_seed(seed)
        else:
            generator = self.generator
        permutation = torch.randperm(len(self.data_source), generator=generator).tolist()
        self.order = self.plan(self.epoch, permutation)
        yield from self.order


def loader_workers(max_workers: int) -> int:
    """min(--max_data_loader_n_workers, CPU count)."""
    return min(max_workers, os.cpu_count() or 1)


def build_dataloader(
    group: DatasetGroup, max_workers: int, persistent_workers: bool, num_processes: int = 1
) -> tuple[DataLoader, PlannedRandomSampler]:
    workers = loader_workers(max_workers)
    persistent = persistent_workers and workers > 0
    dataset = PlannedBatchDataset(group)
    sampler = PlannedRandomSampler(dataset, workers, persistent, num_processes)
    loader = DataLoader(
        dataset,
        batch_size=1,
        sampler=sampler,
        collate_fn=first_example,
        num_workers=workers,
        persistent_workers=persistent,
    )
    return loader, sampler
