"""`--debug_mode` of the latent caching script: look at what would be cached instead of encoding it.

musubi-tuner opens OpenCV windows (`image`) or waits for key presses (`console`). This project never blocks:
- `image`: writes PNG files next to each would-be cache path: `<cache name>_debug.png` for an image (plus
  `_debug_control<i>.png` per control image), `_debug_first.png` and `_debug_last.png` for a video crop;
- `console`: prints an ASCII rendering `--console_width` characters wide (at most `--console_num_images` items per
  dataset when given); `--console_back` is accepted and ignored, as in musubi-tuner;
- `video`: writes `<cache name>.jpg` for an image and `<cache name>.mp4` for a video crop (H.264, yuv420p,
  1 Mbit/s, 16 fps), as musubi-tuner does.
Every batch is summarised in the log (bucket key, item count, items).
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction

import av
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEBUG_MODES = ("image", "console", "video")
DEBUG_VIDEO_FPS = 16
DEBUG_VIDEO_BIT_RATE = 1_000_000
ASCII_RAMP = " .:-=+*#%@"
CHARACTER_ASPECT = 0.5  # a terminal cell is about twice as high as it is wide


def ascii_art(image: np.ndarray, width: int) -> str:
    """(H, W, C) uint8 → lines of characters, darker pixels as sparser characters."""
    gray = Image.fromarray(np.ascontiguousarray(image[..., :3])).convert("L")
    height = max(1, round(gray.height / gray.width * width * CHARACTER_ASPECT))
    levels = np.asarray(gray.resize((width, height), Image.BILINEAR), dtype=np.int32)
    ramp = np.array(list(ASCII_RAMP))
    return "\n".join("".join(row) for row in ramp[levels * (len(ASCII_RAMP) - 1) // 255])


def write_debug_video(frames: np.ndarray, path: str, fps: int = DEBUG_VIDEO_FPS) -> None:
    """(F, H, W, 3) uint8 → H.264 mp4; odd sizes are cropped by one pixel (yuv420p needs even sides)."""
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2, :3]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt, stream.bit_rate = "yuv420p", DEBUG_VIDEO_BIT_RATE
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _save_png(image: np.ndarray, path: str) -> None:
    Image.fromarray(np.ascontiguousarray(image)).save(path)


def show_item(item, mode: str, console_width: int) -> None:
    """Show one caching item (see the module docstring for what each mode writes or prints)."""
    base = os.path.splitext(item.latent_cache_path)[0]
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    is_video = item.content.ndim == 4
    if mode == "image":
        if is_video:
            _save_png(item.content[0], f"{base}_debug_first.png")
            _save_png(item.content[-1], f"{base}_debug_last.png")
        else:
            _save_png(item.content, f"{base}_debug.png")
            for i, control in enumerate(item.control_content or []):
                _save_png(control, f"{base}_debug_control{i}.png")
    elif mode == "console":
        print(f"{item.item_key} {item.original_size}")
        print(ascii_art(item.content[0] if is_video else item.content, console_width))
    elif is_video:
        write_debug_video(item.content, f"{base}.mp4")
    else:
        Image.fromarray(np.ascontiguousarray(item.content[..., :3])).save(f"{base}.jpg")


def show_datasets(
    datasets,
    mode: str,
    num_workers: int,
    console_width: int = 80,
    console_back: str | None = None,
    console_num_images: int | None = None,
) -> None:
    """Iterate every dataset's caching batches and show each item instead of encoding it."""
    if mode not in DEBUG_MODES:
        raise ValueError(f"--debug_mode must be one of {', '.join(DEBUG_MODES)}, got {mode!r}")
    if console_back is not None:
        logger.info("--console_back is ignored (as in musubi-tuner)")
    for index, dataset in enumerate(datasets):
        logger.info(f"[Dataset {index}] debug mode {mode}")
        shown = 0
        for bucket_key, batch in dataset.retrieve_latent_cache_batches(num_workers):
            logger.info(f"bucket {bucket_key}: {len(batch)} item(s): {', '.join(i.item_key for i in batch)}")
            for item in batch:
                if mode == "console" and console_num_images is not None and shown >= console_num_images:
                    break
                show_item(item, mode, console_width)
                shown += 1
