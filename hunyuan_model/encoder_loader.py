"""One loader for the transformers-based encoders (LLaMA, CLIP-L, SigLIP), driven by a declarative spec per family.

Every published layout loads the same way: resolve the files (single file, first shard, shard folder or snapshot
folder with the family's subfolder), read the headers, rename the keys to the module's names, refuse a file that
lacks the family's required keys, take the config from the folder's `config.json` or else build it from the
tensor shapes, check every tensor against the model built from that config, and only then read the weights.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import PretrainedConfig, PreTrainedModel

from utils.checkpoint_kinds import describe_checkpoint, state_dict_mismatch
from utils.safetensors_utils import (
    TensorInfo,
    WeightFileError,
    load_state_dict,
    read_config_json,
    read_headers,
    resolve_weight_files,
)

logger = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]
Rename = Callable[[str], "str | None"]


@dataclass(frozen=True)
class EncoderSpec:
    """What differs between the encoder families; `load_encoder` does the rest."""

    name: str  # for logs: "text encoder 1"
    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    subfolder: str  # of a snapshot folder
    expected: str  # what the flag should name, for error messages
    required_keys: tuple[str, ...]  # module-named keys every checkpoint of the family has
    rename: Callable[[dict[str, TensorInfo]], Rename]  # from the header: file key -> module key, or None to skip
    config_from_shapes: Callable[[Shapes, str, str | os.PathLike], PretrainedConfig]
    adjust_config: Callable[[PretrainedConfig, Shapes], None] | None = None  # after config.json or shapes


def weight_folder(path: str | os.PathLike, subfolder: str) -> Path | None:
    """The folder whose config.json applies: `path/subfolder` for a snapshot root, `path` for the folder itself."""
    p = Path(path)
    if not p.is_dir():
        return None
    return p / subfolder if (p / subfolder).is_dir() else p


def count_layers(keys, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m[1]) for key in keys if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def heads_from_rows(rows: int, head_dim: int, what: str, flag: str, path) -> int:
    if rows % head_dim:
        raise WeightFileError(f"{flag} {path}: {what} has {rows} rows, not a multiple of the head size {head_dim}")
    return rows // head_dim


@dataclass
class EncoderPlan:
    """What loading one encoder checkpoint takes, worked out from its headers alone: the files, file key -> module
    key of the tensors to read, the model built on the meta device, and the dtype to load in (None: the file's)."""

    files: list[str]
    keep: dict[str, str]
    model: PreTrainedModel
    dtype: torch.dtype | None


def plan_encoder(spec: EncoderSpec, path: str | os.PathLike, flag: str) -> EncoderPlan:
    """Check a checkpoint against the encoder family without reading any tensor data; WeightFileError naming
    `flag` and the file when it is of another kind or does not fit its own config."""
    files = resolve_weight_files(path, flag, subfolder=spec.subfolder)
    infos = read_headers(files, flag)
    rename = spec.rename(infos)
    keep = {key: new for key in infos if (new := rename(key)) is not None}
    shapes = {new: infos[key].shape for key, new in keep.items()}
    if any(key not in shapes for key in spec.required_keys):
        raise WeightFileError(f"{flag} {path}: this looks like {describe_checkpoint(infos)}; expected {spec.expected}")
    folder = weight_folder(path, spec.subfolder)
    config_json = read_config_json(folder, flag)
    config = spec.config_class.from_dict(config_json) if config_json else spec.config_from_shapes(shapes, flag, path)
    if spec.adjust_config is not None:
        spec.adjust_config(config, shapes)
    with init_empty_weights():
        model = spec.model_class(config)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = state_dict_mismatch(wanted, shapes)
    if problem:
        raise WeightFileError(
            f"{flag} {path}: tensors do not fit the model built from its config ({problem}); expected {spec.expected}"
        )
    return EncoderPlan(files, keep, model, torch.float16 if folder is not None else None)


def load_encoder(spec: EncoderSpec, path: str | os.PathLike, flag: str) -> PreTrainedModel:
    """Load one encoder on the CPU in eval mode: files keep their dtype, a snapshot folder loads as float16."""
    plan = plan_encoder(spec, path, flag)
    logger.info("Loading %s from %s", spec.name, path)
    state = load_state_dict(plan.files, dtype=plan.dtype, key_filter=lambda k: k in plan.keep, flag=flag)
    plan.model.load_state_dict({plan.keep[k]: v for k, v in state.items()}, strict=True, assign=True)
    return plan.model.eval().requires_grad_(False)
