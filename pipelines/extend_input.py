"""Reading the video that ``--extend_video`` continues: an mp4 (any length) or a saved latent (ours or musubi-tuner's).

Everything here runs before any model loads, and every error names the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import av
import numpy as np
import torch

from dataset.media import MediaError, load_video
from frame_pack.extend import MIN_INPUT_LATENT_FRAMES
from hunyuan_model.frame_math import (
    SPATIAL_COMPRESSION,
    TEMPORAL_COMPRESSION,
    latent_size,
    pixel_frames,
    round_to_4n_plus_1,
)
from pipelines.latent_file import load_latent
from utils.cli import UserError

logger = logging.getLogger(__name__)

LATENT_SUFFIXES = (".safetensors", ".pt", ".pth")
FLAG = "--extend_video"


class ExtendVideoError(UserError, ValueError):
    """An input that cannot be extended; the message names the flag and the file."""


@dataclass
class ExtendSource:
    """The input to continue: a latent (1, 16, T, h, w) fp32, or video frames (F, H, W, 3) uint8 with F = 4k + 1
    resized and centre-cropped to the video size (encoded later, with the VAE)."""

    path: str
    latent: torch.Tensor | None = None
    frames: np.ndarray | None = None

    @property
    def latent_frames(self) -> int:
        if self.latent is not None:
            return self.latent.shape[2]
        return (len(self.frames) - 1) // TEMPORAL_COMPRESSION + 1


def is_latent_file(path: str) -> bool:
    return path.lower().endswith(LATENT_SUFFIXES)


def _read_latent(path: str, height: int, width: int, flag: str) -> torch.Tensor:
    try:
        latent, _ = load_latent(path, flag=flag)
    except ValueError as e:
        raise ExtendVideoError(str(e)) from None
    except Exception as e:  # a truncated or foreign file: safetensors / torch say why
        raise ExtendVideoError(f"{flag} {path}: cannot read a latent from it ({type(e).__name__}: {e})") from None
    _, frames, h, w = latent.shape  # load_latent refuses a channel count other than 16
    expected = latent_size(height, width)
    if (h, w) != expected:
        raise ExtendVideoError(
            f"{flag} {path}: latent of {h}x{w} is for a {h * SPATIAL_COMPRESSION}x{w * SPATIAL_COMPRESSION} video, "
            f"--video_size is {height} {width} (latent {expected[0]}x{expected[1]}); "
            f"pass --video_size {h * SPATIAL_COMPRESSION} {w * SPATIAL_COMPRESSION}"
        )
    if frames < MIN_INPUT_LATENT_FRAMES:
        raise ExtendVideoError(
            f"{flag} {path}: {frames} latent frame(s) is a still image; extending needs at least "
            f"{MIN_INPUT_LATENT_FRAMES} (use it as --image_path instead)"
        )
    return latent.float()[None]


def _open_video(path: str, flag: str):
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise ExtendVideoError(f"{flag} {path}: not a readable video or latent file ({e})") from None
    if not container.streams.video:
        container.close()
        raise ExtendVideoError(f"{flag} {path}: the file has no video stream")
    return container


def check_extend_video(path: str, height: int, width: int, flag: str = FLAG) -> None:
    """Cheap checks for flag validation: the file exists, a latent has the right shape, a video opens."""
    if not os.path.isfile(path):
        raise ExtendVideoError(f"{flag} {path}: file not found")
    if is_latent_file(path):
        _read_latent(path, height, width, flag)
    else:
        _open_video(path, flag).close()


def read_extend_source(path: str, height: int, width: int, fps: int, flag: str = FLAG) -> ExtendSource:
    """Load and check the input. A video keeps its last 4k + 1 frames (the causal VAE encodes 1 + 4k frames; the
    frames dropped are at the start, so the continuation follows the file's real last frame)."""
    check_extend_video(path, height, width, flag)
    if is_latent_file(path):
        latent = _read_latent(path, height, width, flag)
        logger.info(f"extending {path}: latent of {latent.shape[2]} frames")
        return ExtendSource(path, latent=latent)

    with _open_video(path, flag) as container:
        rate = container.streams.video[0].average_rate
    if rate is not None and abs(float(rate) - fps) > 0.01:
        logger.warning(f"{flag} {path}: the video runs at {float(rate):g} fps, the output at --fps {fps}")
    try:
        frames = np.stack(load_video(path, bucket_reso=(width, height)))
    except MediaError as e:
        raise ExtendVideoError(f"{flag} {e}") from None
    minimum = pixel_frames(MIN_INPUT_LATENT_FRAMES)
    if len(frames) < minimum:
        raise ExtendVideoError(
            f"{flag} {path}: {len(frames)} frame(s); extending needs at least {minimum} "
            f"({MIN_INPUT_LATENT_FRAMES} latent frames, one latent frame per {TEMPORAL_COMPRESSION} video frames)"
        )
    keep = round_to_4n_plus_1(len(frames))
    if keep < len(frames):
        logger.info(f"{flag} {path}: using the last {keep} of {len(frames)} frames (the VAE encodes 1 + 4k frames)")
    frames = frames[len(frames) - keep :]
    logger.info(f"extending {path}: {keep} frames -> {(keep - 1) // TEMPORAL_COMPRESSION + 1} latent frames")
    return ExtendSource(path, frames=frames)


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (1, 3, F, H, W) in [-1, 1]: x / 127.5 - 1, as for the start image."""
    return (torch.from_numpy(frames).float() / 127.5 - 1.0).permute(3, 0, 1, 2)[None]
