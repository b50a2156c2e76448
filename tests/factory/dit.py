"""Tiny packed DiTs in the public layouts: lllyasviel's sharded folder (index json + config.json) and Kijai's file."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked, PackedDiTConfig
from tests.factory import dims
from utils.safetensors_utils import save_safetensors, save_sharded, write_safetensors_streaming

SHARD_PREFIX = "diffusion_pytorch_model"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
KIJAI_NAME = "FramePackI2V_HY_bf16.safetensors"


def tiny_dit_config(**overrides) -> PackedDiTConfig:
    config = PackedDiTConfig(
        num_attention_heads=dims.DIT_INNER // 128,
        num_layers=dims.DIT_DOUBLE_BLOCKS,
        num_single_layers=dims.DIT_SINGLE_BLOCKS,
        num_refiner_layers=dims.DIT_REFINER_BLOCKS,
        text_embed_dim=dims.LLAMA_HIDDEN,
        pooled_projection_dim=dims.CLIP_HIDDEN,
        image_proj_dim=dims.SIGLIP_HIDDEN,
    )
    return replace(config, **overrides)


def mid_dit_config(**overrides) -> PackedDiTConfig:
    """The benches' mid-size DiT: 1024 wide (8 heads of 128), 8 double + 16 single blocks; tiny encoder widths."""
    return tiny_dit_config(**{"num_attention_heads": 8, "num_layers": 8, "num_single_layers": 16, **overrides})


def full_dit_config() -> PackedDiTConfig:
    """The real FramePack DiT: 3072 wide, 20 double + 40 single blocks, the real encoder widths."""
    return PackedDiTConfig()


def tiny_dit_state_dict(
    seed: int = 0, config: PackedDiTConfig | None = None, dtype=torch.bfloat16, device: str | torch.device = "cpu"
) -> dict:
    """Seeded weights: 1-D norm weights 1, norm biases 0, other tensors N(0, 1/fan_in) so activations stay O(1).

    Drawn on `device` (values depend on it: a CUDA generator draws other numbers than the CPU one)."""
    return dict(_dit_tensors(seed, config or tiny_dit_config(), dtype, device))


def _dit_shapes(config: PackedDiTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in HunyuanVideoTransformer3DModelPacked(config).state_dict().items()}


def _dit_tensors(seed: int, config: PackedDiTConfig, dtype, device: str | torch.device = "cpu"):
    """(key, tensor) in sorted key order, drawn one after the other from one generator."""
    shapes = _dit_shapes(config)
    gen = torch.Generator(device).manual_seed(seed)
    for key in sorted(shapes):
        shape = shapes[key]
        if len(shape) == 1 and "norm" in key and key.endswith(".weight") and ".linear." not in key:
            t = torch.ones(shape, device=device)
        elif len(shape) == 1 and "norm" in key and ".linear." not in key:
            t = torch.zeros(shape, device=device)
        elif len(shape) == 1:
            t = torch.randn(shape, generator=gen, device=device) * 0.02
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            t = torch.randn(shape, generator=gen, device=device) / fan_in**0.5
        yield key, t.to(dtype)


def random_dit(
    config: PackedDiTConfig, seed: int = 0, dtype=torch.bfloat16, device: str | torch.device = "cpu"
) -> HunyuanVideoTransformer3DModelPacked:
    """A frozen eval-mode DiT with `tiny_dit_state_dict` weights, built directly on `device` (no checkpoint file)."""
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModelPacked(config)
    model.load_state_dict(tiny_dit_state_dict(seed, config, dtype, device), assign=True)
    return model.eval().requires_grad_(False)


def diffusers_config(config: PackedDiTConfig) -> dict:
    """config.json as found in lllyasviel's snapshot folders (diffusers class config)."""
    values = config.to_dict()
    values["rope_axes_dim"] = list(values["rope_axes_dim"])
    return {
        "_class_name": "HunyuanVideoTransformer3DModelPacked",
        **values,
        "qk_norm": "rms_norm",
        "guidance_embeds": True,
        "has_image_proj": True,
        "has_clean_x_embedder": True,
    }


def write_dit_sharded(folder, seed: int = 0, config: PackedDiTConfig | None = None, index: bool = True) -> str:
    """lllyasviel/FramePackI2V_HY layout: three shards, index json, config.json. Returns the folder."""
    config = config or tiny_dit_config()
    os.makedirs(folder, exist_ok=True)
    save_sharded(tiny_dit_state_dict(seed, config), folder, SHARD_PREFIX, 3, INDEX_NAME if index else None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(diffusers_config(config), f, indent=2)
    return str(folder)


def write_dit_streamed(path, config: PackedDiTConfig, seed: int = 0) -> str:
    """The single-file layout written one tensor at a time (same values as `write_dit_single`), for DiTs too large
    to hold twice in memory (the memory bench). Returns the file path."""
    shapes = _dit_shapes(config)
    layout = [(key, torch.bfloat16, tuple(shapes[key])) for key in sorted(shapes)]
    write_safetensors_streaming(path, layout, _dit_tensors(seed, config, torch.bfloat16))
    return str(path)


def write_dit_single(path, seed: int = 0, config: PackedDiTConfig | None = None) -> str:
    """Kijai's single bf16 file layout. Returns the file path."""
    save_safetensors(tiny_dit_state_dict(seed, config or tiny_dit_config()), path)
    return str(path)
