"""The order of training batches: musubi-tuner's, for a seed, with and without data-loader workers, across epochs
and through --resume; repeats within an epoch replaced by the batches they pushed out."""

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dataset.config import VideoDatasetParams
from dataset.image_video_dataset import build_dataset_group
from tests.factory.datasets import write_config, write_fake_latent_cache, write_fake_text_cache
from tests.test_train import LWS, train
from training import data as D

SEED = 7
# (stem, sections); lws 3: one section is a 13-frame crop, two sections a 25-frame crop
CLIPS = (("clip_a", 1), ("clip_b", 1), ("clip_c", 2))


def write_clips(cache: Path) -> None:
    for n, (stem, sections) in enumerate(CLIPS):
        write_fake_text_cache(cache / f"{stem}_fp_te.safetensors", seed=50 + n)
        frames = LWS * 4 * sections + 1
        for k in range(sections):
            name = f"{stem}_00000-{frames:03d}-{k:04d}_0048x0032_fp.safetensors"
            write_fake_latent_cache(cache / name, LWS, 4, 6, seed=10 * n + k)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_clips(root / "cache")
    dataset = {
        "video_directory": root / "cache",
        "cache_directory": root / "cache",
        "resolution": [48, 32],
        "target_frames": [13, 25],
        "fp_latent_window_size": LWS,
    }
    return write_config(root / "dataset.toml", [dataset])


def pair_name(path: str) -> tuple[str, int]:
    """(item, section) of a section cache file name."""
    stem, section = re.match(r"(.+)_\d{5}-\d{3}-(\d{4})_", Path(path).name).groups()
    return stem, int(section)


def drawn_batches(monkeypatch):
    """Records the (item, section) pairs of every batch the training step receives."""
    from training.trainer import Trainer

    drawn = []
    step = Trainer.step

    def recording_step(self, batch):
        drawn.extend(pair_name(p) for p in batch["latent_cache_paths"])
        return step(self, batch)

    monkeypatch.setattr(Trainer, "step", recording_step)
    return drawn


A, B, C0, C1 = ("clip_a", 0), ("clip_b", 0), ("clip_c", 0), ("clip_c", 1)
# (workers, persistent) -> the DataLoader permutations of the two epochs, the (item, section) pairs drawn
EXPECTED = {
    (0, False): ([[1, 3, 0, 2], [0, 2, 3, 1]], [B, A, C1, C0, B, C0, A, C1]),
    (2, False): ([[1, 3, 0, 2], [0, 2, 3, 1]], [B, C1, A, C0, A, C0, B, C1]),
    (1, True): ([[1, 3, 0, 2], [2, 3, 0, 1]], [B, A, C1, C0, C0, B, A, C1]),
}


def record_permutations(monkeypatch) -> list:
    permutations = []
    plan = D.epoch_plan

    def recording_plan(group, epoch, permutation, *rest):
        permutations.append(list(permutation))
        return plan(group, epoch, permutation, *rest)

    monkeypatch.setattr(D, "epoch_plan", recording_plan)
    return permutations


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (1, True)])
def test_two_epochs_draw_the_reference_order(models, clips, tmp_path, monkeypatch, workers, persistent):  # noqa: F811
    """--seed 7, 4 batches per epoch, 2 epochs. Derivation from musubi-tuner's algorithm:

    Buckets (W, H, frames), items in cache-listing order: (48, 32, 13) = [A, B] and (48, 32, 25) = [C0, C1]
    (A = clip_a, B = clip_b, Ck = clip_c section k). Batch list (sorted bucket keys, batch size 1), unshuffled:
    I = [A, B, C0, C1]. Dataset seed s = random.randint(0, 2**31) right after set_seed(7) = 1390851128.
    Epoch e's shuffle: random.Random(s + e) shuffles bucket 13, then bucket 25, then the batch list, applied to
    the previous epoch's arrangement: S1 = [B, C1, C0, A], S2 = [A, C1, C0, B].
    DataLoader permutations (torch's draws after the LoRA initialisation): p1 = [1, 3, 0, 2], p2 = [0, 2, 3, 1].

    musubi-tuner tells a loader process the epoch after that process fetched its first batch of the epoch.
    0 workers: position 0 reads the previous arrangement (I in epoch 1, S1 in epoch 2), the others the epoch's:
      epoch 1: I[1]=B, S1[3]=A, S1[0]=B, S1[2]=C0 -> B twice; S1[p1[0]] = S1[1] = C1 was skipped -> B A C1 C0
      epoch 2: S1[0]=B, S2[2]=C0, S2[3]=B, S2[1]=C1 -> B twice; S2[p2[0]] = S2[0] = A was skipped -> B C0 A C1
    2 workers (fresh each epoch, copies of the never-shuffled main-process dataset): positions 0 and 1 read I:
      epoch 1: I[1]=B, I[3]=C1, S1[0]=B, S1[2]=C0 -> B twice; of S1[p1[0]]=C1, S1[p1[1]]=A, A was skipped
               -> B C1 A C0
      epoch 2: I[0]=A, I[2]=C0, S2[3]=B, S2[1]=C1 -> each once, kept as is -> A C0 B C1
    1 persistent worker: one loader process that keeps its arrangement between epochs, as with 0 workers; the
    DataLoader draws its worker seed once, not each epoch, so p2 = [2, 3, 0, 1]:
      epoch 1 as with 0 workers -> B A C1 C0
      epoch 2: S1[2]=C0, S2[3]=B, S2[0]=A, S2[1]=C1 -> each once -> C0 B A C1
    """
    drawn = drawn_batches(monkeypatch)
    permutations = record_permutations(monkeypatch)
    flags = ["--max_train_epochs", "2", "--max_data_loader_n_workers", str(workers)]
    flags += ["--persistent_data_loader_workers"] * persistent
    out = train(models, clips, tmp_path / "run", *flags, seed=SEED)
    assert (permutations, drawn) == EXPECTED[workers, persistent]
    with safe_open(out / "lora.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"], meta["ss_num_batches_per_epoch"]) == ("8", "2", "4")


