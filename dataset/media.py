"""Reading media: directory listings, images, videos (PyAV) or frame directories, captions and masks.

Every failure to read a file raises `MediaError` naming the file; nothing is skipped silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import closing

import av
import numpy as np
from PIL import Image

from dataset.buckets import BucketSelector, resize_image_to_bucket
from utils.cli import UserError

logger = logging.getLogger(__name__)


def _optional_image_extensions() -> list[str]:
    """AVIF and JPEG-XL are listed only when a Pillow plugin for them imports."""
    extensions = []
    try:
        import pillow_avif  # noqa: F401

        extensions += [".avif", ".AVIF"]
    except ImportError:
        pass
    for plugin in ("jxlpy", "pillow_jxl"):
        try:
            __import__(plugin)
        except ImportError:
            continue
        extensions += [".jxl", ".JXL"]
        break
    return extensions


_IMAGE_BASE = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
_VIDEO_BASE = [".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg"]
# exact suffixes (lower- and upper-case spellings only, as musubi-tuner globs them)
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(_IMAGE_BASE + [e.upper() for e in _IMAGE_BASE] + _optional_image_extensions())
VIDEO_EXTENSIONS: tuple[str, ...] = tuple(_VIDEO_BASE + [e.upper() for e in _VIDEO_BASE])


class MediaError(UserError, ValueError):
    """A media, caption or metadata file is missing or cannot be read."""


def _list_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
    """Non-recursive, non-hidden files of `directory` ending in one of `extensions`, sorted by full path."""
    if not os.path.isdir(directory):
        raise MediaError(f"{directory}: directory not found")
    paths = {
        os.path.join(directory, entry.name)
        for entry in os.scandir(directory)
        if not entry.name.startswith(".") and entry.name.endswith(extensions)
    }
    return sorted(paths)


def glob_images(directory: str) -> list[str]:
    return _list_files(directory, IMAGE_EXTENSIONS)


def glob_videos(directory: str) -> list[str]:
    return _list_files(directory, VIDEO_EXTENSIONS)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_image(path: str, keep_alpha: bool = False) -> Image.Image:
    """Open and fully decode an image as RGB, or as RGBA when `keep_alpha` and the image has transparency."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = "RGBA" if keep_alpha and has_alpha(image) else "RGB"
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{path}: cannot read image ({e})") from e


def read_caption(path: str) -> str:
    """Caption file contents, UTF-8, with surrounding whitespace stripped (inner newlines kept)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: cannot read caption file ({e})") from e


def latent_mask(mask: Image.Image | np.ndarray, latent_size: tuple[int, int]) -> np.ndarray:
    """A mask image (or an alpha channel) as a float32 (h, w) array in [0, 1] at latent size (w, h).

    Converted to grayscale, resized directly (no crop) with LANCZOS, divided by 255: 255 keeps a latent, 0 zeroes it.
    """
    image = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))
    image = image.convert("L").resize(tuple(latent_size), Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def fps_target_indices(source_fps: float | None, target_fps: float | None) -> Iterator[int | None]:
    """For each source frame in turn: its frame index after conversion to `target_fps`, or None when dropped.

    A running fractional index starts at 0.0 and grows by target_fps/source_fps per source frame; a frame whose
    floor equals the previously accepted index is dropped. The float accumulation is musubi-tuner's, kept as is.
    Without both rates every frame is kept with its own index.
    """
    index = 0
    if source_fps is None or target_fps is None:
        while True:
            yield index
            index += 1
    step = target_fps / source_fps
    position = 0.0
    previous = -1
    while True:
        index = int(position)
        position += step
        if index == previous:
            yield None
        else:
            previous = index
            yield index


def _decoded_frames(path: str) -> Iterator[Image.Image | np.ndarray]:
    """Frames of a video file (first video stream, RGB arrays) or of a directory of images (sorted, RGB)."""
    if os.path.isdir(path):
        for image_path in glob_images(path):
            yield load_image(image_path)
        return
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise MediaError(f"{path}: cannot open video ({e})") from e
    try:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode video ({e})") from e
    finally:
        container.close()


def load_video(
    path: str,
    start_frame: int | None = None,
    end_frame: int | None = None,
    bucket_selector: BucketSelector | None = None,
    bucket_reso: tuple[int, int] | None = None,
    source_fps: float | None = None,
    target_fps: float | None = None,
) -> list[np.ndarray]:
    """Decode frames [start_frame, end_frame) of a video file or frame directory as uint8 RGB arrays.

    Frame numbers are counted after fps conversion (see `fps_target_indices`). When `bucket_selector` is given
    and `bucket_reso` is not, the bucket is chosen from the first kept frame; every frame is resized to the bucket.
    """
    if not os.path.exists(path):
        raise MediaError(f"{path}: video not found")
    frames: list[np.ndarray] = []
    indices = fps_target_indices(source_fps, target_fps)
    with closing(_decoded_frames(path)) as decoded:
        for frame in decoded:
            index = next(indices)
            if index is None or (start_frame is not None and index < start_frame):
                continue
            if end_frame is not None and index >= end_frame:
                break
            if bucket_selector is not None and bucket_reso is None:
                size = frame.size if isinstance(frame, Image.Image) else (frame.shape[1], frame.shape[0])
                bucket_reso = bucket_selector.get_bucket_resolution(size)
            if bucket_reso is not None:
                frames.append(resize_image_to_bucket(frame, bucket_reso))
            else:
                frames.append(np.asarray(frame))
    if not frames:
        raise MediaError(f"{path}: no frames decoded (start {start_frame}, end {end_frame})")
    return frames
