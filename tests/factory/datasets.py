"""Tiny on-disk datasets for tests: videos with their frame numbers painted in, images, captions, control images,
masks, JSONL metadata and dataset configs. Deterministic for a given seed; every function returns the paths.

Frame i of a factory video is a flat gray frame of level `frame_level(i)`; `frame_number(frame)` reads it back
after lossy encoding and resizing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.factory.dims import CLIP_HIDDEN, LLAMA_HIDDEN, SIGLIP_HIDDEN

FRAME_SIZE = (48, 32)  # (W, H) of factory videos
_LEVEL_BASE, _LEVEL_STEP = 16, 5
MAX_PAINTED_FRAMES = (255 - _LEVEL_BASE) // _LEVEL_STEP + 1  # frames whose numbers stay readable


def frame_level(index: int) -> int:
    if not 0 <= index < MAX_PAINTED_FRAMES:
        raise ValueError(f"frame {index} cannot be painted (at most {MAX_PAINTED_FRAMES} frames)")
    return _LEVEL_BASE + _LEVEL_STEP * index


def frame_number(frame: np.ndarray) -> int:
    """Frame number painted into a decoded (H, W, 3) frame."""
    return int(round((float(np.asarray(frame, dtype=np.float64).mean()) - _LEVEL_BASE) / _LEVEL_STEP))


def frame_numbers(frames) -> list[int]:
    return [frame_number(f) for f in frames]


def write_video(path: Path, num_frames: int, size: tuple[int, int] = FRAME_SIZE, fps: int = 30) -> Path:
    """H.264 clip (libx264, near-lossless) of `num_frames` painted frames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(num_frames):
            pixels = np.full((height, width, 3), frame_level(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_directory(directory: Path, num_frames: int, size: tuple[int, int] = FRAME_SIZE) -> Path:
    """A video stored as a directory of PNG frames `frame_0000.png`, ..."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width, height = size
    for i in range(num_frames):
        Image.new("RGB", (width, height), (frame_level(i),) * 3).save(directory / f"frame_{i:04d}.png")
    return directory


def write_broken_file(path: Path, seed: int = 0) -> Path:
    """Random bytes under a media file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return path


def image_pixels(size: tuple[int, int], seed: int, channels: int = 3) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def write_image(path: Path, size: tuple[int, int], seed: int = 0, alpha: bool = False) -> Path:
    """Seeded random RGB image, or RGBA with a left-opaque / right-transparent alpha channel."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image_pixels(size, seed)
    if alpha:
        mask = np.zeros(pixels.shape[:2], dtype=np.uint8)
        mask[:, : size[0] // 2] = 255
        Image.fromarray(np.dstack([pixels, mask]), "RGBA").save(path)
    else:
        Image.fromarray(pixels, "RGB").save(path)
    return path


def write_mask(path: Path, size: tuple[int, int]) -> Path:
    """Grayscale mask: top half white (keep), bottom half black."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2] = 255
    Image.fromarray(mask, "L").save(path)
    return path


def caption_for(stem: str) -> str:
    return f"a test clip named {stem}"


@dataclass
class VideoFiles:
    directory: Path
    videos: list[Path]
    lengths: dict[str, int]  # stem -> frame count
    captions: dict[str, str]  # stem -> caption (as written, stripped on reading)


def make_video_dataset(
    root: Path,
    lengths: tuple[int, ...] = (9, 40),
    size: tuple[int, int] = FRAME_SIZE,
    fps: int = 30,
    caption_extension: str | None = ".txt",
    name: str = "videos",
) -> VideoFiles:
    """`<root>/<name>/clip_<k>.mp4` with the given frame counts and `clip_<k><caption_extension>` captions."""
    directory = Path(root) / name
    files = VideoFiles(directory, [], {}, {})
    for k, length in enumerate(lengths):
        stem = f"clip_{k}"
        files.videos.append(write_video(directory / f"{stem}.mp4", length, size, fps))
        files.lengths[stem] = length
        files.captions[stem] = caption_for(stem)
        if caption_extension is not None:
            (directory / f"{stem}{caption_extension}").write_text(f"  {caption_for(stem)}\n", encoding="utf-8")
    return files


@dataclass
class ImageFiles:
    directory: Path
    images: list[Path]
    captions: dict[str, str]
    control_directory: Path | None = None
    controls: dict[str, list[Path]] = field(default_factory=dict)  # stem -> control images in order
    mask_directory: Path | None = None
    masks: dict[str, Path] = field(default_factory=dict)


def make_image_dataset(
    root: Path,
    sizes: tuple[tuple[int, int], ...] = ((48, 32), (32, 48), (40, 40)),
    caption_extension: str | None = ".txt",
    controls_per_image: int = 0,
    control_alpha: bool = False,
    masks: bool = False,
    seed: int = 0,
    name: str = "images",
) -> ImageFiles:
    """`<root>/<name>/img_<k>.png` with captions; controls in `<root>/<name>_control` named `img_<k>.png` (one)
    or `img_<k>_0.png`, `img_<k>_1.png`, ... (several); masks in `<root>/<name>_mask/img_<k>.png`."""
    root = Path(root)
    directory = root / name
    files = ImageFiles(directory, [], {})
    if controls_per_image:
        files.control_directory = root / f"{name}_control"
    if masks:
        files.mask_directory = root / f"{name}_mask"
    for k, size in enumerate(sizes):
        stem = f"img_{k}"
        files.images.append(write_image(directory / f"{stem}.png", size, seed * 1000 + k))
        files.captions[stem] = caption_for(stem)
        if caption_extension is not None:
            (directory / f"{stem}{caption_extension}").write_text(caption_for(stem), encoding="utf-8")
        if controls_per_image:
            names = [f"{stem}_{j}.png" for j in range(controls_per_image)]
            if controls_per_image == 1:
                names = [f"{stem}.png"]
            files.controls[stem] = [
                write_image(files.control_directory / n, size, seed * 1000 + 100 + 10 * k + j, alpha=control_alpha)
                for j, n in enumerate(names)
            ]
        if masks:
            files.masks[stem] = write_mask(files.mask_directory / f"{stem}.png", size)
    return files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_value(key)


def _toml_value(value) -> str:
    """A TOML value: booleans, integers, floats (inf, nan), strings, arrays and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):  # JSON string escapes are TOML's, except DEL, which TOML wants escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_text(config: dict) -> str:
    """A TOML document of ``config``: top-level values, then tables (``[name]``), then arrays of tables
    (``[[name]]``, lists whose items are all tables); deeper tables are written inline."""
    lines, tables, arrays = [], [], []
    for key, value in config.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{_toml_key(key)}]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())]
    for key, items in arrays:
        for table in items:
            lines += ["", f"[[{_toml_key(key)}]]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def write_config(
    path: Path, datasets: list[dict], general: dict | None = None, validation: list[dict] | None = None
) -> Path:
    """Dataset config as TOML (`.toml`) or JSON (`.json`); Path values are written as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def plain(table: dict) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in table.items()}

    config = {"datasets": [plain(d) for d in datasets]}
    if validation is not None:
        config["validation_datasets"] = [plain(d) for d in validation]
    if general is not None:
        config = {"general": plain(general), **config}
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    else:
        path.write_text(toml_text(config), encoding="utf-8")
    return path


def write_fake_latent_cache(path: Path, frames: int = 9, height: int = 4, width: int = 6, seed: int = 0) -> Path:
    """A video-section latent cache with the real key names and tiny shapes (C = 16, SigLIP width from dims)."""
    g = torch.Generator().manual_seed(seed)
    suffix = f"{frames}x{height}x{width}_float16"

    def latents(n: int) -> torch.Tensor:
        return torch.randn((16, n, height, width), generator=g).half()

    tensors = {
        f"latents_{suffix}": latents(frames),
        f"latents_clean_{suffix}": latents(2),
        f"latents_clean_2x_{suffix}": latents(2),
        f"latents_clean_4x_{suffix}": latents(16),
        "latent_indices_int64": torch.arange(1, 1 + frames),
        "clean_latent_indices_int64": torch.tensor([0, 1 + frames]),
        "clean_latent_2x_indices_int64": torch.tensor([2 + frames, 3 + frames]),
        "clean_latent_4x_indices_int64": torch.arange(4 + frames, 20 + frames),
        "image_embeddings_float16": torch.randn((729, SIGLIP_HIDDEN), generator=g).half(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"architecture": "framepack", "format_version": "1.0.1"})
    return path


def write_fake_text_cache(path: Path, seed: int = 0) -> Path:
    """A text-encoder cache with the real key names and tiny widths (from dims)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(512, dtype=torch.bool)
    mask[:7] = True
    tensors = {
        "llama_vec_float16": torch.randn((512, LLAMA_HIDDEN), generator=g).half() * mask[:, None],
        "llama_attention_mask": mask,
        "clip_l_pooler_float16": torch.randn((CLIP_HIDDEN,), generator=g).half(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"architecture": "framepack", "caption1": "x", "format_version": "1.0.1"})
    return path


START_IMAGE_COLORS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def write_start_image(path: Path, index: int = 0) -> str:
    """A 60x40 start image: a flat colour with a white square whose position depends on `index` (0..2)."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[:] = START_IMAGE_COLORS[index]
    img[10:30, 20 + 5 * index : 40 + 5 * index] = 255
    Image.fromarray(img).save(path)
    return str(path)
