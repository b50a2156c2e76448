"""Datasets for caching and training.

Caching: `retrieve_latent_cache_batches` yields bucket-grouped `ItemInfo` batches with resized content, and
`retrieve_text_encoder_output_cache_batches` yields caption batches; the caching scripts encode and save them.
Training: `prepare_for_training` discovers the cache files, groups them into buckets, and each dataset index is
then one whole batch of stacked cached tensors. The order is reshuffled every epoch from `seed + epoch`
(`BaseDataset.arrangement`); `training.data` decides which arrangement each batch of an epoch is read from.

`BucketSelector` and `resize_image_to_bucket` (defined in `dataset.buckets`) are importable from here too, where
musubi-tuner keeps them.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dataset import cache_paths
from dataset.buckets import BucketSelector, resize_image_to_bucket
from dataset.caching import RECACHE_HINT, CacheFileError, check_cache_header
from dataset.config import (
    BaseDatasetParams,
    DatasetParams,
    ImageDatasetParams,
    VideoDatasetParams,
    effective_cache_directory,
    load_dataset_params,
)
from dataset.datasource import (
    Datasource,
    image_directory_source,
    image_jsonl_source,
    video_directory_source,
    video_jsonl_source,
)
from dataset.frames import TARGET_FPS, frame_crops, round_target_frames
from dataset.media import load_video
from utils.cli import UsageError, one_line

logger = logging.getLogger(__name__)

VALIDATION_SPLIT_SEED = 0  # the fixed draw of --validation_split, independent of --seed
UNPREPARED_LENGTH = 100  # what a training dataset reports before prepare_for_training (musubi-tuner's dummy)


@dataclass
class ItemInfo:
    """One caching item: an image, or a crop of a video; also one discovered cache file at training time."""

    item_key: str  # image: its path; video crop: video_crop_item_key(path, start, length)
    caption: str
    original_size: tuple[int, int]  # image: original (W, H); video: bucketed frame (W, H), as in the cache name
    bucket_size: tuple | None = None  # the batch key: see ImageDataset/VideoDataset.caching_bucket_key
    frame_count: int | None = None  # video crop length (before trimming to whole sections)
    start_frame: int | None = None  # video crop start
    content: np.ndarray | None = field(default=None, repr=False)  # uint8 (H, W, 3) image or (F, H, W, 3) crop
    latent_cache_path: str | None = None  # video: without section index, see latent_cache_paths()
    text_encoder_output_cache_path: str | None = None
    # image: list of (H, W, 3|4) arrays (RGBA keeps the mask), video: (F, H, W, 3) array
    control_content: np.ndarray | list[np.ndarray] | None = field(default=None, repr=False)
    fp_latent_window_size: int | None = None
    fp_1f_clean_indices: list[int] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool | None = None

    @property
    def stem(self) -> str:
        """Base name the cache files are named after (a crop's includes its `_<start>-<length>` token)."""
        return cache_paths.media_stem(self.item_key)

    def latent_cache_paths(self) -> list[str]:
        """Every file caching this item writes: one for an image, one per section for a video crop."""
        if self.frame_count is None:
            return [self.latent_cache_path]
        lws = self.fp_latent_window_size
        return cache_paths.video_section_cache_paths(self.latent_cache_path, self.frame_count, lws)


def ordered_parallel_map(fn: Callable[[Any], Any], items: Iterable, num_workers: int) -> Iterator:
    """fn over items in worker threads, results in input order, at most 2·num_workers results in flight."""
    num_workers = max(1, num_workers)
    with ThreadPoolExecutor(max_workers=num_workers) as executor:
        pending: deque = deque()
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _bucketed_batches(items: Iterable[ItemInfo], batch_size: int) -> Iterator[tuple[tuple, list[ItemInfo]]]:
    """Group items by `bucket_size`; emit a bucket as soon as it holds `batch_size` items, leftovers at the end."""
    pending: dict[tuple, list[ItemInfo]] = {}
    for item in items:
        bucket = pending.setdefault(item.bucket_size, [])
        bucket.append(item)
        if len(bucket) >= batch_size:
            yield item.bucket_size, pending.pop(item.bucket_size)
    for key, bucket in pending.items():
        yield key, bucket


def batch_content_key(tensor_key: str) -> str:
    """Batch key of a cached tensor: drop the dtype suffix, and for `latents_*` also the FxHxW token."""
    if tensor_key.endswith("_mask"):
        return tensor_key
    key = tensor_key.rsplit("_", 1)[0]
    if key.startswith("latents_"):
        key = key.rsplit("_", 1)[0]
    return key


def read_cache_file(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CacheFileError(f"{path}: unreadable cache file ({one_line(e)}); {RECACHE_HINT}") from None


def load_batch(items: list[ItemInfo]) -> dict[str, Any]:
    """Latent and text caches of one batch, merged, grouped by `batch_content_key` and stacked on dim 0; the latent
    cache files under `latent_cache_paths` (which items the batch holds)."""
    grouped: dict[str, list[torch.Tensor]] = {}
    varlen: set[str] = set()
    for item in items:
        tensors = {**read_cache_file(item.latent_cache_path), **read_cache_file(item.text_encoder_output_cache_path)}
        for key, tensor in tensors.items():
            content_key = batch_content_key(key.removeprefix("varlen_"))
            if key.startswith("varlen_"):
                varlen.add(content_key)
            grouped.setdefault(content_key, []).append(tensor)
    batch: dict[str, Any] = {key: values if key in varlen else torch.stack(values) for key, values in grouped.items()}
    batch["latent_cache_paths"] = [item.latent_cache_path for item in items]
    return batch


class BucketBatchManager:
    """Training batches: bucket keys sorted, each bucket cut into ceil(len / batch_size) batches."""

    def __init__(self, buckets: dict[tuple, list[ItemInfo]], batch_size: int):
        self.batch_size = batch_size
        self.buckets = buckets  # insertion order: the order the buckets first appear in the cache listing
        self.bucket_keys = sorted(buckets)
        self.batch_indices = [
            (key, i) for key in self.bucket_keys for i in range(math.ceil(len(buckets[key]) / batch_size))
        ]

    def show_bucket_info(self) -> None:
        for key in self.bucket_keys:
            logger.info(f"bucket: {key}, count: {len(self.buckets[key])}")
        logger.info(f"total batches: {len(self)}")

    def copy(self) -> BucketBatchManager:
        other = BucketBatchManager({key: list(items) for key, items in self.buckets.items()}, self.batch_size)
        other.batch_indices = list(self.batch_indices)
        return other

    def shuffle(self, rng: random.Random) -> None:
        """Shuffle the items inside every bucket (in insertion order, as musubi-tuner), then the batch order."""
        for items in self.buckets.values():
            rng.shuffle(items)
        rng.shuffle(self.batch_indices)

    def __len__(self) -> int:
        return len(self.batch_indices)

    def batch_items(self, index: int) -> list[ItemInfo]:
        key, number = self.batch_indices[index]
        return self.buckets[key][number * self.batch_size : (number + 1) * self.batch_size]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_batch(self.batch_items(index))


class BaseDataset(torch.utils.data.Dataset):
    is_video = False

    def __init__(self, params: BaseDatasetParams):
        self.params = params
        self.resolution = tuple(params.resolution)
        self.caption_extension = params.caption_extension
        self.batch_size = params.batch_size
        self.num_repeats = params.num_repeats
        self.enable_bucket = params.enable_bucket
        self.bucket_no_upscale = params.bucket_no_upscale and params.enable_bucket
        self.cache_directory = effective_cache_directory(params)
        self.debug_dataset = params.debug_dataset
        self.fp_latent_window_size = params.fp_latent_window_size
        self.control_directory = params.control_directory
        self.seed: int | None = None
        self.max_train_steps = 0
        self.batch_manager: BucketBatchManager | None = None  # the unshuffled arrangement (epoch 0)
        self._arrangements: dict[int, BucketBatchManager] = {}  # the latest shuffled ones, by epoch
        self.items_by_path: dict[str, ItemInfo] = {}
        self.num_train_items = 0
        self._datasource: Datasource | None = None

    # media side (caching) --------------------------------------------------------------------------------------

    @property
    def datasource(self) -> Datasource:
        """Built on first use, so training from caches never needs the media directories."""
        if self._datasource is None:
            self._datasource = self._make_datasource()
        return self._datasource

    def _make_datasource(self) -> Datasource:
        raise NotImplementedError

    @property
    def jsonl_file(self) -> str | None:
        raise NotImplementedError

    @property
    def has_control(self) -> bool:
        if self.jsonl_file is None:
            return self.control_directory is not None
        return self.datasource.has_control

    def get_latent_cache_path(self, item_key: str, size: tuple[int, int]) -> str:
        return cache_paths.latent_cache_path(self.cache_directory, item_key, size)

    def get_text_encoder_output_cache_path(self, item_key: str) -> str:
        return cache_paths.text_encoder_cache_path(self.cache_directory, item_key)

    def get_all_latent_cache_files(self) -> list[str]:
        return cache_paths.list_latent_cache_files(self.cache_directory)

    def get_all_text_encoder_output_cache_files(self) -> list[str]:
        return cache_paths.list_text_encoder_cache_files(self.cache_directory)

    def retrieve_latent_cache_batches(
        self, num_workers: int, media: Sequence[int] | None = None
    ) -> Iterator[tuple[tuple, list[ItemInfo]]]:
        """Items to cache in batches; `media` picks the media files by index in listing order (all by default), so
        several processes can each read only their share."""
        raise NotImplementedError

    def retrieve_text_encoder_output_cache_batches(
        self, num_workers: int, media: Sequence[int] | None = None
    ) -> Iterator[list[ItemInfo]]:
        """Caption items (item_key = media path) in listing order, in batches of `batch_size`; `media` picks the
        media files by index (all by default), as for `retrieve_latent_cache_batches`."""
        source = self.datasource
        source.check_captions()

        def fetch(index: int) -> ItemInfo:
            key, caption = source.get_caption(index)
            text_path = self.get_text_encoder_output_cache_path(key)
            return ItemInfo(key, caption, (0, 0), text_encoder_output_cache_path=text_path)

        batch: list[ItemInfo] = []
        for item in ordered_parallel_map(fetch, range(len(source)) if media is None else media, num_workers):
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    # training side ---------------------------------------------------------------------------------------------

    def _training_bucket_key(self, name: cache_paths.LatentCacheName) -> tuple:
        raise NotImplementedError

    def prepare_for_training(self) -> None:
        """Pair every latent cache with its text cache and put it (num_repeats times) in its training bucket."""
        buckets: dict[tuple, list[ItemInfo]] = {}
        for path in self.get_all_latent_cache_files():
            name = cache_paths.parse_latent_cache_name(path, self.is_video)
            text_path = self.get_text_encoder_output_cache_path(name.item_key)
            if not os.path.exists(text_path):
                logger.warning(f"text encoder output cache not found, skipping {path}: {text_path}")
                continue
            self.check_cache_files(path, text_path)
            key = self._training_bucket_key(name)
            item = ItemInfo(
                name.item_key,
                "",
                name.size,
                key,
                frame_count=name.frame_count,
                start_frame=name.start,
                latent_cache_path=path,
                text_encoder_output_cache_path=text_path,
            )
            buckets.setdefault(key, []).extend([item] * self.num_repeats)
        self._set_buckets(buckets)
        self.batch_manager.show_bucket_info()

    def check_cache_files(self, latent_path: str, text_path: str) -> None:
        """Both cache files of an item open, and a video section holds as many latent frames as this dataset's
        fp_latent_window_size (training on caches of another window size would be silently wrong)."""
        infos = check_cache_header(latent_path)
        check_cache_header(text_path)
        if not self.is_video:
            return
        targets = [
            info for key, info in infos.items() if key.startswith("latents_") and not key.startswith("latents_clean")
        ]
        if targets and len(targets[0].shape) == 4 and targets[0].shape[1] != self.fp_latent_window_size:
            raise CacheFileError(
                f"{latent_path}: cached with fp_latent_window_size {targets[0].shape[1]}, but {self.params.label} of "
                f"the dataset config sets {self.fp_latent_window_size}: re-cache the dataset with "
                f"fpack_cache_latents.py, or set fp_latent_window_size = {targets[0].shape[1]}"
            )

    def _set_buckets(self, buckets: dict[tuple, list[ItemInfo]]) -> None:
        self.batch_manager = BucketBatchManager(buckets, self.batch_size)
        self._arrangements = {}
        self.items_by_path = {item.latent_cache_path: item for items in buckets.values() for item in items}
        self.num_train_items = sum(len(b) for b in buckets.values())

    def split_off(self, fraction: float) -> BaseDataset:
        """Move `fraction` of the items (whole images or video crops, with all their sections; at least one)
        into a new dataset with the same settings and no repeats, and return it. Which items is a fixed draw
        (`random.Random(VALIDATION_SPLIT_SEED)` over the sorted item keys), the same for every --seed."""
        buckets = self.batch_manager.buckets
        keys = sorted({item.item_key for items in buckets.values() for item in items})
        count = max(1, round(len(keys) * fraction))
        if count >= len(keys):
            raise UsageError(
                f"--validation_split {fraction}: {self.params.label} has {len(keys)} item(s), too few to hold out "
                f"{count} and train on the rest"
            )
        held = set(random.Random(VALIDATION_SPLIT_SEED).sample(keys, count))
        held_out = copy.copy(self)
        held_out.num_repeats = 1
        unique = {
            key: list({i.latent_cache_path: i for i in items if i.item_key in held}.values())
            for key, items in buckets.items()
        }
        held_out._set_buckets({key: items for key, items in unique.items() if items})
        kept = {key: [i for i in items if i.item_key not in held] for key, items in buckets.items()}
        self._set_buckets({key: items for key, items in kept.items() if items})
        logger.info(f"{self.params.label}: {count} of {len(keys)} items held out for validation")
        return held_out

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self.max_train_steps = max_train_steps

    def arrangement(self, epoch: int) -> BucketBatchManager:
        """The batches of `epoch`: the unshuffled arrangement shuffled once per epoch 1..epoch, each time with
        `random.Random(seed + that epoch)` (musubi-tuner's reseeded global `random`, without touching the global
        generator). Epoch 0 is the unshuffled arrangement."""
        if epoch == 0:
            return self.batch_manager
        if self.seed is None:
            raise RuntimeError("set_seed must be called before shuffling")
        if epoch not in self._arrangements:
            start = max((e for e in self._arrangements if e < epoch), default=0)
            manager = (self._arrangements[start] if start else self.batch_manager).copy()
            for e in range(start + 1, epoch + 1):
                manager.shuffle(random.Random(self.seed + e))
            self._arrangements = {e: m for e, m in self._arrangements.items() if e > epoch - 2}
            self._arrangements[epoch] = manager
        return self._arrangements[epoch]

    def load_batch(self, latent_cache_paths: list[str]) -> dict[str, Any]:
        """The batch of these latent cache files (named by `arrangement(...).batch_items`)."""
        return load_batch([self.items_by_path[path] for path in latent_cache_paths])

    def __len__(self) -> int:
        return UNPREPARED_LENGTH if self.batch_manager is None else len(self.batch_manager)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """A batch of the unshuffled arrangement; training reads batches through `arrangement` and `load_batch`."""
        return self.batch_manager[index]

    def get_metadata(self) -> dict:
        """This dataset's entry of the LoRA's `ss_datasets` metadata (directories as base names)."""
        return {
            "resolution": list(self.resolution),
            "caption_extension": self.caption_extension,
            "batch_size_per_device": self.batch_size,
            "num_repeats": self.num_repeats,
            "enable_bucket": bool(self.enable_bucket),
            "bucket_no_upscale": bool(self.bucket_no_upscale),
        }

    @staticmethod
    def _basenames(**paths: str | None) -> dict[str, str]:
        return {key: os.path.basename(path) for key, path in paths.items() if path is not None}


class ImageDataset(BaseDataset):
    """Image dataset: FramePack uses it for one-frame training, with control images."""

    def __init__(self, params: ImageDatasetParams):
        super().__init__(params)
        self.image_directory = params.image_directory
        self.image_jsonl_file = params.image_jsonl_file
        self.fp_1f_clean_indices = params.fp_1f_clean_indices
        self.fp_1f_target_index = params.fp_1f_target_index
        self.fp_1f_no_post = params.fp_1f_no_post
        # one control image per clean index (the indices also fix how many controls each image has)
        self.control_count = len(params.fp_1f_clean_indices) if params.fp_1f_clean_indices is not None else 1
        self.bucket_selector = BucketSelector(self.resolution, self.enable_bucket, self.bucket_no_upscale)

    @property
    def jsonl_file(self) -> str | None:
        return self.image_jsonl_file

    def _make_datasource(self) -> Datasource:
        if self.image_directory is not None:
            return image_directory_source(
                self.image_directory, self.caption_extension, self.control_directory, self.control_count
            )
        return image_jsonl_source(self.image_jsonl_file, self.control_count)

    def caching_bucket_key(self, bucket_reso: tuple[int, int]) -> tuple:
        """(W, H, lws), plus (number of clean indices, no_post) when `fp_1f_clean_indices` is set."""
        key = (*bucket_reso, self.fp_latent_window_size)
        if self.fp_1f_clean_indices is not None:
            key += (len(self.fp_1f_clean_indices), self.fp_1f_no_post)
        return key

    def _training_bucket_key(self, name: cache_paths.LatentCacheName) -> tuple:
        return self.caching_bucket_key(self.bucket_selector.get_bucket_resolution(name.size))

    def retrieve_latent_cache_batches(
        self, num_workers: int, media: Sequence[int] | None = None
    ) -> Iterator[tuple[tuple, list[ItemInfo]]]:
        """Images resized to their bucket (controls to the same bucket), grouped by `caching_bucket_key`."""
        source = self.datasource
        source.check_captions()

        def fetch(index: int) -> ItemInfo:
            image, controls = source.load_image_entry(index)
            bucket_reso = self.bucket_selector.get_bucket_resolution(image.size)
            path = source.entries[index].path
            return ItemInfo(
                path,
                source.entries[index].read_caption(),
                image.size,
                self.caching_bucket_key(bucket_reso),
                content=resize_image_to_bucket(image, bucket_reso),
                latent_cache_path=self.get_latent_cache_path(path, image.size),
                text_encoder_output_cache_path=self.get_text_encoder_output_cache_path(path),
                control_content=[resize_image_to_bucket(c, bucket_reso) for c in controls] if controls else None,
                fp_latent_window_size=self.fp_latent_window_size,
                fp_1f_clean_indices=self.fp_1f_clean_indices,
                fp_1f_target_index=self.fp_1f_target_index,
                fp_1f_no_post=self.fp_1f_no_post,
            )

        items = ordered_parallel_map(fetch, range(len(source)) if media is None else media, num_workers)
        yield from _bucketed_batches(items, self.batch_size)

    def get_metadata(self) -> dict:
        metadata = super().get_metadata()
        metadata.update(
            self._basenames(
                image_directory=self.image_directory,
                image_jsonl_file=self.image_jsonl_file,
                control_directory=self.control_directory,
            )
        )
        metadata["has_control"] = self.has_control
        return metadata


class VideoDataset(BaseDataset):
    """Video dataset: each video becomes one or more crops (`frame_extraction`), cached as FramePack sections."""

    is_video = True

    def __init__(self, params: VideoDatasetParams):
        super().__init__(params)
        self.video_directory = params.video_directory
        self.video_jsonl_file = params.video_jsonl_file
        self.target_frames = round_target_frames(params.target_frames)
        self.frame_extraction = params.frame_extraction
        self.frame_stride = params.frame_stride
        self.frame_sample = params.frame_sample
        self.max_frames = params.max_frames
        self.source_fps = params.source_fps
        self.target_fps = TARGET_FPS
        if self.frame_extraction == "uniform" and self.frame_sample == 1:
            logger.warning("frame_extraction 'uniform' with frame_sample 1 is 'head'; using 'head'")
            self.frame_extraction = "head"
        # head only needs the longest target; other modes decode the whole video
        self.end_frame = max(self.target_frames) if self.frame_extraction == "head" else None

    @property
    def jsonl_file(self) -> str | None:
        return self.video_jsonl_file

    def _make_datasource(self) -> Datasource:
        if self.video_directory is not None:
            return video_directory_source(self.video_directory, self.caption_extension, self.control_directory)
        return video_jsonl_source(self.video_jsonl_file)

    def caching_bucket_key(self, bucket_reso: tuple[int, int], frame_count: int) -> tuple:
        return (*bucket_reso, frame_count, self.fp_latent_window_size)

    def _training_bucket_key(self, name: cache_paths.LatentCacheName) -> tuple:
        # The size in a video cache name is already the bucketed frame size, so it is used as is. musubi-tuner
        # re-buckets it with the training settings, which with enable_bucket=false put differently sized latents
        # in one bucket (caching always buckets videos) and failed to stack them.
        return (*name.size, name.frame_count)

    def load_frames(self, index: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Decoded, bucket-resized frames of one video and of its control video (cut or padded to the same length).

        Caching always buckets videos at `resolution` (bucketing on, no_upscale off), whatever enable_bucket says.
        """
        entry = self.datasource.entries[index]
        timing = dict(start_frame=0, end_frame=self.end_frame, source_fps=self.source_fps, target_fps=self.target_fps)
        frames = load_video(entry.path, bucket_selector=BucketSelector(self.resolution), **timing)
        if not entry.control_paths:
            return frames, None
        bucket_reso = (frames[0].shape[1], frames[0].shape[0])
        control = load_video(entry.control_paths[0], bucket_reso=bucket_reso, **timing)
        control = control[: len(frames)] + [control[-1]] * (len(frames) - len(control))
        return frames, control

    def crops(self, frame_count: int) -> list[tuple[int, int]]:
        """(start, length) crops of a video of `frame_count` decoded frames."""
        return frame_crops(
            frame_count,
            self.target_frames,
            self.frame_extraction,
            self.frame_stride,
            self.frame_sample,
            self.max_frames,
        )

    def retrieve_latent_cache_batches(
        self, num_workers: int, media: Sequence[int] | None = None
    ) -> Iterator[tuple[tuple, list[ItemInfo]]]:
        """Every crop of every video as an item, grouped by (W, H, crop length, lws)."""
        source = self.datasource
        source.check_captions()

        def fetch(index: int) -> list[ItemInfo]:
            frames, control = self.load_frames(index)
            video = np.stack(frames)
            control_video = np.stack(control) if control is not None else None
            size = (video.shape[2], video.shape[1])
            path = source.entries[index].path
            caption = source.entries[index].read_caption()
            items = []
            crops = self.crops(len(video))
            for start, length in crops:
                key = cache_paths.video_crop_item_key(path, start, length)
                items.append(
                    ItemInfo(
                        key,
                        caption,
                        size,
                        self.caching_bucket_key(size, length),
                        frame_count=length,
                        start_frame=start,
                        content=video[start : start + length],
                        latent_cache_path=self.get_latent_cache_path(key, size),
                        text_encoder_output_cache_path=self.get_text_encoder_output_cache_path(path),
                        control_content=control_video[start : start + length] if control_video is not None else None,
                        fp_latent_window_size=self.fp_latent_window_size,
                    )
                )
            if not crops:
                logger.warning(f"{path}: {len(video)} frames, shorter than every target_frames {self.target_frames}")
            return items

        indices = range(len(source)) if media is None else media
        items = (item for crops in ordered_parallel_map(fetch, indices, num_workers) for item in crops)
        yield from _bucketed_batches(items, self.batch_size)

    def get_metadata(self) -> dict:
        metadata = super().get_metadata()
        metadata.update(
            self._basenames(
                video_directory=self.video_directory,
                video_jsonl_file=self.video_jsonl_file,
                control_directory=self.control_directory,
            )
        )
        metadata.update(
            frame_extraction=self.frame_extraction,
            frame_stride=self.frame_stride,
            frame_sample=self.frame_sample,
            target_frames=list(self.target_frames),
            max_frames=self.max_frames,
            source_fps=self.source_fps,
            has_control=self.has_control,
        )
        return metadata


class DatasetGroup(torch.utils.data.ConcatDataset):
    """All datasets of a config; one index = one whole batch of one dataset."""

    def __init__(self, datasets: list[ImageDataset | VideoDataset]):
        super().__init__(datasets)
        self.datasets: list[ImageDataset | VideoDataset] = datasets
        self.num_train_items = sum(d.num_train_items for d in datasets)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        for dataset in self.datasets:
            dataset.set_max_train_steps(max_train_steps)


def make_dataset(params: DatasetParams) -> ImageDataset | VideoDataset:
    return VideoDataset(params) if isinstance(params, VideoDatasetParams) else ImageDataset(params)


def build_dataset_group(params: list[DatasetParams], training: bool = False, seed: int | None = None) -> DatasetGroup:
    """Datasets of a resolved config, all sharing one shuffle seed; with `training`, caches are discovered now.

    Without `seed` it is drawn as random.randint(0, 2**31) from the global generator, which the trainer has
    seeded with --seed just before, as musubi-tuner does.
    """
    datasets = [make_dataset(p) for p in params]
    for index, dataset in enumerate(datasets):
        logger.info(f"[Dataset {index}] {type(dataset).__name__} {dataset.params}")
    seed = random.randint(0, 2**31) if seed is None else seed
    for dataset in datasets:
        dataset.set_seed(seed)
        if training:
            dataset.prepare_for_training()
    return DatasetGroup(datasets)


def load_dataset_group(
    path: str, namespace: Any = None, training: bool = False, seed: int | None = None
) -> DatasetGroup:
    """Config file → validated parameters → datasets (see `load_dataset_params` and `build_dataset_group`)."""
    return build_dataset_group(load_dataset_params(path, namespace), training=training, seed=seed)
