"""fpack_cache_text_encoder_outputs.py: LLaMA and CLIP-L outputs of every caption, as FramePack training caches.

One file per media file, `<cache_dir>/<stem>_fp_te.safetensors`, shared by all crops and sections of that file:
`llama_vec_<dtype>` (512, hidden), `llama_attention_mask` (512,) bool, `clip_l_pooler_<dtype>` (hidden,), with the
metadata `architecture` = framepack, `caption1` = the caption, `format_version` = 1.0.1. Captions are encoded one at a
time (as musubi-tuner does), so `--batch_size` only sets the datasets' batch_size fallback.

Differences from musubi-tuner (each deliberate):
- `--skip_existing` keeps a file only if it is complete (readable, the three tensors with the right dtypes and
  shapes) and was made from the same caption; a truncated file or an edited caption is redone.
- A file is always written whole (musubi-tuner merged into an existing file, which for FramePack can only keep
  tensors of no use).
- Tokenizers are read offline-first (`--tokenizer1` / `--tokenizer2`, or the text encoder's snapshot folder), models
  are checked before loading and loaded only when some caption needs encoding.
"""

from __future__ import annotations

import argparse
import logging

import torch
from tqdm.auto import tqdm

from dataset import cache_paths
from dataset.caching import (
    HEADER_ERRORS,
    ExpectedTensor,
    add_common_arguments,
    cache_file_problem,
    check_common_arguments,
    check_dataset_folders,
    dtype_name,
    remove_interrupted_writes,
    remove_own_writes_on_forced_interrupt,
    remove_stale_files,
    resolve_num_workers,
    save_cache_file,
)
from dataset.config import load_dataset_params
from dataset.image_video_dataset import ItemInfo, build_dataset_group
from hunyuan_model.text_encoder import LLAMA_PADDED_LENGTH
from pipelines.flags import add_device_flag, add_fp8_llm_flag, add_model_path, add_tokenizer_flags
from pipelines.models import ModelCache
from pipelines.settings import ModelSettings
from utils.cli import ArgumentParser, HelpFormatter, add_debug_flag, entry_point
from utils.distributed import SINGLE_PROCESS, Processes, run_in_processes
from utils.safetensors_utils import SAFETENSORS_DTYPES, read_header, read_headers, resolve_weight_files

logger = logging.getLogger(__name__)

LLAMA_VEC_PREFIX = "llama_vec_"
LLAMA_MASK_KEY = "llama_attention_mask"
CLIP_POOLER_PREFIX = "clip_l_pooler_"


# reported without a traceback
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="fpack_cache_text_encoder_outputs.py",
        description="Cache FramePack text encoder outputs (LLaMA and CLIP-L) of every caption of a dataset.",
        formatter_class=HelpFormatter,
    )
    add_common_arguments(parser)
    add_device_flag(parser)
    add_model_path(parser, "--text_encoder1", required=True)
    add_model_path(parser, "--text_encoder2", required=True)
    add_fp8_llm_flag(parser)
    add_tokenizer_flags(parser)
    add_debug_flag(parser)
    return parser


