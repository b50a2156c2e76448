"""fp8 storage of the DiT's block Linear weights (`--fp8_scaled`, and `--fp8` alone).

`--fp8_scaled` quantizes each target weight with one scale per tensor (max|W| / 448) into float8_e4m3fn and keeps the
scale as `<module>.scale_weight` (shape (1,), original dtype). `--fp8` without `--fp8_scaled` crashes in musubi-tuner
(it meant to cast the whole DiT to fp8); here it stores the same target weights as plain fp8 casts (no scale), which
is what that cast does to them, while norms, embedders and modulation layers keep their precision so the model runs.
Either way the patched forward dequantizes to the activations' dtype: linear(x, W_fp8 · scale, bias).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
TARGET_KEYS = ("transformer_blocks",)  # also matches single_transformer_blocks
EXCLUDE_KEYS = ("norm",)


def is_fp8_target(state_key: str) -> bool:
    """State-dict keys quantized by --fp8_scaled: block Linear weights, except norms and modulation linears."""
    return (
        state_key.endswith(".weight")
        and any(t in state_key for t in TARGET_KEYS)
        and not any(e in state_key for e in EXCLUDE_KEYS)
    )


def quantize_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (W_fp8, scale) with scale = max|W|/448 in W's dtype; saturating round-to-nearest-even cast."""
    scale = (weight.abs().max() / FP8_MAX).clamp(min=torch.finfo(weight.dtype).tiny).reshape(1)
    quantized = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale.to(weight.dtype)


def _fp8_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(self, "scale_weight", None)
    if scale is not None:
        weight = self.weight.to(scale.dtype) * scale
    else:
        weight = self.weight
    return F.linear(x, weight.to(x.dtype), self.bias)


def _target_linears(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_fp8_target(f"{name}.weight"):
            yield name, module


def quantize_linear(
    module: nn.Linear, scaled: bool = True, device: torch.device | None = None, keep_on_device: bool = False
) -> None:
    """Quantize one Linear's weight in place (on `device`, default its own) and patch its forward."""
    home = module.weight.device
    weight = module.weight.data.to(device or home)
    if scaled:
        quantized, scale = quantize_per_tensor(weight)
        module.register_buffer("scale_weight", scale)
    else:
        quantized = weight.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    quantized = quantized if keep_on_device else quantized.to(home)
    module.weight = nn.Parameter(quantized, requires_grad=False)
    module.forward = types.MethodType(_fp8_linear_forward, module)


def dequantized_weight(module: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` as the patched forward computes with it: fp8 · scale (in the scale's dtype), or a cast."""
    scale = getattr(module, "scale_weight", None)
    weight = module.weight.data
    return (weight.to(scale.dtype) * scale).to(dtype) if scale is not None else weight.to(dtype)


def is_quantized(module: nn.Linear) -> bool:
    return module.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def apply_fp8(
    model: nn.Module, scaled: bool = True, device: torch.device | None = None, keep_on_device: bool = False
) -> int:
    """Quantize the target Linear weights in place and patch their forward; returns how many were converted.

    Each weight is quantized on `device` (the GPU, as musubi-tuner does: fast) and then kept there when
    `keep_on_device`, else returned to where it was (e.g. the CPU for block swap).
    """
    count = 0
    for _, module in _target_linears(model):
        quantize_linear(module, scaled, device, keep_on_device)
        count += 1
    logger.info(f"fp8{' scaled' if scaled else ''}: {count} Linear weights stored as {FP8_DTYPE}")
    return count
