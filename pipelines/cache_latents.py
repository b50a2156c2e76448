"""fpack_cache_latents.py: VAE latents and SigLIP image embeddings of a dataset, as FramePack training caches.

Video crops become one file per section (inverted anti-drifting by default, forward-order F1 with `--f1`), laid
out by `frame_pack.sections`, so training sees exactly the index/clean-latent layout that generation feeds the
model. Image datasets with control images become one-frame caches with `--one_frame`. File names, tensor names,
dtypes, shapes and metadata are musubi-tuner's, so caches are interchangeable with it.

Differences from musubi-tuner (each deliberate):
- The VAE posterior sample is seeded per item (CRC-32 of the cache file name), so a cache is reproducible bit for
  bit and does not depend on batching, worker count, item order or `--skip_existing`. Each item is therefore
  VAE-encoded on its own; `--batch_size` still sets the datasets' batch_size fallback.
- `--skip_existing` keeps a file only if it is complete (see `dataset.caching`), including its RoPE indices, so a
  truncated file or one cached with other `--f1` / `--one_frame*` options is redone.
- Input problems (dataset kinds, missing models) are reported before any model is loaded, and
  models are loaded only when some item needs encoding.
- One-frame caching: a missing `fp_1f_target_index` defaults to the latent window size (what musubi-tuner's help
  says; its code crashed), and RGBA first control images are fed to SigLIP as RGB.
"""

from __future__ import annotations

import argparse
import logging
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset import cache_paths
from dataset.caching import (
    CachingError,
    ExpectedTensor,
    add_common_arguments,
    cache_file_problem,
    check_common_arguments,
    check_dataset_folders,
    dtype_name,
    expected_layout,
    remove_interrupted_writes,
    remove_own_writes_on_forced_interrupt,
    remove_stale_files,
    resolve_num_workers,
    save_cache_file,
)
from dataset.config import load_dataset_params
from dataset.debug_view import DEBUG_MODES, show_datasets
from dataset.image_video_dataset import ImageDataset, ItemInfo, VideoDataset, build_dataset_group
from dataset.media import latent_mask
from frame_pack.sections import (
    CLEAN_1X_FRAMES,
    CLEAN_2X_FRAMES,
    CLEAN_4X_FRAMES,
    START_FRAMES,
    CleanLatents,
    OneFrameOptions,
    SectionIndices,
    cached_section_clean_latents,
    one_frame_clean_latents,
    one_frame_indices,
    plan_sections,
    section_target,
)
from hunyuan_model.frame_math import LATENT_CHANNELS, latent_size, sections_in_latent
from hunyuan_model.image_encoder import encode_image
from hunyuan_model.vae import encode_pixels, read_vae_config
from pipelines.flags import (
    add_device_flag,
    add_f1_flag,
    add_model_path,
    add_vae_dtype_flag,
    add_vae_memory_flags,
    check_vae_memory_flags,
)
from pipelines.models import ModelCache
from pipelines.settings import ModelSettings
from utils.cli import ArgumentParser, HelpFormatter, add_debug_flag, entry_point
from utils.distributed import SINGLE_PROCESS, Processes, run_in_processes
from utils.safetensors_utils import read_headers, resolve_weight_files

logger = logging.getLogger(__name__)