def text_cache_tensors(
    llama_vec: torch.Tensor, llama_attention_mask: torch.Tensor, clip_l_pooler: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors of one text cache file (unbatched), named as musubi-tuner names them."""
    return {
        f"{LLAMA_VEC_PREFIX}{dtype_name(llama_vec.dtype)}": llama_vec,
        LLAMA_MASK_KEY: llama_attention_mask,
        f"{CLIP_POOLER_PREFIX}{dtype_name(clip_l_pooler.dtype)}": clip_l_pooler,
    }


def text_cache_problem(path: str, caption: str) -> str | None:
    """None when `path` is a complete text cache of `caption`; otherwise the reason.

    The encoders' output dtype names the tensors, so the expected names are taken from the stored dtypes.
    """
    try:
        infos, _ = read_header(path)
    except HEADER_ERRORS:
        infos = {}  # cache_file_problem reports why
    expected = {LLAMA_MASK_KEY: ExpectedTensor(torch.bool, (LLAMA_PADDED_LENGTH,))}
    for prefix, shape in ((LLAMA_VEC_PREFIX, (LLAMA_PADDED_LENGTH, None)), (CLIP_POOLER_PREFIX, (None,))):
        stored = [key for key in infos if key.startswith(prefix)]
        dtype = SAFETENSORS_DTYPES.get(infos[stored[0]].dtype) if len(stored) == 1 else None
        expected[f"{prefix}{dtype_name(dtype) if dtype else '<float dtype>'}"] = ExpectedTensor(
            dtype or torch.float16, shape
        )
    return cache_file_problem(path, expected, metadata={"caption1": caption})


class TextEncoderCacher:
    """Loads the tokenizers and text encoders on first use and writes the text cache of an item."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.models = ModelCache(ModelSettings.from_args(args), device, keep=True)

    def cache(self, item: ItemInfo) -> None:
        llama_vec, llama_mask, clip_pooler = self.models.text_encoders().encode(item.caption)
        tensors = text_cache_tensors(llama_vec[0], llama_mask[0], clip_pooler[0])
        metadata = cache_paths.text_encoder_cache_metadata(item.caption)
        save_cache_file(item.text_encoder_output_cache_path, tensors, metadata, item.item_key)


def check_model_paths(args: argparse.Namespace) -> None:
    """Fail on a missing text encoder before anything is loaded."""
    for flag, subfolder in (("--text_encoder1", "text_encoder"), ("--text_encoder2", "text_encoder_2")):
        read_headers(resolve_weight_files(getattr(args, flag[2:]), flag, subfolder=subfolder), flag)


def cache_dataset(index: int, dataset, cacher: TextEncoderCacher, args, media: list[int] | None = None) -> list[str]:
    """Cache the captions of one dataset's media files (`media` by index, all by default; complete ones skipped with
    --skip_existing); returns their cache paths."""
    logger.info(f"Caching text encoder outputs of dataset [{index}] into {dataset.cache_directory}")
    expected: list[str] = []
    total = len(dataset.datasource) if media is None else len(media)
    with tqdm(total=total, unit="caption", desc=f"dataset {index}") as progress:
        for batch in dataset.retrieve_text_encoder_output_cache_batches(resolve_num_workers(args.num_workers), media):
            for item in batch:
                progress.update(1)
                path = item.text_encoder_output_cache_path
                expected.append(path)
                if args.skip_existing:
                    problem = text_cache_problem(path, item.caption)
                    if problem is None:
                        logger.debug(f"{item.item_key}: text cache complete, skipped")
                        continue
                    logger.info(f"{item.item_key}: redoing {path}: {problem}")
                cacher.cache(item)
    return expected


def run(args: argparse.Namespace, processes: Processes = SINGLE_PROCESS) -> None:
    """Cache this process's share of the captions (all of them in a single process); once every process is done, the
    main process removes the stale files."""
    check_common_arguments(args)
    logger.info(f"Load dataset config from {args.dataset_config}")
    datasets = build_dataset_group(load_dataset_params(args.dataset_config, args), seed=0).datasets
    check_dataset_folders(datasets, args.dataset_config)
    check_model_paths(args)
    device = processes.device(args.device)
    remove_own_writes_on_forced_interrupt(datasets)
    if processes.is_main:
        remove_interrupted_writes(datasets)
    existing = [path for dataset in datasets for path in dataset.get_all_text_encoder_output_cache_files()]
    cacher = TextEncoderCacher(args, device)

    def cache_share() -> list[str]:
        expected, first = [], 0
        for index, dataset in enumerate(datasets):
            media = processes.share_of_range(first, len(dataset.datasource))
            expected += cache_dataset(index, dataset, cacher, args, media)
            first += len(dataset.datasource)
        return expected

    shares = processes.run_share(cache_share)
    if processes.is_main:
        remove_stale_files(existing, [path for share in shares for path in share], args.keep_cache)


@entry_point
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return run_in_processes(lambda processes: run(args, processes))
