"""Saved latents: musubi-tuner's file format, so latents written by one tool decode in the other.

One tensor under key `latent`, fp32, (16, T, h, w); settings as string metadata (omitted with --no_metadata).
"""

from __future__ import annotations

import os
import zipfile
from typing import TYPE_CHECKING

import torch

from utils.cli import one_line
from utils.safetensors_utils import WeightFileError, load_state_dict, read_header, save_safetensors

if TYPE_CHECKING:
    from pipelines.settings import GenerationSettings

LATENT_KEY = "latent"


def latent_metadata(settings: GenerationSettings, seed: int, height: int, width: int) -> dict[str, str]:
    """musubi-tuner's metadata keys (all strings); `negative_prompt` only when given."""
    meta = {
        "seeds": str(seed),
        "prompt": str(settings.prompt),
        "height": str(height),
        "width": str(width),
        "video_seconds": str(settings.video_seconds),
        "infer_steps": str(settings.infer_steps),
        "guidance_scale": str(settings.guidance_scale),
        "latent_window_size": str(settings.latent_window_size),
        "embedded_cfg_scale": str(settings.embedded_cfg_scale),
        "guidance_rescale": str(settings.guidance_rescale),
        "sample_solver": str(settings.sample_solver),
        "fps": str(settings.fps),
    }
    if settings.negative_prompt:
        meta["negative_prompt"] = str(settings.negative_prompt)
    # Not in musubi-tuner; readers ignore unknown keys.
    meta["f1"] = str(bool(settings.f1))
    if settings.video_sections is not None:
        meta["video_sections"] = str(settings.video_sections)
    if settings.one_frame_inference:
        meta["one_frame_inference"] = str(settings.one_frame_inference)
    if settings.prompt_blend_sections:
        meta["prompt_blend_sections"] = str(settings.prompt_blend_sections)
    return meta


def save_latent(latent: torch.Tensor, path: str, metadata: dict[str, str] | None) -> str:
    """latent: (16, T, h, w) or (1, 16, T, h, w); written as fp32 (16, T, h, w)."""
    if latent.dim() == 5:
        latent = latent[0]
    save_safetensors({LATENT_KEY: latent.float().cpu()}, path, metadata=metadata)
    return path


def load_latent(path: str, flag: str = "--latent_path") -> tuple[torch.Tensor, dict[str, str]]:
    """-> ((16, T, h, w) tensor, metadata). Accepts musubi-tuner's 4-D and 5-D files and torch.save files; any fault
    of the file is a WeightFileError naming ``flag`` and the file."""
    if not os.path.isfile(path):
        raise WeightFileError(f"{flag} {path}: no such file")
    if path.endswith(".safetensors") or not zipfile.is_zipfile(path):
        if not path.endswith(".safetensors") and not _looks_like_safetensors(path):
            raise WeightFileError(f"{flag} {path}: not a saved latent (neither a .safetensors nor a torch.save file)")
        infos, metadata = read_header(path, flag)
        if LATENT_KEY not in infos:
            raise WeightFileError(
                f"{flag} {path}: not a saved latent (no tensor named '{LATENT_KEY}'; keys: {list(infos)[:5]})"
            )
        latent = load_state_dict(path, key_filter=LATENT_KEY.__eq__, flag=flag)[LATENT_KEY]
    else:
        try:
            latent, metadata = torch.load(path, map_location="cpu", weights_only=True), {}
        except Exception as e:  # torch.load reports damaged or foreign files through many exception types
            raise WeightFileError(f"{flag} {path}: not a readable torch.save latent ({one_line(e)})") from e
        if not isinstance(latent, torch.Tensor):
            raise WeightFileError(f"{flag} {path}: holds a {type(latent).__name__}, not a latent tensor")
    if latent.dim() == 5:
        latent = latent.squeeze(0)
    if latent.dim() != 4 or latent.shape[0] != 16:
        raise WeightFileError(f"{flag} {path}: expected a (16, T, h, w) latent, got {tuple(latent.shape)}")
    return latent, metadata


def _looks_like_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte header length followed by the JSON header's `{`."""
    with open(path, "rb") as f:
        return f.read(9)[8:9] == b"{"
