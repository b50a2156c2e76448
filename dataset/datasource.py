"""Datasources: the list of media files of one dataset with their captions and control images/videos.

Built from a media directory (captions from `<stem><caption_extension>` files) or a JSONL metadata file (captions
inline). Listing happens at construction; media are only opened when an item is loaded.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
from dataclasses import dataclass

from PIL import Image

from dataset.cache_paths import media_stem
from dataset.media import (
    VIDEO_EXTENSIONS,
    MediaError,
    glob_images,
    glob_videos,
    load_image,
    read_caption,
)

logger = logging.getLogger(__name__)

_CONTROL_KEY = re.compile(r"^control_path_(\d+)$")


@dataclass
class MediaEntry:
    """One media file (or frame directory) of a dataset."""

    path: str
    caption: str | None = None  # JSONL datasets: used verbatim
    caption_path: str | None = None  # directory datasets: read and stripped when needed
    control_paths: list[str] | None = None  # images: N control images in order; videos: one control video

    def read_caption(self) -> str:
        if self.caption is not None:
            return self.caption
        if self.caption_path is None:
            raise MediaError(f"{self.path}: no caption (set caption_extension for directory datasets)")
        return read_caption(self.caption_path)


class Datasource:
    """Entries of one dataset, in listing order."""

    def __init__(self, kind: str, origin: str, entries: list[MediaEntry]):
        self.kind = kind  # "image" or "video"
        self.origin = origin  # the directory or JSONL file the entries come from
        self.entries = entries
        self.has_control = any(e.control_paths for e in entries)
        _check_unique_stems(entries, origin)
        if not entries:
            logger.warning(f"{origin}: no {kind}s found")

    def __len__(self) -> int:
        return len(self.entries)

    def get_caption(self, index: int) -> tuple[str, str]:
        """(item key = media path, caption)."""
        entry = self.entries[index]
        return entry.path, entry.read_caption()

    def check_captions(self) -> None:
        """Fail before any expensive work if a caption cannot be found."""
        missing = [e.caption_path or e.path for e in self.entries if e.caption is None and not _is_file(e.caption_path)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            if self.entries[0].caption_path is None:
                raise MediaError(f"{self.origin}: caption_extension is not set, so no captions can be found")
            raise MediaError(f"{self.origin}: {len(missing)} caption file(s) missing: {shown}")

    def load_image_entry(self, index: int) -> tuple[Image.Image, list[Image.Image] | None]:
        """The RGB target image and its control images (RGBA kept when they have transparency, else RGB)."""
        entry = self.entries[index]
        image = load_image(entry.path)
        controls = [load_image(p, keep_alpha=True) for p in entry.control_paths] if entry.control_paths else None
        return image, controls


def _is_file(path: str | None) -> bool:
    return path is not None and os.path.isfile(path)


def _check_unique_stems(entries: list[MediaEntry], origin: str) -> None:
    """Cache files are named after the media stem, so two media with one stem would overwrite each other's caches."""
    by_stem: dict[str, str] = {}
    for entry in entries:
        stem = media_stem(entry.path)
        if stem in by_stem:
            raise MediaError(
                f"{origin}: {by_stem[stem]} and {entry.path} have the same stem and would share cache files"
            )
        by_stem[stem] = entry.path


def _caption_path(media_path: str, caption_extension: str | None) -> str | None:
    return None if caption_extension is None else os.path.splitext(media_path)[0] + caption_extension


def _require_directory(directory: str, key: str) -> None:
    if not os.path.isdir(directory):
        raise MediaError(f"{key} {directory}: directory not found")


def _require_file(path: str, key: str) -> None:
    if not os.path.isfile(path):
        raise MediaError(f"{key} {path}: file not found")


def _image_controls(image_stem: str, control_directory: str, candidates: list[str]) -> list[str]:
    """Control images of one image, ordered: `<stem>.<ext>` first, then `<stem>_<digits>.<ext>` by number.

    Files named `<stem>_<non-digits>.<ext>` are refused; files whose stem merely starts with the image stem (image
    `a1`, file `a10.png`) belong to another image and are ignored.
    """
    exact, numbered = [], []
    for path in candidates:
        stem = media_stem(path)
        if stem == image_stem:
            exact.append(path)
        elif stem.startswith(image_stem + "_"):
            suffix = stem[len(image_stem) + 1 :]
            if not suffix.isdigit():
                raise MediaError(
                    f"{path}: invalid digits suffix for a control image of '{image_stem}' "
                    f"(expected {image_stem}.<ext> or {image_stem}_<digits>.<ext>)"
                )
            numbered.append((int(suffix), path))
    if len(exact) > 1:
        raise MediaError(f"{control_directory}: several control images named {image_stem}.*: {exact}")
    return exact + [path for _, path in sorted(numbered)]


def image_directory_source(
    image_directory: str, caption_extension: str | None, control_directory: str | None = None, control_count: int = 1
) -> Datasource:
    """Images of a directory; with `control_directory`, each image takes its first `control_count` controls."""
    _require_directory(image_directory, "image_directory")
    paths = glob_images(image_directory)
    controls: dict[str, list[str]] = {}
    if control_directory is not None:
        _require_directory(control_directory, "control_directory")
        by_stem = sorted((media_stem(p), p) for p in glob_images(control_directory))
        stems = [stem for stem, _ in by_stem]
        problems = []
        for path in paths:
            stem = media_stem(path)
            # control stems starting with the image stem are contiguous in sorted order
            first = bisect.bisect_left(stems, stem)
            last = first
            while last < len(stems) and stems[last].startswith(stem):
                last += 1
            found = _image_controls(stem, control_directory, [p for _, p in by_stem[first:last]])
            if len(found) < control_count:
                problems.append(f"{os.path.basename(path)} ({len(found)} found)")
            controls[path] = found[:control_count]
        if problems:
            raise MediaError(
                f"control_directory {control_directory}: fewer than {control_count} control image(s) for: "
                + ", ".join(problems)
            )
    entries = [
        MediaEntry(p, caption_path=_caption_path(p, caption_extension), control_paths=controls.get(p)) for p in paths
    ]
    logger.info(f"{image_directory}: {len(entries)} images" + (" with control images" if controls else ""))
    return Datasource("image", image_directory, entries)


