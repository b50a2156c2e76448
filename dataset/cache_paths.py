"""Cache file names, their parsing, their safetensors metadata, and the section count that decides them.

Names (sizes zero-padded to 4 digits, `<stem>` = media file name without directory and extension):
  image latent (one-frame)   <cache_dir>/<stem>_<W>x<H>_fp.safetensors                     W×H = original size
  video section latent       <cache_dir>/<stem>_<start:05d>-<frames:03d>-<section:04d>_<W>x<H>_fp.safetensors
                             W×H = bucketed frame size, frames = crop length before trimming to whole sections
  text encoder output        <cache_dir>/<stem>_fp_te.safetensors                          one per media file
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from hunyuan_model.frame_math import pixel_frames, sections_in_clip

ARCHITECTURE = "fp"  # short name used in cache file names
ARCHITECTURE_FULL = "framepack"  # `architecture` value in cache metadata
CACHE_FORMAT_VERSION = "1.0.1"
LATENT_CACHE_SUFFIX = f"_{ARCHITECTURE}.safetensors"
TEXT_ENCODER_CACHE_SUFFIX = f"_{ARCHITECTURE}_te.safetensors"


def media_stem(item_key: str) -> str:
    """File name of `item_key` without directory and extension."""
    return os.path.splitext(os.path.basename(item_key))[0]


def video_crop_item_key(video_path: str, start: int, length: int) -> str:
    """Item key of a crop: the video path with `_<start:05d>-<length:03d>` inserted before the extension."""
    body, ext = os.path.splitext(video_path)
    return f"{body}_{start:05d}-{length:03d}{ext}"


def _require_cache_directory(cache_directory: str | None) -> str:
    if cache_directory is None:
        raise ValueError("cache_directory is required (JSONL datasets have no media directory to default to)")
    return cache_directory


def latent_cache_path(cache_directory: str, item_key: str, size: tuple[int, int]) -> str:
    """Latent cache path of an image item (size = original size) or a video crop (size = bucketed frame size)."""
    width, height = size
    name = f"{media_stem(item_key)}_{width:04d}x{height:04d}{LATENT_CACHE_SUFFIX}"
    return os.path.join(_require_cache_directory(cache_directory), name)


def section_cache_path(latent_path: str, section: int) -> str:
    """Insert `-<section:04d>` after the `<start>-<frames>` token (the third `_`-separated token from the end)."""
    tokens = latent_path.split("_")
    tokens[-3] = f"{tokens[-3]}-{section:04d}"
    return "_".join(tokens)


def text_encoder_cache_path(cache_directory: str, item_key: str) -> str:
    return os.path.join(_require_cache_directory(cache_directory), f"{media_stem(item_key)}{TEXT_ENCODER_CACHE_SUFFIX}")


def list_latent_cache_files(cache_directory: str) -> list[str]:
    """Every `*_fp.safetensors` in the directory (never matches the `_fp_te` files), sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(cache_directory), f"*{LATENT_CACHE_SUFFIX}")))


def list_text_encoder_cache_files(cache_directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(cache_directory), f"*{TEXT_ENCODER_CACHE_SUFFIX}")))


@dataclass(frozen=True)
class LatentCacheName:
    """What a latent cache file name says. `start`, `frame_count`, `section` are None for image caches."""

    item_key: str  # media stem (images) or media stem without the crop token (videos)
    size: tuple[int, int]
    start: int | None = None
    frame_count: int | None = None
    section: int | None = None


def parse_latent_cache_name(path: str, is_video: bool) -> LatentCacheName:
    """Split a latent cache file name back into item key, size and (videos) start, frame count, section."""
    name = os.path.basename(path)
    tokens = name[: -len(LATENT_CACHE_SUFFIX)].split("_") if name.endswith(LATENT_CACHE_SUFFIX) else []
    try:
        width, height = (int(v) for v in tokens[-1].split("x"))
        if not is_video:
            if len(tokens) < 2:
                raise ValueError
            return LatentCacheName("_".join(tokens[:-1]), (width, height))
        if len(tokens) < 3:
            raise ValueError
        crop = [int(v) for v in tokens[-2].split("-")]
        if len(crop) not in (2, 3):
            raise ValueError
        section = crop[2] if len(crop) == 3 else None
        return LatentCacheName("_".join(tokens[:-2]), (width, height), crop[0], crop[1], section)
    except (ValueError, IndexError):
        kind = "<stem>_<start>-<frames>[-<section>]_<W>x<H>" if is_video else "<stem>_<W>x<H>"
        what = "video" if is_video else "image"
        raise ValueError(f"{path}: not a {what} latent cache name ({kind}{LATENT_CACHE_SUFFIX})") from None


def section_count(frames: int, latent_window_size: int) -> int:
    """Whole sections of `latent_window_size` latent frames after the first latent frame; 0 if the clip is too short."""
    return sections_in_clip(frames, latent_window_size)


def min_section_frames(latent_window_size: int) -> int:
    """Fewest pixel frames that give one section: lws·4 + 1 (37 for lws 9)."""
    return pixel_frames(1 + latent_window_size)


def aligned_frame_count(frames: int, latent_window_size: int) -> int:
    """Pixel frames kept after trimming the clip to whole sections: sections·lws·4 + 1."""
    return pixel_frames(1 + section_count(frames, latent_window_size) * latent_window_size)


def video_section_cache_paths(latent_path: str, frames: int, latent_window_size: int) -> list[str]:
    """Expected section files of a video crop; at least one even when the clip is too short (caching then fails)."""
    return [section_cache_path(latent_path, k) for k in range(max(1, section_count(frames, latent_window_size)))]


def latent_cache_metadata(size: tuple[int, int], frame_count: int | None = None) -> dict[str, str]:
    """safetensors metadata of a latent file; `frame_count` (crop length) only for video items."""
    metadata = {
        "architecture": ARCHITECTURE_FULL,
        "width": f"{size[0]}",
        "height": f"{size[1]}",
        "format_version": CACHE_FORMAT_VERSION,
    }
    if frame_count is not None:
        metadata["frame_count"] = f"{frame_count}"
    return metadata


def text_encoder_cache_metadata(caption: str) -> dict[str, str]:
    return {"architecture": ARCHITECTURE_FULL, "caption1": caption, "format_version": CACHE_FORMAT_VERSION}
