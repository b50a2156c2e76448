"""fp8 storage of the DiT's block Linear weights (`--fp8_scaled`, and `--fp8` alone).

`--fp8_scaled` quantizes each target weight with one scale per tensor (max|W| / 448) into float8_e4m3fn and keeps the
scale as `<module>.scale_weight` (shape (1,), original dtype). `--fp8` without `--fp8_scaled` crashes in musubi-tuner
(it meant to cast the whole DiT to fp8); here it stores the same target weights as plain fp8 casts (no scale), which
is what that cast does to them, while norms, embedders and modulation layers keep their precision so the model runs.
Either way the patched forward dequantizes to the activations' dtype: linear(x, W_fp8 · scale, bias).
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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


# Elements per step of the quantizer: its temporaries stay this small whatever the tensor size. Every step is
# elementwise (and the max is exact), so the result does not depend on this value.
QUANTIZE_CHUNK = 1 << 18

# A weight's values as consecutive flat pieces in row-major order; called once per pass, so it must give the same
# pieces every time. Pieces may be computed on the fly (a LoRA merge of a few rows), so no pass holds the weight.
ChunkSource = Callable[[], Iterable[torch.Tensor]]


def block_rows(shape: Sequence[int]) -> int:
    """Rows of a weight of `shape` handled per step by the streaming merge and quantizer (about QUANTIZE_CHUNK
    elements, at least one row)."""
    return max(1, QUANTIZE_CHUNK // max(1, math.prod(shape[1:])))


def quantize_chunks(
    chunks: ChunkSource,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    scaled: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize the weight of `shape` and `dtype` whose values `chunks` gives: (W_fp8, scale) for `--fp8_scaled`
    (one pass for max|W|, one for the cast), (W_fp8, None) for a plain `--fp8` cast (one pass).

    `out` (float8_e4m3fn, the weight's shape, any device) receives W_fp8 when given, else it is allocated on
    `device`. Every step is elementwise and the max is exact, so how the values are cut into chunks does not matter.
    """
    scale = None
    if scaled:
        amax = torch.zeros((), dtype=dtype, device=device)
        for chunk in chunks():
            if chunk.numel():
                amax = torch.maximum(amax, chunk.abs().amax().to(device))
        scale = (amax / FP8_MAX).clamp(min=torch.finfo(dtype).tiny).reshape(1)
    out = torch.empty(shape, dtype=FP8_DTYPE, device=device) if out is None else out
    flat_out, start = out.view(-1), 0
    for chunk in chunks():
        values = chunk.to(device) if scale is None else chunk.to(device) / scale
        flat_out[start : start + chunk.numel()].copy_(values.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
        start += chunk.numel()
    return out, scale


def quantize_per_tensor(weight: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W -> (W_fp8, scale) with scale = max|W|/448 in W's dtype; saturating round-to-nearest-even cast.

    `out` (float8_e4m3fn, W's shape, any device) receives W_fp8 when given.
    """
    return quantize_weight(weight, True, out)


def quantize_weight(
    weight: torch.Tensor, scaled: bool, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`--fp8_scaled`: (W_fp8, scale) as `quantize_per_tensor`; `--fp8`: (saturating plain cast, None)."""
    flat = weight.reshape(-1)
    return quantize_chunks(lambda: flat.split(QUANTIZE_CHUNK), weight.shape, weight.dtype, weight.device, scaled, out)


def _fp8_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(self, "scale_weight", None)
    if scale is not None:
        weight = self.weight.to(scale.dtype) * scale
    else:
        weight = self.weight
    return F.linear(x, weight.to(x.dtype), self.bias)


def install_fp8_weight(module: nn.Linear, quantized: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Make `module` an fp8 Linear: the fp8 weight (frozen), its scale buffer when scaled, the dequantizing forward."""
    if scale is not None:
        module.register_buffer("scale_weight", scale)
    module.weight = nn.Parameter(quantized, requires_grad=False)
    module.forward = types.MethodType(_fp8_linear_forward, module)


def fp8_target_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(module name, Linear) of every Linear whose weight `--fp8`/`--fp8_scaled` stores in fp8."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_fp8_target(f"{name}.weight")
    ]


def quantize_linear(
    module: nn.Linear, scaled: bool = True, device: torch.device | None = None, keep_on_device: bool = False
) -> None:
    """Quantize one Linear's weight in place (on `device`, default its own) and patch its forward."""
    home = module.weight.device
    quantized, scale = quantize_weight(module.weight.data.to(device or home), scaled)
    if not keep_on_device:
        quantized = quantized.to(home)  # the scale stays where it was computed, as a buffer of the device
    install_fp8_weight(module, quantized, scale)


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
    for _, module in fp8_target_modules(model):
        quantize_linear(module, scaled, device, keep_on_device)
        count += 1
    logger.info(f"fp8{' scaled' if scaled else ''}: {count} Linear weights stored as {FP8_DTYPE}")
    return count


@dataclass(frozen=True)
class Fp8Settings:
    """fp8 while loading: `scaled` as `--fp8_scaled`; `device`: where each weight is quantized (default: where it
    is loaded), e.g. the GPU for a model loaded to the CPU for block swap. The quantized weight is kept where the
    model is loaded."""

    scaled: bool = True
    device: torch.device | str | None = None