def _read_jsonl(jsonl_file: str, key: str) -> list[tuple[int, dict]]:
    _require_file(jsonl_file, key)
    rows = []
    with open(jsonl_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                logger.error(f"{jsonl_file}:{number}: {line.rstrip()}")
                raise MediaError(f"{jsonl_file}:{number}: invalid JSON ({e})") from e
            if not isinstance(row, dict):
                raise MediaError(f"{jsonl_file}:{number}: expected a JSON object")
            rows.append((number, row))
    return rows


def _require_string(row: dict, key: str, where: str) -> str:
    if not isinstance(row.get(key), str):
        raise MediaError(f"{where}: '{key}' (string) is required")
    return row[key]


def _jsonl_image_controls(row: dict, where: str) -> list[str]:
    """`control_path` or numbered `control_path_<n>` (any zero padding), ordered by number."""
    numbered = []
    for key, value in row.items():
        match = _CONTROL_KEY.match(key)
        if key == "control_path" or match:
            if not isinstance(value, str):
                raise MediaError(f"{where}: '{key}' must be a string")
            numbered.append((0 if key == "control_path" else int(match.group(1)), key, value))
    numbers = [n for n, _, _ in numbered]
    if len(set(numbers)) != len(numbers):
        raise MediaError(f"{where}: control paths with the same number: {sorted(k for _, k, _ in numbered)}")
    return [value for _, _, value in sorted(numbered)]


def image_jsonl_source(image_jsonl_file: str, control_count: int = 1) -> Datasource:
    """Images listed in a JSONL file: `image_path`, `caption`, optional `control_path` / `control_path_<n>`.

    musubi-tuner fails on every image JSONL file at 1c0edc5 (a broken sort call); this is the intended reading.
    """
    entries = []
    for number, row in _read_jsonl(image_jsonl_file, "image_jsonl_file"):
        where = f"{image_jsonl_file}:{number}"
        path = _require_string(row, "image_path", where)
        caption = _require_string(row, "caption", where)
        entries.append(MediaEntry(path, caption=caption, control_paths=_jsonl_image_controls(row, where) or None))
    if any(e.control_paths for e in entries):
        short = [os.path.basename(e.path) for e in entries if len(e.control_paths or []) < control_count]
        if short:
            raise MediaError(f"{image_jsonl_file}: fewer than {control_count} control path(s) for: {', '.join(short)}")
        for entry in entries:
            entry.control_paths = entry.control_paths[:control_count]
    logger.info(f"{image_jsonl_file}: {len(entries)} images")
    return Datasource("image", image_jsonl_file, entries)


def _video_control(video_path: str, control_directory: str) -> str | None:
    """`<control>/<name>.<ext>`, else a frame directory `<control>/<name>`, else `<control>/<name><any video ext>`."""
    name = os.path.basename(video_path)
    stem = os.path.splitext(name)[0]
    same = os.path.join(control_directory, name)
    if os.path.exists(same):
        return same
    frames_dir = os.path.join(control_directory, stem)
    if os.path.isdir(frames_dir):
        return frames_dir
    for ext in VIDEO_EXTENSIONS:
        candidate = os.path.join(control_directory, stem + ext)
        if os.path.exists(candidate):
            return candidate
    return None


def video_directory_source(
    video_directory: str, caption_extension: str | None, control_directory: str | None = None
) -> Datasource:
    _require_directory(video_directory, "video_directory")
    paths = glob_videos(video_directory)
    controls: dict[str, str | None] = {}
    if control_directory is not None:
        _require_directory(control_directory, "control_directory")
        controls = {p: _video_control(p, control_directory) for p in paths}
        missing = [os.path.basename(p) for p, c in controls.items() if c is None]
        if missing:
            raise MediaError(f"control_directory {control_directory}: no control video for: {', '.join(missing)}")
    entries = [
        MediaEntry(
            p, caption_path=_caption_path(p, caption_extension), control_paths=[controls[p]] if controls else None
        )
        for p in paths
    ]
    logger.info(f"{video_directory}: {len(entries)} videos")
    return Datasource("video", video_directory, entries)


def video_jsonl_source(video_jsonl_file: str) -> Datasource:
    """Videos (files or frame directories) listed in a JSONL file: `video_path`, `caption`, optional `control_path`."""
    entries = []
    for number, row in _read_jsonl(video_jsonl_file, "video_jsonl_file"):
        where = f"{video_jsonl_file}:{number}"
        path = _require_string(row, "video_path", where)
        caption = _require_string(row, "caption", where)
        control = _require_string(row, "control_path", where) if "control_path" in row else None
        entries.append(MediaEntry(path, caption=caption, control_paths=[control] if control else None))
    without = [os.path.basename(e.path) for e in entries if not e.control_paths]
    if len(without) not in (0, len(entries)):
        raise MediaError(f"{video_jsonl_file}: some videos have control_path and these do not: {', '.join(without)}")
    logger.info(f"{video_jsonl_file}: {len(entries)} videos")
    return Datasource("video", video_jsonl_file, entries)
