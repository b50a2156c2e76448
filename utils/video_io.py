"""Writing decoded frames: H.264 mp4 (with the settings as container metadata) and PNG sequences."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from utils.temporary_files import temporary_path

VIDEO_CODEC = "libx264"
VIDEO_PIX_FMT = "yuv420p"
VIDEO_BIT_RATE = 4_000_000
METADATA_KEY = "comment"  # mp4 tag that ffprobe and most players show; holds the settings as JSON
PNG_METADATA_KEY = "parameters"  # PNG text chunk holding the settings as JSON


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """Decoded (C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8, as musubi-tuner: (x+1)/2, clamp, ×255, truncate.

    The arithmetic stays in the decoded dtype (fp16 for musubi-tuner VAE) so pixel values match it exactly.
    """
    x = ((pixels + 1) / 2).clamp(0, 1) * 255
    return x.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def _atomic_path(path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return temporary_path(path, keep_extension=True)  # av and PIL choose the format by the extension


def save_video(frames: np.ndarray, path: str, fps: int, metadata: dict | None = None) -> str:
    """frames: (T, H, W, 3) uint8 -> H.264 mp4 at `fps`, 4 Mbit/s, yuv420p; metadata stored as JSON text."""
    tmp = _atomic_path(path)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            if metadata:
                container.metadata[METADATA_KEY] = json.dumps(metadata, ensure_ascii=False)
                if "prompt" in metadata:
                    container.metadata["description"] = str(metadata["prompt"])
            stream = container.add_stream(VIDEO_CODEC, rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = VIDEO_PIX_FMT
            stream.bit_rate = VIDEO_BIT_RATE
            for index, frame in enumerate(frames):
                video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                video_frame.pts = index
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_video_metadata(path: str) -> dict:
    with av.open(path) as container:
        text = container.metadata.get(METADATA_KEY)
    return json.loads(text) if text else {}


def read_png_metadata(path: str) -> dict:
    """The settings `save_images` stored in a PNG's text chunk ({} when none)."""
    with Image.open(path) as image:
        text = image.text.get(PNG_METADATA_KEY) if hasattr(image, "text") else None
    return json.loads(text) if text else {}


def read_video_frames(path: str) -> np.ndarray:
    """All frames of a video as (T, H, W, 3) uint8 RGB."""
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def save_images(frames: np.ndarray, folder: str, name: str, metadata: dict | None = None) -> list[str]:
    """`{folder}/{name}_{i:03d}.png` per frame; settings as a PNG text chunk when given."""
    os.makedirs(folder, exist_ok=True)
    info = None
    if metadata:
        info = PngInfo()
        info.add_text(PNG_METADATA_KEY, json.dumps(metadata, ensure_ascii=False))
    paths = []
    for i, frame in enumerate(frames):
        path = os.path.join(folder, f"{name}_{i:03d}.png")
        tmp = _atomic_path(path)
        Image.fromarray(frame).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
        paths.append(path)
    return paths
