"""Tiny seeded SigLIP vision encoder in the published layouts.

Keys are the transformers 4.x names of the real files (Comfy-Org `sigclip_vision_patch14_384.safetensors`,
lllyasviel/flux_redux_bfl `image_encoder/model.safetensors`), attention-pooling head included. Image size 384 and
patch 14 are kept, so the tiny model has the real 729 positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hunyuan_model.image_encoder import SIGLIP_HEAD_DIM, SIGLIP_IMAGE_SIZE
from tests.factory import dims
from tests.factory.text_encoders import encoder_layer_specs, seeded_state_dict
from tests.factory.tokenizers import write_json
from utils.safetensors_utils import save_safetensors

SIGLIP_PATCH = 14
SIGLIP_POSITIONS = (SIGLIP_IMAGE_SIZE // SIGLIP_PATCH) ** 2  # 729
COMFY_NAME = "sigclip_vision_patch14_384.safetensors"


def siglip_state_dict(seed: int = 2, dtype: torch.dtype = torch.float16, head: bool = True) -> dict[str, torch.Tensor]:
    h, i = dims.SIGLIP_HIDDEN, dims.SIGLIP_INTERMEDIATE
    v = "vision_model."
    spec = {
        v + "embeddings.patch_embedding.weight": ((h, 3, SIGLIP_PATCH, SIGLIP_PATCH), "linear"),
        v + "embeddings.patch_embedding.bias": ((h,), "bias"),
        v + "embeddings.position_embedding.weight": ((SIGLIP_POSITIONS, h), "embed"),
    }
    spec.update(encoder_layer_specs(f"{v}encoder.layers", dims.SIGLIP_LAYERS, h, i))
    spec[v + "post_layernorm.weight"] = ((h,), "norm")
    spec[v + "post_layernorm.bias"] = ((h,), "bias")
    if head:
        spec.update(
            {
                v + "head.probe": ((1, 1, h), "embed"),
                v + "head.attention.in_proj_weight": ((3 * h, h), "linear"),
                v + "head.attention.in_proj_bias": ((3 * h,), "bias"),
                v + "head.attention.out_proj.weight": ((h, h), "linear"),
                v + "head.attention.out_proj.bias": ((h,), "bias"),
                v + "head.layernorm.weight": ((h,), "norm"),
                v + "head.layernorm.bias": ((h,), "bias"),
                v + "head.mlp.fc1.weight": ((i, h), "linear"),
                v + "head.mlp.fc1.bias": ((i,), "bias"),
                v + "head.mlp.fc2.weight": ((h, i), "linear"),
                v + "head.mlp.fc2.bias": ((h,), "bias"),
            }
        )
    return seeded_state_dict(spec, seed, dtype)


def siglip_config_json() -> dict:
    """The flux_redux_bfl image_encoder/config.json, tiny sizes."""
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": dims.SIGLIP_HIDDEN,
        "intermediate_size": dims.SIGLIP_INTERMEDIATE,
        "num_hidden_layers": dims.SIGLIP_LAYERS,
        "num_attention_heads": dims.SIGLIP_HIDDEN // SIGLIP_HEAD_DIM,
        "num_channels": 3,
        "image_size": SIGLIP_IMAGE_SIZE,
        "patch_size": SIGLIP_PATCH,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "attention_dropout": 0.0,
        "torch_dtype": "float16",
    }


@dataclass(frozen=True)
class ImageEncoderFiles:
    comfy: Path  # Comfy-Org sigclip_vision_patch14_384.safetensors
    redux_file: Path  # flux_redux_bfl image_encoder/model.safetensors
    snapshot: Path  # flux_redux_bfl snapshot root holding image_encoder/ (with config.json)
    headless: Path  # the same encoder without the pooling head


def make_image_encoder_files(out_dir: str | Path, seed: int = 2) -> ImageEncoderFiles:
    out = Path(out_dir)
    comfy = out / "comfy" / COMFY_NAME
    save_safetensors(siglip_state_dict(seed), comfy)
    snapshot = out / "flux_redux_bfl"
    redux_file = snapshot / "image_encoder" / "model.safetensors"
    save_safetensors(siglip_state_dict(seed), redux_file, metadata={"format": "pt"})
    write_json(snapshot / "image_encoder" / "config.json", siglip_config_json())
    headless = out / "headless" / COMFY_NAME
    save_safetensors(siglip_state_dict(seed, head=False), headless)
    return ImageEncoderFiles(comfy=comfy, redux_file=redux_file, snapshot=snapshot, headless=headless)
