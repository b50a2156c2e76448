"""What both caching scripts share: common flags, cache-file validity, atomic saves, stale-file cleanup.

A cache file counts as complete only when its header opens, the file is as long as the header promises, and it holds
exactly the expected tensor names with the expected dtypes and shapes (and, where given, the expected small tensors
such as RoPE indices, compared by value). Anything else, a truncated or foreign file included, is redone.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open

from utils.cli import UserError, check_output_folder, check_positive, on_forced_interrupt, one_line
from utils.safetensors_utils import (
    SAFETENSORS_DTYPES,
    TensorInfo,
    WeightFileError,
    deterministic_safetensors,
    read_header,
    write_atomically,
)
from utils.temporary_files import remove_leftover_temporary_files, remove_temporary_files

logger = logging.getLogger(__name__)

# read_header raises WeightFileError for short or truncated files; a JSON header of another shape raises the others
HEADER_ERRORS = (WeightFileError, ValueError, KeyError, TypeError, AttributeError)


class CachingError(UserError, ValueError):
    """Bad input for a caching run (flags, dataset kinds, clip lengths); the message says what to change."""


class CacheFileError(UserError, ValueError):
    """A cache file found at training time that is unreadable or was made with other settings."""


RECACHE_HINT = "re-cache it: run the caching script again with --skip_existing (it redoes only incomplete files)"


def check_cache_header(path: str) -> dict:
    """The header (name -> TensorInfo) of a cache file; a CacheFileError naming the file if it is unreadable."""
    try:
        return read_header(path)[0]
    except HEADER_ERRORS as e:
        raise CacheFileError(
            f"{path}: damaged cache file ({one_line(e).removeprefix(path + ': ')}); {RECACHE_HINT}"
        ) from None


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags both caching scripts take, with musubi-tuner's names and defaults."""
    parser.add_argument("--dataset_config", type=str, required=True, help="dataset config file (.toml or .json)")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="batch size of the datasets whose config sets none; encoding runs item by item (one seed per item), "
        "so results do not depend on it",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="threads that load and resize media or read captions; None: CPU count - 1, at least 1",
    )
    parser.add_argument(
        "--skip_existing",
        action="store_true",
        help="skip items whose cache files are all complete (open, with the expected tensors); others are redone",
    )
    parser.add_argument(
        "--keep_cache", action="store_true", help="keep cache files that no item of the config produces"
    )
    return parser


def check_common_arguments(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "num_workers"):
        try:
            check_positive(f"--{flag}", getattr(args, flag))
        except ValueError as e:
            raise CachingError(str(e)) from None


def check_dataset_folders(datasets: list, config: str) -> None:
    """Before any model loads: every dataset lists at least one media file, and its cache directory is a folder
    that exists or can be created, and is writable."""
    for dataset in datasets:
        source = dataset.datasource
        if len(source) == 0:
            raise CachingError(f"{config}: {dataset.params.label}: {source.origin} holds no {source.kind}s to cache")
        try:
            check_output_folder("cache_directory", dataset.cache_directory)
        except UserError as e:
            raise CachingError(f"{config}: {dataset.params.label}: {e}") from None


def remove_interrupted_writes(datasets: list) -> None:
    """Delete the temporary files a killed caching run left in the cache directories (`*.safetensors.tmp<pid>`)."""
    for dataset in datasets:
        if os.path.isdir(dataset.cache_directory):
            remove_leftover_temporary_files(dataset.cache_directory)


def remove_own_writes_on_forced_interrupt(datasets: list) -> None:
    """When the interrupt watchdog ends the process, the cache file it was writing goes with it."""
    folders = sorted({dataset.cache_directory for dataset in datasets})

    def remove_own_writes() -> None:
        for folder in folders:
            remove_temporary_files(folder)

    on_forced_interrupt(remove_own_writes)


def resolve_num_workers(num_workers: int | None) -> int:
    return num_workers if num_workers is not None else max(1, (os.cpu_count() or 1) - 1)


