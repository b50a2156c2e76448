"""Cache file names and metadata, section counts, and training-time discovery, batching and shuffling."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from dataset import cache_paths as cp
from dataset.config import ImageDatasetParams, VideoDatasetParams, load_dataset_params
from dataset.image_video_dataset import (
    UNPREPARED_LENGTH,
    ImageDataset,
    ItemInfo,
    VideoDataset,
    batch_content_key,
    build_dataset_group,
)
from hunyuan_model.frame_math import latent_frames
from tests.factory.datasets import write_config, write_fake_latent_cache, write_fake_text_cache
from tests.factory.dims import CLIP_HIDDEN, LLAMA_HIDDEN, SIGLIP_HIDDEN


def test_cache_names_match_the_documented_example():
    key = cp.video_crop_item_key("/videos/clip_a.mp4", 0, 73)
    assert key == "/videos/clip_a_00000-073.mp4"
    path = cp.latent_cache_path("/cache", key, (640, 640))
    assert path == "/cache/clip_a_00000-073_0640x0640_fp.safetensors"
    assert cp.section_cache_path(path, 0) == "/cache/clip_a_00000-073-0000_0640x0640_fp.safetensors"
    assert cp.section_cache_path(path, 1) == "/cache/clip_a_00000-073-0001_0640x0640_fp.safetensors"
    assert cp.text_encoder_cache_path("/cache", "/videos/clip_a.mp4") == "/cache/clip_a_fp_te.safetensors"
    assert cp.latent_cache_path("/c", "/imgs/cat.png", (1024, 768)) == "/c/cat_1024x0768_fp.safetensors"


def test_underscores_in_directories_and_stems():
    path = cp.latent_cache_path("/my_cache", cp.video_crop_item_key("/v/my_clip_v2.mkv", 12, 37), (48, 32))
    section = cp.section_cache_path(path, 3)
    assert section == "/my_cache/my_clip_v2_00012-037-0003_0048x0032_fp.safetensors"
    name = cp.parse_latent_cache_name(section, is_video=True)
    assert name == cp.LatentCacheName("my_clip_v2", (48, 32), 12, 37, 3)
    assert cp.parse_latent_cache_name(path, is_video=True).section is None
    image = cp.parse_latent_cache_name("/c/my_cat_0512x0384_fp.safetensors", is_video=False)
    assert image == cp.LatentCacheName("my_cat", (512, 384))
    with pytest.raises(ValueError, match="not a video latent cache name"):
        cp.parse_latent_cache_name("/c/my_cat_0512x0384_fp.safetensors", is_video=True)
    with pytest.raises(ValueError, match="cache_directory is required"):
        cp.latent_cache_path(None, "a.png", (1, 1))


@pytest.mark.parametrize(
    ("frames", "sections", "aligned"), [(73, 2, 73), (80, 2, 73), (37, 1, 37), (36, 0, 1), (145, 4, 145), (181, 5, 181)]
)
def test_section_count_and_trimming(frames, sections, aligned):
    assert cp.section_count(frames, 9) == sections
    assert cp.aligned_frame_count(frames, 9) == aligned
    paths = cp.video_section_cache_paths(f"/c/v_00000-{frames:03d}_0048x0032_fp.safetensors", frames, 9)
    assert len(paths) == max(1, sections)
    assert cp.min_section_frames(9) == 37 and latent_frames(73) == 19


def test_item_latent_cache_paths_per_section():
    item = ItemInfo("/v/a_00000-073.mp4", "", (48, 32), frame_count=73, fp_latent_window_size=9)
    item.latent_cache_path = "/c/a_00000-073_0048x0032_fp.safetensors"
    assert item.latent_cache_paths() == [
        "/c/a_00000-073-0000_0048x0032_fp.safetensors",
        "/c/a_00000-073-0001_0048x0032_fp.safetensors",
    ]
    item.fp_latent_window_size = 5  # 19 latent frames → 3 sections of 5
    assert len(item.latent_cache_paths()) == 3


def test_metadata_dicts():
    assert cp.latent_cache_metadata((640, 480), 73) == {
        "architecture": "framepack", "width": "640", "height": "480", "format_version": "1.0.1", "frame_count": "73",
    }  # fmt: skip
    assert "frame_count" not in cp.latent_cache_metadata((640, 480))
    assert cp.text_encoder_cache_metadata("a cat") == {
        "architecture": "framepack", "caption1": "a cat", "format_version": "1.0.1"
    }  # fmt: skip


def test_cache_file_listing(tmp_path):
    for name in ("b_0048x0032_fp.safetensors", "a_0048x0032_fp.safetensors", "a_fp_te.safetensors", "x_hv.safetensors"):
        (tmp_path / name).touch()
    assert [p.rsplit("/", 1)[1] for p in cp.list_latent_cache_files(str(tmp_path))] == [
        "a_0048x0032_fp.safetensors",
        "b_0048x0032_fp.safetensors",
    ]
    assert [p.rsplit("/", 1)[1] for p in cp.list_text_encoder_cache_files(str(tmp_path))] == ["a_fp_te.safetensors"]


def test_batch_content_keys():
    assert batch_content_key("latents_9x80x80_float16") == "latents"
    assert batch_content_key("latents_clean_2x_9x80x80_float16") == "latents_clean_2x"
    assert batch_content_key("clean_latent_4x_indices_int64") == "clean_latent_4x_indices"
    assert batch_content_key("image_embeddings_float16") == "image_embeddings"
    assert batch_content_key("llama_attention_mask") == "llama_attention_mask"
    assert batch_content_key("clip_l_pooler_float16") == "clip_l_pooler"


def _video_caches(cache, clips):
    """Fake section caches: clips = {stem: (size, [(start, frames, sections)])}; text caches for every stem."""
    for stem, (size, crops) in clips.items():
        write_fake_text_cache(cache / f"{stem}_fp_te.safetensors")
        for start, frames, sections in crops:
            for k in range(sections):
                name = f"{stem}_{start:05d}-{frames:03d}-{k:04d}_{size[0]:04d}x{size[1]:04d}_fp.safetensors"
                write_fake_latent_cache(cache / name, height=size[1] // 8, width=size[0] // 8, seed=k)


@pytest.fixture
def video_cache(tmp_path):
    cache = tmp_path / "cache"
    _video_caches(
        cache,
        {
            "a": ((48, 32), [(0, 73, 2), (0, 37, 1)]),
            "b": ((48, 32), [(0, 73, 2)]),
            "c": ((32, 48), [(0, 73, 2)]),
            "d_long_name": ((48, 32), [(10, 37, 1)]),
        },
    )
    return cache


def _video_dataset(cache, **params):
    return VideoDataset(VideoDatasetParams(video_directory=str(cache), **params))


def test_video_cache_discovery_buckets_and_repeats(video_cache, caplog):
    write_fake_latent_cache(video_cache / "orphan_00000-037-0000_0048x0032_fp.safetensors")  # no text cache
    dataset = _video_dataset(video_cache, batch_size=2, num_repeats=2)
    assert len(dataset) == UNPREPARED_LENGTH
    with caplog.at_level(logging.WARNING):
        dataset.prepare_for_training()
    assert "orphan_fp_te.safetensors" in caplog.text
    buckets = dataset.batch_manager.buckets
    # the size in a video name is used as is: 32x48 latents never share a batch with 48x32 ones, bucketing or not
    assert sorted(buckets) == [(32, 48, 73), (48, 32, 37), (48, 32, 73)]
    assert [len(buckets[k]) for k in sorted(buckets)] == [4, 4, 8]  # sections × repeats
    assert dataset.num_train_items == 16
    assert len(dataset) == 2 + 2 + 4  # ceil(len / batch_size) per bucket, buckets in sorted order
    assert dataset.batch_manager.batch_indices[:3] == [((32, 48, 73), 0), ((32, 48, 73), 1), ((48, 32, 37), 0)]
    item = buckets[(48, 32, 37)][0]
    assert (item.item_key, item.start_frame, item.frame_count) == ("a", 0, 37)
    assert item.text_encoder_output_cache_path == str(video_cache / "a_fp_te.safetensors")


def test_batch_assembly_stacks_every_key(video_cache):
    dataset = _video_dataset(video_cache, batch_size=2)
    dataset.prepare_for_training()
    batch = dataset[len(dataset) - 1]  # a (48, 32, 73) batch
    h, w = 4, 6
    assert batch["latents"].shape == (2, 16, 9, h, w) and batch["latents"].dtype == torch.float16
    assert batch["latents_clean"].shape == (2, 16, 2, h, w)
    assert batch["latents_clean_2x"].shape == (2, 16, 2, h, w)
    assert batch["latents_clean_4x"].shape == (2, 16, 16, h, w)
    assert batch["latent_indices"].shape == (2, 9) and batch["clean_latent_4x_indices"].shape == (2, 16)
    assert batch["image_embeddings"].shape == (2, 729, SIGLIP_HIDDEN)
    assert batch["llama_vec"].shape == (2, 512, LLAMA_HIDDEN)
    assert batch["llama_attention_mask"].dtype == torch.bool and batch["llama_attention_mask"].shape == (2, 512)
    assert batch["clip_l_pooler"].shape == (2, CLIP_HIDDEN)


def _order(dataset, epoch=0):
    arrangement = dataset.arrangement(epoch)
    return [[i.latent_cache_path for i in arrangement.batch_items(b)] for b in range(len(dataset))]


def test_shuffle_is_seeded_reproducible_and_leaves_global_random_alone(video_cache):
    first, second, other = (_video_dataset(video_cache, batch_size=2) for _ in range(3))
    for dataset, seed in ((first, 1234), (second, 1234), (other, 99)):
        dataset.prepare_for_training()
        dataset.set_seed(seed)
    unshuffled = _order(first)
    random.seed(7)
    state = random.getstate()
    epoch1 = _order(first, 1)
    assert random.getstate() == state
    assert epoch1 == _order(second, 1) != unshuffled
    assert _order(other, 1) != epoch1
    assert _order(first) == unshuffled  # arrangements are copies: the unshuffled one stays

    # musubi-tuner's draws: reseed with seed + epoch, shuffle each bucket (in the order the buckets first appear
    # in the cache listing), then the batch list; every epoch shuffles the previous epoch's arrangement
    expected = _video_dataset(video_cache, batch_size=2)
    expected.prepare_for_training()
    manager = expected.batch_manager
    assert list(manager.buckets) != sorted(manager.buckets)  # so the bucket order matters here
    for epoch in (1, 2, 3):
        rng = random.Random(1234 + epoch)
        for key in manager.buckets:
            rng.shuffle(manager.buckets[key])
        rng.shuffle(manager.batch_indices)
        assert [[i.latent_cache_path for i in manager.batch_items(b)] for b in range(len(manager))] == _order(
            first, epoch
        )
    assert _order(second, 3) == _order(first, 3) != epoch1  # straight to epoch 3 or through 1 and 2: the same


def test_image_cache_discovery_bucket_keys(tmp_path):
    cache = tmp_path / "cache"
    for stem, size in (("p", (1000, 1000)), ("q", (1920, 1080)), ("r", (1080, 1920))):
        write_fake_text_cache(cache / f"{stem}_fp_te.safetensors")
        write_fake_latent_cache(cache / f"{stem}_{size[0]:04d}x{size[1]:04d}_fp.safetensors")
    params = ImageDatasetParams(image_directory=str(cache), resolution=(640, 640), enable_bucket=True)
    dataset = ImageDataset(params)
    dataset.prepare_for_training()
    assert sorted(dataset.batch_manager.buckets) == [(480, 848, 9), (640, 640, 9), (848, 480, 9)]
    params.fp_1f_clean_indices, params.fp_1f_no_post, params.fp_latent_window_size = [0, 10], True, 5
    dataset = ImageDataset(params)
    dataset.prepare_for_training()
    assert (640, 640, 5, 2, True) in dataset.batch_manager.buckets
    assert dataset.batch_manager.buckets[(640, 640, 5, 2, True)][0].item_key == "p"


def test_group_seed_collator_and_metadata(video_cache, tmp_path):
    config = write_config(tmp_path / "c.toml", [{"video_directory": str(video_cache), "target_frames": [26, 25]}])
    params = load_dataset_params(str(config))
    random.seed(5)
    group = build_dataset_group(params, training=True)
    dataset = group.datasets[0]
    assert dataset.seed == random.Random(5).randint(0, 2**31)
    assert group.num_train_items == dataset.num_train_items == 8 and len(group) == 8

    metadata = dataset.get_metadata()
    assert metadata == {
        "resolution": [960, 544], "caption_extension": None, "batch_size_per_device": 1, "num_repeats": 1,
        "enable_bucket": False, "bucket_no_upscale": False, "video_directory": "cache", "frame_extraction": "head",
        "frame_stride": 1, "frame_sample": 1, "target_frames": [25], "max_frames": 129, "source_fps": None,
        "has_control": False,
    }  # fmt: skip


def test_training_never_touches_media_directories(tmp_path):
    cache = tmp_path / "cache"
    _video_caches(cache, {"a": ((48, 32), [(0, 37, 1)])})
    params = VideoDatasetParams(video_directory=str(tmp_path / "gone"), cache_directory=str(cache))
    group = build_dataset_group([params], training=True, seed=0)
    assert group.num_train_items == 1
