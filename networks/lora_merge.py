"""LoRA at inference: merge LoRA files into the DiT (before fp8), and save the merged DiT.

Per file: load, convert to the musubi FramePack layout (`networks.lora_convert`), filter keys with the file's
include/exclude regex (`search`, include first); this gives a `LoraMergePlan`, checked against the DiT's Linear
shapes before any DiT weight is read. The plan then adds W <- W + m * (up @ down) * (alpha / rank) to each weight,
files in order, in float32 on `device` (`networks.lora.merged_weight`), rounded back to the weight's dtype: either
one tensor at a time while the checkpoint streams in (`merge_weight`) or into a loaded model (`merge_into`); both
give the same bits. Each file
logs its detected format, the modules applied, the effective scale (alpha/rank x multiplier) and the keys that
matched nothing. A file none of whose keys fits the DiT, or whose factor shapes do not fit the Linears they name,
is refused before any weight changes, naming the file and a few keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from networks.lora import ALPHA_KEY, DOWN_KEY, UP_KEY, merged_weight
from networks.lora_convert import (
    LoraFormatError,
    convert_to_framepack,
    describe_scales,
    example_keys,
    group_by_module,
    load_lora_file,
    ranks_alphas,
)
from networks.lora_framepack import module_path, target_linears
from utils.cli import UserError
from utils.safetensors_utils import save_safetensors

logger = logging.getLogger(__name__)


class LycorisUnavailableError(UserError, ImportError):
    """`--lycoris` without the lycoris-lora package."""


@dataclass
class LoraMergeReport:
    """What one LoRA file did to the model."""

    path: str
    multiplier: float
    formats: dict[str, int] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)  # musubi module names merged
    filtered_out: int = 0  # keys removed by the include/exclude patterns
    unmatched: list[str] = field(default_factory=list)  # keys that reached no DiT weight
    effective_scales: dict[str, float] = field(default_factory=dict)  # module -> alpha / rank x multiplier


def _multipliers(values, count: int) -> list[float]:
    """One multiplier for every LoRA, or one per LoRA; default 1.0."""
    if values is None:
        return [1.0] * count
    values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{len(values)} multipliers given for {count} LoRA files; give one, or one per LoRA")
    return values


def _patterns(values, count: int, what: str) -> list[str | None]:
    """Regex per LoRA by position (as musubi-tuner: LoRAs past the end of the list are not filtered)."""
    if values is None or isinstance(values, str):
        return [values] * count
    values = list(values)
    if len(values) > count:
        raise ValueError(f"{len(values)} {what} given for {count} LoRA files")
    for pattern in values:
        try:
            re.compile(pattern or "")
        except re.error as e:
            raise ValueError(f"invalid {what[:-1]} {pattern!r}: {e}") from e
    return values + [None] * (count - len(values))


def _filter(sd: dict, include: str | None, exclude: str | None, report: LoraMergeReport) -> dict:
    """Keep the keys `include` finds (re.search), then drop those `exclude` finds."""
    kept = sd
    if include:
        kept = {k: v for k, v in kept.items() if re.search(include, k)}
    if exclude:
        kept = {k: v for k, v in kept.items() if not re.search(exclude, k)}
    report.filtered_out = len(sd) - len(kept)
    if report.filtered_out:
        logger.info(f"{report.path}: include/exclude patterns kept {len(kept)} of {len(sd)} keys")
    return kept


def _import_lycoris():
    try:
        from lycoris.kohya import create_network_from_weights
    except ImportError as e:
        raise LycorisUnavailableError(
            "--lycoris needs the LyCORIS library, which is not installed: pip install lycoris-lora"
        ) from e
    return create_network_from_weights


@dataclass
class LoraDelta:
    """One LoRA module's addition to one weight: multiplier * (up @ down) * scale."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    multiplier: float