LATENT_DTYPE = torch.float16  # cached latents and image embeddings are float16, as musubi-tuner's
DEFAULT_ONE_FRAME_CLEAN_INDICES = (0,)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fpack_cache_latents.py",
        description="Cache FramePack latents (VAE) and image embeddings (SigLIP) of a dataset for training.",
        formatter_class=HelpFormatter,
        epilog="Changing --f1 or --one_frame* needs a full re-cache; --skip_existing detects it and redoes "
        "those files.",
    )
    add_common_arguments(parser)
    add_device_flag(parser)
    add_model_path(parser, "--vae", note="required unless --debug_mode")
    add_vae_dtype_flag(parser, note="the cached latents are float16 whatever the VAE computes in")
    debug = parser.add_argument_group("debug mode (show the dataset instead of caching it)")
    debug.add_argument(
        "--debug_mode",
        type=str,
        default=None,
        choices=DEBUG_MODES,
        help="image: write PNGs next to the would-be cache files; console: print ASCII art; video: write .jpg/.mp4 "
        "next to them (never interactive)",
    )
    debug.add_argument("--console_width", type=int, default=80, help="debug console: characters per line")
    debug.add_argument("--console_back", type=str, default=None, help="debug console background (ignored)")
    debug.add_argument("--console_num_images", type=int, default=None, help="debug console: items per dataset")
    vae = parser.add_argument_group("VAE memory")
    vae.add_argument("--vae_tiling", action="store_true", help="accepted; spatial tiling is always on for FramePack")
    add_vae_memory_flags(vae)
    fp = parser.add_argument_group("FramePack")
    add_model_path(fp, "--image_encoder", required=True)
    add_f1_flag(fp, note="decides the layout of the cached sections")
    fp.add_argument(
        "--one_frame",
        action="store_true",
        help="one-frame caches of image datasets with control images (fp_1f_* dataset keys)",
    )
    fp.add_argument("--one_frame_no_2x", action="store_true", help="one-frame: no clean 2x indices")
    fp.add_argument("--one_frame_no_4x", action="store_true", help="one-frame: no clean 4x indices")
    add_debug_flag(parser)
    return parser


# ---------------------------------------------------------------------------------------------------- file contents


