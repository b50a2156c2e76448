"""Switching the merged LoRAs of a loaded DiT between prompts (per-line `--lw` / `--lm`), without reloading it.

The DiT keeps one set of weights. Before a module is changed for the first time, its base weight is copied once to
the CPU (only modules some LoRA touches; nothing else is copied). A switch restores the modules the previous set
changed and the new set touches from those copies, merges the new set with the one merge formula
(`networks.lora_merge.merge_lora_files`) and re-quantizes the modules that were fp8. Asking for the set already
merged does nothing.

Exactness: when a module's base copy was taken before fp8 quantization (the base LoRAs at load time, and in a
prompt file every LoRA any line names), the switched weights equal those of a fresh load with that set merged,
bit for bit, fp8 included. A module first touched after quantization (a new LoRA typed in interactive mode under
`--fp8`/`--fp8_scaled`) keeps its fp8 base; its LoRA is merged into the dequantized weight, so it differs from a
fresh load by the fp8 rounding of the base weight.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from frame_pack.fp8 import FP8_DTYPE, dequantized_weight, is_quantized, quantize_linear
from networks import lora_merge
from networks.lora_framepack import target_linears
from utils.cli import log_level

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file merged with a multiplier and optional include/exclude regexes (re.search on its keys)."""

    path: str
    multiplier: float = 1.0
    include: str | None = None
    exclude: str | None = None


LoraSet = tuple[LoraSpec, ...]


def lora_set(
    paths: Sequence[str] | None,
    multipliers: Sequence[float] | float | None = None,
    include_patterns: Sequence[str | None] | None = None,
    exclude_patterns: Sequence[str | None] | None = None,
) -> LoraSet:
    """The set the flags describe: one multiplier for all or one per file; patterns by position (None past the end)."""
    paths = [os.path.abspath(p) for p in paths or []]
    if isinstance(multipliers, (int, float)) or multipliers is None:
        multipliers = [1.0 if multipliers is None else float(multipliers)]
    multipliers = [float(m) for m in multipliers]
    if len(multipliers) == 1:
        multipliers = multipliers * len(paths)
    if len(multipliers) != len(paths):
        raise ValueError(f"{len(multipliers)} multipliers given for {len(paths)} LoRA files; give one, or one per LoRA")
    include_patterns, exclude_patterns = list(include_patterns or []), list(exclude_patterns or [])

    def at(values, i):
        return values[i] if i < len(values) else None

    return tuple(
        LoraSpec(p, m, at(include_patterns, i), at(exclude_patterns, i))
        for i, (p, m) in enumerate(zip(paths, multipliers))
    )


@dataclass
class _BaseWeight:
    weight: torch.Tensor  # on the CPU, in the dtype it had when copied (the checkpoint's, or fp8)
    scale: torch.Tensor | None  # the fp8 scale when the copy was taken after --fp8_scaled


class LoraSwitcher:
    """Keeps `model`'s merged LoRAs equal to the set last given to `apply`, changing only the modules involved."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        self.model = model
        self.device = device
        self.linears = target_linears(model)
        self.base: dict[str, _BaseWeight] = {}
        self.modified: set[str] = set()  # modules whose weight is not their base weight
        self.active: LoraSet = ()
        self.switches = 0  # times `apply` changed weights
        self._touched: dict[tuple, frozenset[str]] = {}
        self.compute_dtype = next(
            p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype != FP8_DTYPE
        )

    def touched_modules(self, loras: Iterable[LoraSpec]) -> set[str]:
        """Module names the LoRAs would change. Reads each file once (cached); a file that fits no module raises."""
        names: set[str] = set()
        for spec in loras:
            key = (spec.path, spec.include, spec.exclude)
            if key not in self._touched:
                # multiplier 0 lists the modules a file reaches and leaves every weight as it is
                with log_level(lora_merge.logger, logging.WARNING):
                    (report,) = lora_merge.merge_lora_files(
                        self.model, [spec.path], 0.0, [spec.include], [spec.exclude]
                    )
                self._touched[key] = frozenset(report.merged)
            names |= self._touched[key]
        return names

    def keep_base(self, names: Iterable[str]) -> None:
        """Copy the base weights of `names` to the CPU (once each). They must not have been changed yet."""
        for name in names:
            if name in self.base:
                continue
            if name in self.modified:
                raise RuntimeError(f"{name}: its base weight was changed before it was kept")
            linear = self.linears[name]
            scale = getattr(linear, "scale_weight", None)
            self.base[name] = _BaseWeight(
                linear.weight.detach().to("cpu", copy=True), None if scale is None else scale.detach().to("cpu")
            )

    @property
    def base_bytes(self) -> int:
        return sum(b.weight.nbytes + (b.scale.nbytes if b.scale is not None else 0) for b in self.base.values())

    def apply(self, loras: Sequence[LoraSpec]) -> bool:
        """Make `loras` the merged set; returns whether any weight changed."""
        loras = tuple(loras)
        if loras == self.active:
            return False
        touched = self.touched_modules(loras)  # reads and checks every file before any weight changes
        self.keep_base(touched)
        requantize = {}
        for name in sorted(self.modified | touched):
            scaled = self._restore(name, for_merge=name in touched)
            if scaled is not None:
                requantize[name] = scaled
        self.modified = set()
        if loras:
            lora_merge.merge_lora_files(
                self.model,
                [s.path for s in loras],
                [s.multiplier for s in loras],
                [s.include for s in loras],
                [s.exclude for s in loras],
                device=self.device,
            )
        for name, scaled in requantize.items():
            quantize_linear(self.linears[name], scaled, self.device)
        self.modified = set(touched)
        self.active = loras
        self.switches += 1
        shown = ", ".join(f"{os.path.basename(s.path)}×{s.multiplier:g}" for s in loras) or "none"
        logger.info(
            f"LoRAs now {shown}: {len(touched)} modules merged; base copies of {len(self.base)} modules "
            f"({self.base_bytes / 2**20:.1f} MiB) on the CPU"
        )
        return True

    def _restore(self, name: str, for_merge: bool) -> bool | None:
        """Put the base weight back. Returns the fp8 mode (scaled or not) to re-quantize with after merging, if any."""
        linear, base = self.linears[name], self.base[name]
        was_quantized, was_scaled = is_quantized(linear), hasattr(linear, "scale_weight")
        home = linear.weight.device
        base_is_fp8 = base.weight.dtype == FP8_DTYPE
        if base_is_fp8 and not for_merge:  # the exact stored form
            self._set_weight(linear, base.weight.to(home), base.scale)
            return None
        if base_is_fp8:
            probe = nn.Linear(1, 1)
            probe.weight = nn.Parameter(base.weight, requires_grad=False)
            if base.scale is not None:
                probe.register_buffer("scale_weight", base.scale)
            weight = dequantized_weight(probe, self.compute_dtype)
        else:
            weight = base.weight
        self._set_weight(linear, weight.to(home), None)
        if not was_quantized:
            return None
        if for_merge:
            return was_scaled
        quantize_linear(linear, was_scaled, self.device)
        return None

    @staticmethod
    def _set_weight(linear: nn.Linear, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        if linear.weight.dtype == weight.dtype:
            linear.weight.data.copy_(weight)
        else:
            linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if "scale_weight" in linear._buffers:
            device = linear.scale_weight.device
            del linear.scale_weight
            if scale is not None:
                linear.register_buffer("scale_weight", scale.to(device))
        elif scale is not None:
            linear.register_buffer("scale_weight", scale.to(linear.weight.device))
