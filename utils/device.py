"""Device choice and memory release shared by the scripts."""

from __future__ import annotations

import gc

import torch


def resolve_device(name: str | None) -> torch.device:
    """`--device` as given, else cuda when available, else cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clean_memory(device: torch.device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
