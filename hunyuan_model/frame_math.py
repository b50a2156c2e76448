"""Frame arithmetic of the HunyuanVideo VAE that FramePack uses: how pixel frames, latent frames, sections and
latent sizes relate. One definition each, imported by caching, training, sampling and generation.

The VAE is causal in time: the first pixel frame becomes the first latent frame on its own, and every further
latent frame covers TEMPORAL_COMPRESSION pixel frames, so a clip must have 4n+1 frames. Space shrinks by
SPATIAL_COMPRESSION in each direction into LATENT_CHANNELS channels.
"""

from __future__ import annotations

LATENT_CHANNELS = 16
SPATIAL_COMPRESSION = 8
TEMPORAL_COMPRESSION = 4
# Largest latent window: a section of 4·33 - 3 = 129 frames, the longest clip HunyuanVideo generates in one go.
# FramePack-Studio and the ComfyUI wrapper cap their window at 33 too; a larger one is a typo that would make each
# DiT call quadratically slower (and exhaust memory).
MAX_LATENT_WINDOW_SIZE = 33


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of `frames` frames: 1 + (F - 1) // 4 (73 -> 19, 33 -> 9, 1 -> 1)."""
    return (frames - 1) // TEMPORAL_COMPRESSION + 1


def pixel_frames(latents: int) -> int:
    """Pixel frames the VAE decodes from `latents` latent frames: 4·(L - 1) + 1 (19 -> 73)."""
    return (latents - 1) * TEMPORAL_COMPRESSION + 1


def round_to_4n_plus_1(frames: int) -> int:
    """Largest frame count of the form 4n+1 not above `frames` (what the causal VAE can encode)."""
    return pixel_frames(latent_frames(frames))


def latent_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of the latent of a (height, width) image."""
    return height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION


def sections_in_latent(latents: int, latent_window_size: int) -> int:
    """Whole sections of `latent_window_size` latent frames after the first latent frame (the start image):
    floor((L - 1) / lws); 0 when the latent is shorter than one section."""
    return max(latents - 1, 0) // latent_window_size


def sections_in_clip(frames: int, latent_window_size: int) -> int:
    """Whole sections of a clip of `frames` frames; 0 when it is too short for one."""
    return sections_in_latent(latent_frames(frames), latent_window_size)