class LoraMergePlan:
    """The LoRA additions for each DiT weight (state-dict key -> deltas in file order), with one report per file.

    A weight's deltas are dropped once the loader says it is `done` with that weight, so the LoRA tensors leave
    memory as the merge proceeds.
    """

    def __init__(self, deltas: dict[str, list[LoraDelta]], reports: list[LoraMergeReport], device, dtype):
        self.deltas, self.reports, self.device, self.dtype = deltas, reports, device, dtype

    def merge_weight(self, key: str, weight: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """`weight` (state-dict `key`, or its rows from `first_row` on) with its LoRA deltas added, or `weight`
        itself. Rows are independent, so merging a weight block by block gives the bits of merging it whole."""
        rows = slice(first_row, first_row + weight.shape[0]) if weight.ndim else slice(None)
        for d in self.deltas.get(key, ()):
            weight = merged_weight(weight, d.down, d.up[rows], d.scale, d.multiplier, self.dtype, self.device)
        return weight

    def done(self, key: str) -> None:
        """Drop the deltas of weight `key`: it is merged."""
        self.deltas.pop(key, None)

    def merge_into(self, model: nn.Module) -> None:
        """Merge into a loaded model, each weight written back in its own dtype, device and storage."""
        for name, module in model.named_modules():
            key = f"{name}.weight"
            if key in self.deltas:
                if hasattr(module, "scale_weight"):
                    raise RuntimeError("LoRA weights must be merged before fp8 quantization of the DiT")
                module.weight.data.copy_(self.merge_weight(key, module.weight.data))
                self.done(key)


def _plan_modules(linears: dict[str, nn.Linear], sd: dict, multiplier: float, deltas: dict) -> tuple[list, list]:
    """Add a musubi FramePack state dict's deltas to `deltas`; returns (module names, keys that reached no Linear)."""
    merged, unmatched = [], []
    for name, parts in group_by_module(sd).items():
        linear = linears.get(name)
        if linear is None or DOWN_KEY not in parts or UP_KEY not in parts:
            unmatched.extend(f"{name}.{kind}" for kind in parts)
            continue
        rank = parts[DOWN_KEY].shape[0]
        scale = float(parts.get(ALPHA_KEY, rank)) / rank
        if multiplier != 0:  # skipping keeps the weights bit-identical (no round trip through float32)
            delta = LoraDelta(parts[DOWN_KEY], parts[UP_KEY], scale, multiplier)
            deltas.setdefault(f"{module_path(name)}.weight", []).append(delta)
        merged.append(name)
    return merged, unmatched


def _check_fits(linears: dict[str, nn.Linear], sd: dict, converted, path: str) -> None:
    """Refuse the file before merging anything when no module matches or a module's factors do not fit its Linear."""
    modules = group_by_module(sd)
    matched = [n for n, parts in modules.items() if n in linears and DOWN_KEY in parts and UP_KEY in parts]
    if not matched:
        unmatched = converted.unrecognized + converted.source_keys(sd)
        raise LoraFormatError(
            f"{path}: no key matches a module of this DiT (a LoRA for another model?): {example_keys(unmatched, 8)}"
        )
    misfits = []
    for name in matched:
        down, up, linear = modules[name][DOWN_KEY], modules[name][UP_KEY], linears[name]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != linear.in_features or up.shape[0] != linear.out_features:
            fits = f"a Linear {linear.in_features} -> {linear.out_features}"
            misfits.append((name, f"down {tuple(down.shape)} / up {tuple(up.shape)} for {fits}"))
        elif up.shape[1] != down.shape[0]:
            misfits.append((name, f"rank {down.shape[0]} in down but {up.shape[1]} in up"))
    if misfits:
        shown = "; ".join(f"{(converted.source_keys([f'{n}.{DOWN_KEY}']) or [n])[0]}: {why}" for n, why in misfits[:3])
        raise LoraFormatError(
            f"{path}: {len(misfits)} of {len(matched)} modules have shapes that do not fit this DiT (a LoRA for a "
            f"different model size?): {shown}"
        )


def _plan_file(linears, path, sd, metadata, multiplier, include, exclude, deltas) -> LoraMergeReport:
    rows = {name: linear.out_features for name, linear in linears.items()}
    converted = convert_to_framepack(sd, metadata, target_rows=rows, source=path)
    report = LoraMergeReport(path, multiplier, converted.formats)
    filtered = _filter(converted.state_dict, include, exclude, report)
    if not filtered and report.filtered_out:
        logger.warning(f"{path}: the include/exclude patterns left no key; nothing merged")
        return report
    _check_fits(linears, filtered, converted, path)
    report.merged, unmatched = _plan_modules(linears, filtered, multiplier, deltas)
    report.unmatched = converted.unrecognized + converted.source_keys(unmatched)
    scales = {n: ra for n, ra in ranks_alphas(filtered).items() if n in report.merged}
    report.effective_scales = {n: alpha / rank * multiplier for n, (rank, alpha) in scales.items()}
    alphas_from = ", ".join(sorted({converted.alpha_sources[n] for n in report.merged}))
    logger.info(
        f"{path}: applied {len(report.merged)} modules, effective scale {describe_scales(scales, multiplier)}"
        f" (alpha from {alphas_from})"
    )
    if report.unmatched:
        logger.warning(
            f"{path}: {len(report.unmatched)} keys match no module of this DiT, not merged: "
            f"{example_keys(report.unmatched, 8)}"
        )
    return report


def _merge_lycoris_file(model, create_network, path, sd, multiplier, include, exclude, device, dtype):
    report = LoraMergeReport(path, multiplier, {"LyCORIS": len(sd)})
    filtered = _filter(sd, include, exclude, report)
    network, _ = create_network(
        multiplier=multiplier,
        file=None,
        weights_sd=filtered,
        unet=model,
        text_encoder=None,
        vae=None,
        for_inference=True,
    )
    network.merge_to(None, model, filtered, dtype=dtype, device=device)
    return report


def _normalized(paths, multipliers, include_patterns, exclude_patterns):
    paths = [str(p) for p in paths]
    return (
        paths,
        _multipliers(multipliers, len(paths)),
        _patterns(include_patterns, len(paths), "include patterns"),
        _patterns(exclude_patterns, len(paths), "exclude patterns"),
    )


def plan_lora_merge(
    model: nn.Module,
    lora_paths: Sequence[str],
    multipliers: float | Sequence[float] | None = None,
    include_patterns: str | Sequence[str | None] | None = None,
    exclude_patterns: str | Sequence[str | None] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    flag: str = "--lora_weight",
) -> LoraMergePlan:
    """Read, convert, filter and check every LoRA file against `model`, which may be a meta-device skeleton.

    Arguments as `merge_lora_files`; `flag` names the files in errors. Errors (unknown layout, a file none of whose
    keys fits, shapes of another model size) are raised here, before any DiT weight is read.
    """
    paths, multipliers, includes, excludes = _normalized(lora_paths, multipliers, include_patterns, exclude_patterns)
    linears = target_linears(model)
    deltas: dict[str, list[LoraDelta]] = {}
    reports = []
    for path, multiplier, include, exclude in zip(paths, multipliers, includes, excludes):
        logger.info(f"LoRA {path} with multiplier {multiplier}")
        sd, metadata = load_lora_file(path, flag)
        reports.append(_plan_file(linears, path, sd, metadata, multiplier, include, exclude, deltas))
    return LoraMergePlan(deltas, reports, device, dtype)


def check_loras_fit(
    model: nn.Module,
    flag: str,
    lora_paths: Sequence[str],
    multipliers: float | Sequence[float] | None = None,
    include_patterns: str | Sequence[str | None] | None = None,
    exclude_patterns: str | Sequence[str | None] | None = None,
) -> None:
    """`plan_lora_merge` on the CPU as a check before anything loads (`model` is usually a meta-device skeleton):
    a file that is not a LoRA, or one of another model, raises LoraFormatError naming `flag`."""
    try:
        plan_lora_merge(model, lora_paths, multipliers, include_patterns, exclude_patterns, device="cpu", flag=flag)
    except LoraFormatError as e:
        message = str(e)
        raise LoraFormatError(message if message.startswith("--") else f"{flag} {message}") from None


def merge_lora_files(
    model: nn.Module,
    lora_paths: Sequence[str],
    multipliers: float | Sequence[float] | None = None,
    include_patterns: str | Sequence[str | None] | None = None,
    exclude_patterns: str | Sequence[str | None] | None = None,
    device: torch.device | str | None = None,
    lycoris: bool = False,
    dtype: torch.dtype | None = None,
) -> list[LoraMergeReport]:
    """Merge each LoRA file into `model` in order and return one report per file.

    `multipliers`: one for every LoRA or one per LoRA (default 1.0). `include_patterns`/`exclude_patterns`: a regex
    for every LoRA, or a list with one entry (or None) per LoRA by position. `device`: where the float32 merge is
    computed (default: each weight's own device). `dtype`: round the merged weights through this dtype (the
    trainer's `--base_weights` merge uses the mixed-precision dtype). A file none of whose keys fits the DiT is an
    error (LoraFormatError), as is a file in no known layout.
    """
    if not lycoris:
        plan = plan_lora_merge(model, lora_paths, multipliers, include_patterns, exclude_patterns, device, dtype)
        plan.merge_into(model)
        return plan.reports
    paths, multipliers, includes, excludes = _normalized(lora_paths, multipliers, include_patterns, exclude_patterns)
    create_lycoris_network = _import_lycoris()
    reports = []
    for path, multiplier, include, exclude in zip(paths, multipliers, includes, excludes):
        logger.info(f"merging LyCORIS {path} with multiplier {multiplier}")
        sd, _ = load_lora_file(path)
        reports.append(
            _merge_lycoris_file(model, create_lycoris_network, path, sd, multiplier, include, exclude, device, dtype)
        )
    return reports


def save_merged_model(model: nn.Module, path: str) -> None:
    """Write the DiT state dict (merged, before fp8) as one safetensors file that `load_packed_model` reads back."""
    state = model.state_dict()
    if any(k.endswith("scale_weight") for k in state) or any(
        t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in state.values()
    ):
        raise RuntimeError("save the merged model before fp8 quantization: an fp8 DiT is not a loadable --dit file")
    logger.info(f"saving merged DiT to {path}")
    save_safetensors(state, path, metadata={"format": "pt"})
