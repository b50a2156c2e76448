"""Attention over (B, N, heads, head_dim) tensors with the backends of `--attn_mode`.

Masking follows the packed DiT's rule: every sample's valid tokens are a prefix of its sequence (image tokens
first, then its valid text tokens), so a mask is described by one length per sample (`valid_lengths`).
Padding tokens never change what valid tokens see. With `split_attn` each sample runs alone on its valid prefix,
which is exactly what a batch-1 run gives.

flash-attn, SageAttention and xformers are imported only when chosen, and fail with a message that names the flag.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from utils.cli import UserError

ATTN_MODES = ("torch", "sdpa", "flash", "flash3", "sageattn", "xformers")

_BACKEND_PACKAGES = {
    "flash": ("flash_attn", "flash-attn"),
    "flash3": ("flash_attn_interface", "flash-attn 3 (flash_attn_interface, built from the hopper/ folder)"),
    "sageattn": ("sageattention", "sageattention"),
    "xformers": ("xformers.ops", "xformers"),
}


class AttentionBackendError(UserError, RuntimeError):
    pass


def _import_backend(mode: str):
    module_name, package = _BACKEND_PACKAGES[mode]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise AttentionBackendError(
            f"--attn_mode {mode} needs the `{package}` package, which is not installed here ({e}). "
            "Install it (CUDA only) or use --attn_mode torch."
        ) from e


def check_attn_mode(mode: str) -> None:
    """Fail early (before any model is loaded) when the chosen backend is unavailable."""
    if mode not in ATTN_MODES:
        raise AttentionBackendError(f"--attn_mode {mode!r}: choose one of {', '.join(ATTN_MODES)}")
    if mode in _BACKEND_PACKAGES:
        _import_backend(mode)
        if not torch.cuda.is_available():
            raise AttentionBackendError(f"--attn_mode {mode} needs a CUDA device; use --attn_mode torch on CPU")


def _dense(q, k, v, mode: str, mask=None):
    """Attention without varlen metadata; q, k, v: (B, N, H, D) -> (B, N, H, D)."""
    if mode in ("torch", "sdpa") or mask is not None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    if mode == "flash":
        return _import_backend("flash").flash_attn_func(q, k, v)
    if mode == "flash3":
        out = _import_backend("flash3").flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if mode == "sageattn":
        return _import_backend("sageattn").sageattn(q, k, v, tensor_layout="NHD")
    if mode == "xformers":
        return _import_backend("xformers").memory_efficient_attention(q, k, v)
    raise AttentionBackendError(f"unknown attention mode {mode!r}")


def _varlen(q, k, v, mode: str, valid_lengths: list[int]):
    """Packed varlen kernels (flash/sage): each sample is one valid segment plus one padding segment."""
    b, n = q.shape[:2]
    bounds = [0]
    for i, length in enumerate(valid_lengths):
        bounds += [i * n + length, (i + 1) * n]
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    flat = [t.reshape(b * n, *t.shape[2:]) for t in (q, k, v)]
    if mode == "flash":
        out = _import_backend("flash").flash_attn_varlen_func(*flat, cu, cu, n, n)
    else:
        out = _import_backend("sageattn").sageattn_varlen(*flat, cu, cu, n, n)
    return out.reshape(b, n, *out.shape[1:])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str = "torch",
    valid_lengths: list[int] | None = None,
    split_attn: bool = False,
) -> torch.Tensor:
    """q, k, v: (B, N, H, D). `valid_lengths[i]`: how many leading tokens of sample i are real (None: all)."""
    b, n = q.shape[:2]
    if valid_lengths is None or all(length == n for length in valid_lengths):
        if not split_attn or b == 1:
            return _dense(q, k, v, mode)
        valid_lengths = [n] * b
    if split_attn or b == 1:
        out = torch.zeros_like(q)
        for i, length in enumerate(valid_lengths):
            sl = slice(0, length)
            out[i : i + 1, sl] = _dense(q[i : i + 1, sl], k[i : i + 1, sl], v[i : i + 1, sl], mode)
        return out
    if mode in ("flash", "sageattn"):
        return _varlen(q, k, v, mode, valid_lengths)
    # A key-padding mask gives valid tokens exactly what the varlen kernels give them.
    keep = torch.arange(n, device=q.device)[None, :] < torch.tensor(valid_lengths, device=q.device)[:, None]
    return _dense(q, k, v, "torch", mask=keep[:, None, None, :])
