"""Device choice and memory release shared by the scripts."""

from __future__ import annotations

import gc
import os

import torch

from utils.cli import UsageError


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """`--device` as given (it must exist on this machine), else cuda when available, else cpu."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name}: unsupported device type {device.type} (use cpu, cuda or mps)")
    return device


def check_device(name: str | None, flag: str = "--device") -> None:
    """Refuse a `--device` this machine does not have (UsageError naming `flag`), before anything is loaded."""
    resolve_device(name, flag)


def system_memory_bytes() -> int:
    """This machine's physical memory (what one process could use at most)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def clean_memory(device: torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
