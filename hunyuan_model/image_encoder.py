"""SigLIP image encoder (the FLUX.1 Redux `image_encoder`) and its fixed preprocessing.

FramePack conditions every section on the SigLIP `last_hidden_state` of the start image (post-layernorm, before the
attention-pooling head). The preprocessing is musubi-tuner's `SiglipImageProcessor` configuration written out as
code, so nothing is fetched from a hub: bicubic resize to 384×384 (no aspect keeping, no crop), ×1/255, then
(x − 0.5) / 0.5 per channel.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from hunyuan_model.encoder_loader import EncoderSpec, count_layers, heads_from_rows, load_encoder
from utils.safetensors_utils import WeightFileError

logger = logging.getLogger(__name__)

SIGLIP_IMAGE_SIZE = 384
SIGLIP_HEAD_DIM = 72
SIGLIP_ACT = "gelu_pytorch_tanh"
SIGLIP_LAYER_NORM_EPS = 1e-6
SIGLIP_RESAMPLE = Image.Resampling.BICUBIC  # PIL resample 3
SIGLIP_RESCALE = 1 / 255  # 0.00392156862745098
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

SIGLIP_PREFIX = "vision_model."  # transformers 4.x checkpoint names; the 5.x module has no such level
SIGLIP_EXPECTED = (
    "the SigLIP image encoder: Comfy-Org sigclip_vision_patch14_384.safetensors, lllyasviel/flux_redux_bfl "
    "image_encoder/model.safetensors, or a flux_redux_bfl snapshot folder"
)


def preprocess_image(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB → float32 (1, 3, 384, 384) in [−1, 1], numerically as musubi-tuner's image processor."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("the image encoder takes a uint8 numpy array of shape (H, W, 3) in RGB order")
    resized = Image.fromarray(image).resize((SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE), resample=SIGLIP_RESAMPLE)
    x = (np.asarray(resized).astype(np.float64) * SIGLIP_RESCALE).astype(np.float32)
    x = (x - np.array(SIGLIP_MEAN, dtype=np.float32)) / np.array(SIGLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


@torch.no_grad()
def encode_image(image: np.ndarray, image_encoder: SiglipVisionModel) -> torch.Tensor:
    """SigLIP `last_hidden_state` (1, 729, hidden) of a uint8 HWC RGB image, on the encoder's device and dtype."""
    pixel_values = preprocess_image(image).to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).last_hidden_state


def _rename(key: str) -> str:
    return key[len(SIGLIP_PREFIX) :] if key.startswith(SIGLIP_PREFIX) else key


def siglip_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], flag: str = "--image_encoder", path=""
) -> SiglipVisionConfig:
    """SigLIP vision config from module-named shapes; the head is built only when the file carries it."""
    hidden, channels, patch, _ = shapes["embeddings.patch_embedding.weight"]
    positions = shapes["embeddings.position_embedding.weight"][0]
    if positions != (SIGLIP_IMAGE_SIZE // patch) ** 2:
        raise WeightFileError(
            f"{flag} {path}: {positions} position embeddings do not fit image size {SIGLIP_IMAGE_SIZE} with patch "
            f"{patch}; expected {SIGLIP_EXPECTED}"
        )
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=count_layers(shapes, "encoder.layers."),
        num_attention_heads=heads_from_rows(hidden, SIGLIP_HEAD_DIM, "the hidden size", flag, path),
        num_channels=channels,
        image_size=SIGLIP_IMAGE_SIZE,
        patch_size=patch,
        hidden_act=SIGLIP_ACT,
        layer_norm_eps=SIGLIP_LAYER_NORM_EPS,
        vision_use_head="head.probe" in shapes,
    )


def _set_head(config: SiglipVisionConfig, shapes) -> None:
    """The attention-pooling head is built only when the file carries it (the Comfy file has none)."""
    config.vision_use_head = "head.probe" in shapes


SIGLIP_SPEC = EncoderSpec(
    name="image encoder",
    model_class=SiglipVisionModel,
    config_class=SiglipVisionConfig,
    subfolder="image_encoder",
    expected=SIGLIP_EXPECTED,
    required_keys=("embeddings.patch_embedding.weight", "encoder.layers.0.mlp.fc1.weight"),
    rename=lambda infos: _rename,
    config_from_shapes=siglip_config_from_shapes,
    adjust_config=_set_head,
)


def load_image_encoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", flag: str = "--image_encoder"
) -> SiglipVisionModel:
    """Load SigLIP from a single file (file dtype kept) or a snapshot folder with `image_encoder/` (float16)."""
    return load_encoder(SIGLIP_SPEC, path, flag).to(device)
