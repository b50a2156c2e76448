"""Loading the packed DiT from every public layout, with the config read from the checkpoint itself.

Accepted for `--dit`: lllyasviel's three-shard folder (index json used when present), a path to its first shard,
a Hugging Face snapshot folder, and Kijai's single bf16 file; FramePack-F1 the same way. The model is built on the
meta device and the file tensors are assigned as they are (file dtype kept), so no second copy is ever held.
"""

from __future__ import annotations

import logging
import os

import torch

from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked, PackedDiTConfig
from utils.checkpoint_kinds import state_dict_mismatch, wrong_file_message
from utils.safetensors_utils import (
    WeightFileError,
    load_state_dict,
    read_config_json,
    read_headers,
    resolve_weight_files,
)

logger = logging.getLogger(__name__)

# Keys without which a file cannot be a FramePack packed DiT.
REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "clean_x_embedder.proj.weight",
    "image_projection.up.weight",
    "context_embedder.proj_in.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.norm_q.weight",
    "proj_out.weight",
)


def read_dit_config(path: str, flag: str = "--dit") -> tuple[list[str], PackedDiTConfig]:
    """Validate a DiT checkpoint from its headers alone and return (files, config). Cheap: reads no tensor data."""
    files = resolve_weight_files(path, flag, subfolder="transformer")
    infos = read_headers(files, flag)
    missing = [k for k in REQUIRED_KEYS if k not in infos]
    if missing:
        raise WeightFileError(
            wrong_file_message(flag, path, "a FramePack DiT (keys like x_embedder.proj.weight)", infos)
        )
    shapes = {k: v.shape for k, v in infos.items()}
    config = PackedDiTConfig.from_shapes(shapes, read_config_json(os.path.dirname(files[0]), flag))

    with torch.device("meta"):
        expected = HunyuanVideoTransformer3DModelPacked(config).state_dict()
    problem = state_dict_mismatch({k: tuple(v.shape) for k, v in expected.items()}, shapes)
    if problem:
        raise WeightFileError(f"{flag} {path}: not a complete FramePack DiT: {problem}")
    return files, config


def load_packed_model(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_mode: str = "torch",
    split_attn: bool = False,
    flag: str = "--dit",
) -> HunyuanVideoTransformer3DModelPacked:
    """Load a FramePack (or F1) DiT. `dtype` None keeps the file's dtype (bf16 for the public weights)."""
    files, config = read_dit_config(path, flag)
    logger.info(
        f"DiT from {path}: {config.num_layers} double + {config.num_single_layers} single blocks, "
        f"width {config.inner_dim} ({len(files)} file(s))"
    )
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModelPacked(config, attn_mode=attn_mode, split_attn=split_attn)
    state = load_state_dict(files, device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model
