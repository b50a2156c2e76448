"""Cheap previews of HunyuanVideo latents without the VAE: a fixed linear map from the 16 latent channels to RGB.

The factors and bias are ComfyUI's published approximation for the HunyuanVideo latent space (its
`latent_rgb_factors` / `latent_rgb_factors_bias`), applied to latents as the DiT sees them (already multiplied by
the VAE scaling factor). The map gives values around [-1, 1], shown as (x + 1) / 2 clamped to [0, 1]. One preview
pixel stands for one latent pixel (8×8 video pixels) and one preview frame for one latent frame (4 video frames).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from utils.temporary_files import temporary_path
from utils.video_io import save_video

# rows: latent channels 0..15; columns: R, G, B
LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445),
    (0.0696, 0.0795, 0.0518),
    (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224),
    (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669),
    (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375),
    (0.1166, 0.1627, 0.0962),
    (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355),
    (-0.0270, 0.0401, -0.0821),
    (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)
LATENT_RGB_BIAS = (0.0259, -0.0192, -0.0761)
PREVIEW_FORMATS = ("mp4", "png")
PREVIEW_SUFFIX = "_preview"


def latent_to_rgb(latent: torch.Tensor) -> np.ndarray:
    """(16, T, h, w) or (1, 16, T, h, w) latent -> (T, h, w, 3) uint8 frames."""
    if latent.dim() == 5:
        latent = latent[0]
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = torch.einsum("cthw,cr->thwr", latent.float().cpu(), factors) + bias
    return (((rgb + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def preview_path(save_path: str, name: str, kind: str) -> str:
    return os.path.join(save_path, f"{name}{PREVIEW_SUFFIX}.{kind}")


def write_preview(latent: torch.Tensor, path: str, fps: float) -> str:
    """Write the preview atomically (temporary name, then rename): an mp4 at fps/4, or a PNG strip of the frames
    side by side. Sides are rounded up to even sizes for H.264 by repeating the last row/column."""
    frames = latent_to_rgb(latent)
    if path.endswith(".png"):
        strip = np.concatenate(list(frames), axis=1)
        tmp = temporary_path(path, keep_extension=True)
        try:
            Image.fromarray(strip).save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return save_video(frames, path, max(1, round(fps / 4)))
