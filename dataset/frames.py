"""Which frame ranges of a decoded video become training items (`target_frames`, `frame_extraction`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from hunyuan_model.frame_math import round_to_4n_plus_1

logger = logging.getLogger(__name__)

FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")
TARGET_FPS = 30.0  # FramePack's frame rate; `source_fps` converts to it


def round_target_frames(target_frames: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated `target_frames`, each rounded down to 4n+1 (warns if anything changed).

    musubi-tuner does not de-duplicate after rounding, so [25, 26] gave two identical crops writing the same
    cache file; here the rounded list is de-duplicated too.
    """
    requested = sorted(set(target_frames))
    rounded = tuple(sorted({round_to_4n_plus_1(f) for f in requested}))
    if list(rounded) != requested:
        logger.warning(f"target_frames {requested} rounded to the 4n+1 values {list(rounded)}")
    return rounded


def frame_crops(
    frame_count: int,
    target_frames: Iterable[int],
    frame_extraction: str,
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
) -> list[tuple[int, int]]:
    """(start, length) crops of a video of `frame_count` frames, in musubi-tuner's order.

    head: (0, T) per target T; chunk: consecutive non-overlapping T-frame pieces; slide: starts every
    `frame_stride` frames; uniform: `frame_sample` starts spread evenly (truncated linspace); full: one crop of
    min(frame_count, max_frames) rounded down to 4n+1. Targets longer than the video give no crop. Repeated
    uniform starts (more samples than positions) are kept once: they would be the same item and cache file.
    """
    if frame_extraction not in FRAME_EXTRACTION_MODES:
        raise ValueError(f"frame_extraction {frame_extraction!r} is not supported; use one of {FRAME_EXTRACTION_MODES}")
    crops: list[tuple[int, int]] = []
    if frame_extraction == "full":
        crops.append((0, round_to_4n_plus_1(min(frame_count, max_frames))))
        return crops
    for target in target_frames:
        if target > frame_count:
            continue
        if frame_extraction == "head":
            crops.append((0, target))
        elif frame_extraction == "chunk":
            crops.extend((start, target) for start in range(0, frame_count - target + 1, target))
        elif frame_extraction == "slide":
            crops.extend((start, target) for start in range(0, frame_count - target + 1, frame_stride))
        else:  # uniform
            starts = np.linspace(0, frame_count - target, frame_sample, dtype=int)
            crops.extend((int(start), target) for start in dict.fromkeys(starts.tolist()))
    return crops