def dtype_name(dtype: torch.dtype) -> str:
    """`float16`, `int64`, ...: the dtype token of cache tensor names."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ExpectedTensor:
    """One tensor a complete cache file holds. `None` in `shape` accepts any size; `value` is compared exactly."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]
    value: torch.Tensor | None = None

    def mismatch(self, info: TensorInfo) -> str | None:
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype != self.dtype:
            return f"dtype {info.dtype}, expected {dtype_name(self.dtype)}"
        if len(info.shape) != len(self.shape) or any(e is not None and e != s for e, s in zip(self.shape, info.shape)):
            return f"shape {tuple(info.shape)}, expected {self.shape}"
        return None


def expected_layout(
    tensors: Mapping[str, torch.Tensor], compare_values: Iterable[str] = (), any_size: Iterable[str] = ()
) -> dict[str, ExpectedTensor]:
    """The layout of `tensors` (real or `meta` tensors). Tensors named in `compare_values` must match by value,
    those in `any_size` only by dtype and rank."""
    compare, loose = set(compare_values), set(any_size)
    return {
        key: ExpectedTensor(
            t.dtype,
            (None,) * t.ndim if key in loose else tuple(t.shape),
            t.detach().cpu() if key in compare else None,
        )
        for key, t in tensors.items()
    }


def layout_problem(infos: Mapping[str, TensorInfo], expected: Mapping[str, ExpectedTensor]) -> str | None:
    """Why a header does not hold exactly the expected tensors, or None."""
    missing = sorted(set(expected) - set(infos))
    if missing:
        return f"missing {', '.join(missing)}"
    extra = sorted(set(infos) - set(expected))
    if extra:
        return f"unexpected {', '.join(extra)}"
    for key, want in expected.items():
        problem = want.mismatch(infos[key])
        if problem:
            return f"{key}: {problem}"
    return None


def cache_file_problem(
    path: str, expected: Mapping[str, ExpectedTensor], metadata: Mapping[str, str] | None = None
) -> str | None:
    """None when `path` is a complete cache holding `expected` (and `metadata` entries); otherwise the reason."""
    if not os.path.exists(path):
        return "missing"
    try:
        infos, stored_metadata = read_header(path)
    except HEADER_ERRORS as e:
        return f"unreadable ({e})"
    problem = layout_problem(infos, expected)
    if problem:
        return problem
    for key, value in (metadata or {}).items():
        if stored_metadata.get(key) != value:
            return f"metadata {key} is {stored_metadata.get(key)!r}, expected {value!r}"
    compared = {key: want.value for key, want in expected.items() if want.value is not None}
    if compared:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key, value in compared.items():
                    if not torch.equal(f.get_tensor(key), value):
                        return f"{key} differs (cached with other options)"
        except Exception as e:  # safetensors raises its own error types for damaged data
            return f"unreadable ({e})"
    return None


def save_cache_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> None:
    """Write a cache file atomically and byte-reproducibly, tensors on the CPU and contiguous; NaNs become 0 with a
    warning."""
    clean = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.is_floating_point() and torch.isnan(tensor).any():
            logger.warning(f"{key} has NaN values ({what}); replaced with 0")
            tensor = tensor.masked_fill(torch.isnan(tensor), 0)
        clean[key] = tensor
    write_atomically(path, deterministic_safetensors(clean, metadata))


def remove_stale_files(found: Iterable[str], expected: Iterable[str], keep: bool) -> list[str]:
    """Delete (or, with `keep`, only report) the files in `found` that are not in `expected`; returns them."""
    wanted = {os.path.normpath(os.path.abspath(p)) for p in expected}
    stale = [p for p in found if os.path.normpath(os.path.abspath(p)) not in wanted]
    for path in stale:
        if keep:
            logger.info(f"keeping cache file that no item produces: {path}")
        else:
            os.remove(path)
            logger.info(f"removed old cache file: {path}")
    return stale