def test_resume_mid_epoch_continues_the_same_order(models, clips, tmp_path, monkeypatch):  # noqa: F811
    flags = ["--max_train_epochs", "2", "--max_data_loader_n_workers", "2"]
    full = train(models, clips, tmp_path / "full", *flags, "--save_every_n_steps", "3", "--save_state", seed=SEED)
    drawn = drawn_batches(monkeypatch)
    train(models, clips, tmp_path / "resumed", *flags, "--resume", full / "lora-step00000003-state", seed=SEED)
    assert drawn == EXPECTED[2, False][1][3:]


# ---- the plan against an independent replay of musubi-tuner's mechanics ------------------------------------------


def reference_order(group, permutation, epoch, workers, persistent, states):
    """musubi-tuner's draws of one epoch: each loader process (the main one with 0 workers, else one per worker)
    has its own dataset state (epoch, arrangement), fetches with it, then shuffles up to the epoch in its collate
    step. `states` holds the per-process states carried between epochs (persistent workers, or the main process)."""
    processes = max(workers, 1)
    if workers and not persistent:
        states.clear()
    order = []
    for position, index in enumerate(permutation):
        w = position % processes
        state = states.setdefault(w, 0)
        dataset_index, local = D.locate(group, index)
        dataset = group.datasets[dataset_index]
        order.append(D.batch_key(dataset_index, dataset.arrangement(state), local))
        states[w] = epoch
    return order


def mixed_group(tmp_path):
    """Two video datasets (one with num_repeats 2 and batch size 1, one with batch size 2) and an image dataset."""
    from dataset.config import ImageDatasetParams

    first, second, images = tmp_path / "first", tmp_path / "second", tmp_path / "images"
    write_clips(first)
    for n, stem in enumerate(("d", "e", "f", "g")):
        write_fake_text_cache(second / f"{stem}_fp_te.safetensors")
        write_fake_latent_cache(second / f"{stem}_00000-013-0000_0048x0032_fp.safetensors", LWS, 4, 6, seed=n)
    for n, stem in enumerate(("p", "q", "r")):
        write_fake_text_cache(images / f"{stem}_fp_te.safetensors")
        write_fake_latent_cache(images / f"{stem}_0048x0032_fp.safetensors", 1, 4, 6, seed=n)
    params = [
        VideoDatasetParams(video_directory=str(first), resolution=(48, 32), num_repeats=2, fp_latent_window_size=LWS),
        VideoDatasetParams(video_directory=str(second), resolution=(48, 32), batch_size=2, fp_latent_window_size=LWS),
        ImageDatasetParams(image_directory=str(images), resolution=(48, 32)),
    ]
    return build_dataset_group(params, training=True, seed=11)


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (3, True)])
def test_plan_is_the_reference_order_without_its_repeats(tmp_path, workers, persistent):
    group = mixed_group(tmp_path)
    sampler = D.PlannedRandomSampler(D.PlannedBatchDataset(group), workers, persistent, num_processes=1)
    states: dict = {}
    generator = torch.Generator().manual_seed(3)
    differing = 0
    for epoch in range(1, 6):
        permutation = torch.randperm(len(group), generator=generator).tolist()
        plan = sampler.plan(epoch, permutation)
        reference = reference_order(group, permutation, epoch, workers, persistent, states)
        for d, dataset in enumerate(group.datasets):
            own = Counter(D.batch_key(d, dataset.arrangement(epoch), b) for b in range(len(dataset)))
            if dataset.batch_size == 1:
                # every batch exactly once per epoch; musubi-tuner's draw wherever it was not a repeat
                assert Counter(k for k in plan if k[0] == d) == own
                seen = Counter()
                for ours, theirs in zip(plan, reference):
                    if theirs[0] != d:
                        continue
                    seen[theirs] += 1
                    if seen[theirs] <= own[theirs]:
                        assert ours == theirs
                    else:
                        differing += 1
            else:
                # batch size 2: the epoch's own arrangement at every position
                assert [k for k in plan if k[0] == d] == [
                    D.batch_key(d, dataset.arrangement(epoch), D.locate(group, i)[1])
                    for i in permutation
                    if D.locate(group, i)[0] == d
                ]
    assert differing > 0  # the replay does repeat batches, so the comparison above is not vacuous
