"""`--compile`: torch.compile the DiT's transformer blocks (each double and single block, not the whole model).

Blocks are compiled in place (`nn.Module.compile`), so parameter names, LoRA hooks, fp8 forwards and block swap
see the same modules as before. With block swap the blocks' Linear layers stay eager: their weights move between
the CPU and the device during the forward, and a compiled graph would guard on (and recompile for) where they are.
Compilation happens at the first forward; the first sampling step is slow.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.cli import UserError

logger = logging.getLogger(__name__)

COMPILE_BACKENDS_NEEDING_A_COMPILER = ("inductor",)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_DYNAMIC = {"true": True, "false": False, "auto": None}


class CompileUnavailableError(UserError, ValueError):
    """torch.compile cannot run the chosen backend on this machine (the message says what to install)."""


@dataclass(frozen=True)
class CompileSettings:
    backend: str = "inductor"
    mode: str = "default"
    dynamic: str | None = None  # "true" | "false" | "auto"; None is auto
    fullgraph: bool = False
    cache_size_limit: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the flag at fault."""
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"--compile_mode {self.mode!r}: choose one of {', '.join(COMPILE_MODES)}")
        if self.dynamic is not None and self.dynamic.lower() not in COMPILE_DYNAMIC:
            raise ValueError(f"--compile_dynamic {self.dynamic!r}: choose one of {', '.join(COMPILE_DYNAMIC)}")
        if self.cache_size_limit is not None and self.cache_size_limit < 1:
            raise ValueError(f"--compile_cache_size_limit must be >= 1, got {self.cache_size_limit}")

    @property
    def dynamic_value(self) -> bool | None:
        return None if self.dynamic is None else COMPILE_DYNAMIC[self.dynamic.lower()]


def check_compile_available(settings: CompileSettings, device: torch.device | str) -> None:
    """Fail early, with what to install, when torch.compile cannot run `settings.backend` on `device`."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if settings.backend not in known:
        raise CompileUnavailableError(
            f"--compile_backend {settings.backend!r} is not a torch.compile backend here; known: {', '.join(known)}"
        )
    if settings.backend not in COMPILE_BACKENDS_NEEDING_A_COMPILER:
        return
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise CompileUnavailableError(
                "--compile with the inductor backend on CUDA needs Triton (pip install triton; on Windows "
                "triton-windows), or choose another --compile_backend"
            )
    else:
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if compiler is None or shutil.which(compiler) is None:
            raise CompileUnavailableError(
                "--compile with the inductor backend on the CPU needs a C++ compiler (g++ or clang++ on PATH, or "
                "$CXX), or choose another --compile_backend"
            )


def keep_linears_eager(block: nn.Module) -> int:
    """Run every Linear of `block` outside the compiled graph (its current forward, fp8 or LoRA, is kept)."""
    count = 0
    for module in block.modules():
        if isinstance(module, nn.Linear):
            module.forward = torch.compiler.disable(module.forward)
            count += 1
    return count


def compile_blocks(model: nn.Module, settings: CompileSettings) -> int:
    """Compile each transformer block of the packed DiT in place; returns how many were compiled.

    Call after fp8, LoRA and block swap are set up: an active block swap keeps the Linear layers eager.
    """
    if settings.cache_size_limit is not None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = settings.cache_size_limit
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    swapping = getattr(model, "block_swap", None) is not None
    for block in blocks:
        if swapping:
            keep_linears_eager(block)
        block.compile(
            backend=settings.backend,
            mode=settings.mode,
            dynamic=settings.dynamic_value,
            fullgraph=settings.fullgraph,
        )
    logger.info(
        f"torch.compile: {len(blocks)} blocks (backend {settings.backend}, mode {settings.mode}, dynamic "
        f"{settings.dynamic or 'auto'}, fullgraph {settings.fullgraph})"
        + ("; Linear layers stay eager for block swap" if swapping else "")
    )
    return len(blocks)