def latent_cache_tensors(
    latents: torch.Tensor,
    indices: SectionIndices,
    clean: CleanLatents,
    image_embeddings: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The tensors of one latent cache file, named as musubi-tuner names them.

    `latents` (C, F, h, w) is the target; `clean` holds unbatched (C, n, h, w) tensors. Every `latents_*` name
    carries the target's `FxHxW` and dtype; `image_embeddings` carries the latents' dtype too.
    """
    _, frames, height, width = latents.shape
    latent_dtype = dtype_name(latents.dtype)
    size = f"{frames}x{height}x{width}_{latent_dtype}"
    tensors = {f"latents_{size}": latents, f"latents_clean_{size}": clean.clean_latents}
    if clean.clean_latents_2x is not None:
        tensors[f"latents_clean_2x_{size}"] = clean.clean_latents_2x
    if clean.clean_latents_4x is not None:
        tensors[f"latents_clean_4x_{size}"] = clean.clean_latents_4x
    for name in ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices"):
        value = getattr(indices, name)
        if value is not None:
            tensors[f"{name}_{dtype_name(value.dtype)}"] = value
    tensors[f"image_embeddings_{latent_dtype}"] = image_embeddings
    return tensors


def _is_index_key(key: str) -> bool:
    return "_indices_" in key


def _layout(tensors: dict[str, torch.Tensor]) -> dict[str, ExpectedTensor]:
    """What a complete file holds: these names, dtypes and shapes, these index values, any embedding size."""
    return expected_layout(
        tensors,
        compare_values=[k for k in tensors if _is_index_key(k)],
        any_size=[k for k in tensors if k.startswith("image_embeddings_")],
    )


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=LATENT_DTYPE, device="meta")


def video_section_contents(
    video_latent: torch.Tensor, latent_window_size: int, f1: bool
) -> list[tuple[int, torch.Tensor, SectionIndices, CleanLatents]]:
    """(section index, target, indices, clean latents) of every section of a (1, C, L, h, w) video latent, in the
    order generation produces them; tensors unbatched. L must be a whole number of sections plus one."""
    sections = sections_in_latent(video_latent.shape[2], latent_window_size)
    contents = []
    for plan in plan_sections(sections, latent_window_size, f1=f1):
        clean = cached_section_clean_latents(video_latent, plan)
        unbatched = CleanLatents(*(None if t is None else t[0] for t in clean.as_kwargs().values()))
        contents.append((plan.section_index, section_target(video_latent, plan)[0], plan.indices, unbatched))
    return contents


@dataclass(frozen=True)
class OneFrameSettings:
    """Script flags that shape one-frame caches; the rest comes from each item's dataset keys."""

    no_2x: bool = False
    no_4x: bool = False

    def options(self, item: ItemInfo) -> OneFrameOptions:
        """Target index None means lws (see `one_frame_indices`); clean indices default to [0]."""
        clean = item.fp_1f_clean_indices or DEFAULT_ONE_FRAME_CLEAN_INDICES
        return OneFrameOptions(
            no_2x=self.no_2x,
            no_4x=self.no_4x,
            no_post=bool(item.fp_1f_no_post),
            target_index=item.fp_1f_target_index,
            control_indices=tuple(clean),
        )


def _latent_hw(item: ItemInfo) -> tuple[int, int]:
    height, width = item.content.shape[-3:-1]
    return latent_size(height, width)


def expected_files(item: ItemInfo, f1: bool, one_frame: OneFrameSettings | None) -> list[tuple[str, dict]]:
    """(path, layout) of every file caching `item` writes; raises CachingError for a clip shorter than a section."""
    h, w = _latent_hw(item)
    if h == 0 or w == 0:
        raise CachingError(f"{item.item_key}: size {item.original_size} gives no latent (at least 8×8 pixels needed)")
    if one_frame is not None:
        if not item.control_content:
            raise CachingError(f"{item.item_key}: no control image; one-frame caching needs one per clean index")
        options = one_frame.options(item)
        indices = one_frame_indices(item.fp_latent_window_size, len(item.control_content), options)
        clean = CleanLatents(_meta(LATENT_CHANNELS, len(indices.clean_latent_indices), h, w), None, None)
        tensors = latent_cache_tensors(_meta(LATENT_CHANNELS, 1, h, w), indices, clean, _meta(1, 1))
        return [(item.latent_cache_path, _layout(tensors))]

    lws = item.fp_latent_window_size
    sections = cache_paths.section_count(item.frame_count, lws)
    if sections < 1:
        raise CachingError(
            f"{item.item_key}: a crop of {item.frame_count} frames is shorter than one FramePack section; it needs at "
            f"least {cache_paths.min_section_frames(lws)} frames (fp_latent_window_size {lws}): use longer "
            "target_frames or a smaller fp_latent_window_size"
        )
    target = _meta(LATENT_CHANNELS, lws, h, w)
    clean = CleanLatents(
        _meta(LATENT_CHANNELS, START_FRAMES + CLEAN_1X_FRAMES, h, w),
        _meta(LATENT_CHANNELS, CLEAN_2X_FRAMES, h, w),
        _meta(LATENT_CHANNELS, CLEAN_4X_FRAMES, h, w),
    )
    layouts = {
        plan.section_index: _layout(latent_cache_tensors(target, plan.indices, clean, _meta(1, 1)))
        for plan in plan_sections(sections, lws, f1=f1)
    }
    paths = cache_paths.video_section_cache_paths(item.latent_cache_path, item.frame_count, lws)
    return [(paths[index], layouts[index]) for index in range(sections)]


# ---------------------------------------------------------------------------------------------------- encoding


def item_generator(item: ItemInfo) -> torch.Generator:
    """The item's own noise for the VAE posterior sample: a CPU generator seeded with the CRC-32 of its cache file
    name (without section index), so the result is the same on every device and in every batch."""
    seed = zlib.crc32(os.path.basename(item.latent_cache_path).encode("utf-8"))
    return torch.Generator("cpu").manual_seed(seed)


def vae_input(frames: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """(F, H, W, C) uint8 → (1, 3, F, H, W) in [−1, 1]: cast to the VAE dtype first, then x / 127.5 − 1 (the
    reference's order of operations, so fp16 rounding matches)."""
    x = torch.from_numpy(np.ascontiguousarray(frames[..., :3])).permute(3, 0, 1, 2)[None]
    return x.to(dtype) / 127.5 - 1.0


class LatentCacher:
    """Loads the VAE and the image encoder on first use and writes every cache file of an item."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.f1 = args.f1 and not args.one_frame
        self.one_frame = OneFrameSettings(args.one_frame_no_2x, args.one_frame_no_4x) if args.one_frame else None
        self.models = ModelCache(ModelSettings.from_args(args), device, keep=True, image_encoder_dtype=LATENT_DTYPE)

    def files(self, item: ItemInfo) -> list[tuple[str, dict[str, ExpectedTensor]]]:
        return expected_files(item, self.f1, self.one_frame)

    def embed(self, image: np.ndarray) -> torch.Tensor:
        """SigLIP last_hidden_state (tokens, hidden) of an (H, W, 3|4) uint8 image's RGB channels, on the CPU."""
        return encode_image(np.ascontiguousarray(image[..., :3]), self.models.image_encoder())[0].cpu()

    def encode(self, frames: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """(F, H, W, C) uint8 → (1, 16, latent frames, h, w) float16 on the CPU."""
        vae = self.models.vae()
        return encode_pixels(vae, vae_input(frames, vae.dtype), generator).to(LATENT_DTYPE).cpu()

    def cache(self, item: ItemInfo, files: list[tuple[str, dict]]) -> None:
        if self.one_frame is not None:
            self._cache_one_frame(item)
        else:
            self._cache_video(item, [path for path, _ in files])

    def _cache_video(self, item: ItemInfo, section_paths: list[str]) -> None:
        lws = item.fp_latent_window_size
        frames = cache_paths.aligned_frame_count(item.frame_count, lws)
        if frames != item.frame_count:
            logger.info(f"{item.item_key}: {item.frame_count} frames trimmed to {frames} (whole sections of {lws})")
        video_latent = self.encode(item.content[:frames], item_generator(item))
        embeddings = self.embed(item.content[0])
        metadata = cache_paths.latent_cache_metadata(item.original_size, item.frame_count)
        for section, target, indices, clean in video_section_contents(video_latent, lws, self.f1):
            tensors = latent_cache_tensors(target, indices, clean, embeddings)
            save_cache_file(section_paths[section], tensors, metadata, item.item_key)

    def _cache_one_frame(self, item: ItemInfo) -> None:
        """Controls, then the target, each VAE-encoded as a one-frame clip; control alpha masks the control latent."""
        options = self.one_frame.options(item)
        h, w = _latent_hw(item)
        generator = item_generator(item)
        control_latents = []
        for control in item.control_content:
            latent = self.encode(control[None], generator)
            if control.shape[-1] == 4:
                mask = torch.from_numpy(latent_mask(control[..., 3], (w, h)))
                latent = (latent.float() * mask).to(latent.dtype)
            control_latents.append(latent)
        target = self.encode(item.content[None], generator)[0]
        indices = one_frame_indices(item.fp_latent_window_size, len(control_latents), options)
        clean = one_frame_clean_latents(control_latents, options, (h, w), dtype=target.dtype)
        clean = CleanLatents(clean.clean_latents[0], None, None)  # the trainer supplies zero 2x/4x latents
        logger.info(
            f"{item.item_key}: one-frame target index {indices.latent_indices.tolist()}, clean indices "
            f"{indices.clean_latent_indices.tolist()}, clean latents {tuple(clean.clean_latents.shape)}, 2x indices "
            f"{_as_list(indices.clean_latent_2x_indices)}, 4x indices {_as_list(indices.clean_latent_4x_indices)}"
        )
        tensors = latent_cache_tensors(target, indices, clean, self.embed(item.control_content[0]))
        save_cache_file(
            item.latent_cache_path, tensors, cache_paths.latent_cache_metadata(item.original_size), item.item_key
        )


def _as_list(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else t.tolist()


# ---------------------------------------------------------------------------------------------------- the run


def check_args(args: argparse.Namespace) -> None:
    if args.debug_mode is None and args.vae is None:
        raise CachingError("--vae is required (unless --debug_mode)")
    check_common_arguments(args)
    check_vae_memory_flags(args)
    if args.vae_tiling:
        logger.info("--vae_tiling has no effect: FramePack always tiles the VAE spatially")


def check_datasets(datasets: list[ImageDataset | VideoDataset], args: argparse.Namespace) -> None:
    """Each dataset must suit the mode: video datasets normally, image datasets with control images for one-frame."""
    for dataset in datasets:
        label = dataset.params.label
        if not args.one_frame:
            if not dataset.is_video:
                raise CachingError(
                    f"{args.dataset_config}: {label} is an image dataset; FramePack caches image datasets only with "
                    "--one_frame (one-frame training with control images), and video datasets otherwise"
                )
            continue
        if dataset.is_video:
            raise CachingError(
                f"{args.dataset_config}: {label} is a video dataset; --one_frame caches image datasets with control "
                "images"
            )
        if not dataset.has_control:
            raise CachingError(
                f"{args.dataset_config}: {label} has no control images; --one_frame needs them (control_directory, or "
                "control_path in the JSONL file)"
            )
        if dataset.fp_1f_clean_indices is None:
            logger.warning(f"{label}: fp_1f_clean_indices is not set; using {list(DEFAULT_ONE_FRAME_CLEAN_INDICES)}")
        if dataset.fp_1f_target_index is None:
            logger.warning(
                f"{label}: fp_1f_target_index is not set; using the latent window size {dataset.fp_latent_window_size}"
            )
    if args.one_frame and args.f1:
        logger.info("--f1 has no effect with --one_frame")


def check_model_paths(args: argparse.Namespace) -> None:
    """Fail on a missing or wrong model file before anything is loaded (reads headers only)."""
    read_vae_config(args.vae)
    read_headers(
        resolve_weight_files(args.image_encoder, "--image_encoder", subfolder="image_encoder"), "--image_encoder"
    )


def cache_dataset(
    index: int, dataset: ImageDataset | VideoDataset, cacher: LatentCacher, args, media: list[int] | None = None
) -> list[str]:
    """Cache the items of one dataset's media files (`media` by index, all by default; complete ones skipped with
    --skip_existing); returns every file those items have."""
    logger.info(f"Caching dataset [{index}] into {dataset.cache_directory}")
    expected: list[str] = []
    total = None if dataset.is_video else len(dataset.datasource) if media is None else len(media)
    with tqdm(total=total, unit="item", desc=f"dataset {index}") as progress:
        for _, batch in dataset.retrieve_latent_cache_batches(resolve_num_workers(args.num_workers), media):
            for item in batch:
                progress.update(1)
                files = cacher.files(item)
                expected.extend(path for path, _ in files)
                if args.skip_existing:
                    problems = [(path, cache_file_problem(path, layout)) for path, layout in files]
                    problems = [(path, problem) for path, problem in problems if problem is not None]
                    if not problems:
                        logger.debug(f"{item.item_key}: all {len(files)} cache file(s) complete, skipped")
                        continue
                    logger.info(f"{item.item_key}: redoing, {problems[0][0]}: {problems[0][1]}")
                logger.info(f"caching {item.item_key}: {len(files)} file(s)")
                cacher.cache(item, files)
    return expected


def run(args: argparse.Namespace, processes: Processes = SINGLE_PROCESS) -> None:
    """Cache this process's share of the media files (all of them in a single process); once every process is done,
    the main process removes the stale files of each dataset."""
    check_args(args)
    logger.info(f"Load dataset config from {args.dataset_config}")
    datasets = build_dataset_group(load_dataset_params(args.dataset_config, args), seed=0).datasets
    if args.debug_mode is not None:
        if processes.is_main:
            num_workers = resolve_num_workers(args.num_workers)
            show_datasets(
                datasets, args.debug_mode, num_workers, args.console_width, args.console_back, args.console_num_images
            )
        return
    check_datasets(datasets, args)
    check_dataset_folders(datasets, args.dataset_config)
    check_model_paths(args)
    device = processes.device(args.device)
    remove_own_writes_on_forced_interrupt(datasets)
    if processes.is_main:
        remove_interrupted_writes(datasets)
    mode = "one-frame" if args.one_frame else "F1 (vanilla sampling)" if args.f1 else "inverted anti-drifting"
    logger.info(f"Cache mode: {mode}")
    cacher = LatentCacher(args, device)

    def cache_share() -> list[list[str]]:
        expected, first = [], 0
        for index, dataset in enumerate(datasets):
            media = processes.share_of_range(first, len(dataset.datasource))
            expected.append(cache_dataset(index, dataset, cacher, args, media))
            first += len(dataset.datasource)
        return expected

    shares = processes.run_share(cache_share)
    if processes.is_main:
        for index, dataset in enumerate(datasets):
            expected = [path for share in shares for path in share[index]]
            remove_stale_files(dataset.get_all_latent_cache_files(), expected, args.keep_cache)


@entry_point
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return run_in_processes(lambda processes: run(args, processes))
