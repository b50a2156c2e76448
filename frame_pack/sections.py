"""Section planning for FramePack: the one place that decides how a video is cut into sections.

Generation, latent caching and training sampling all import this module, so a model trained on cached sections sees
exactly the index/clean-latent layout that generation feeds it.

Vocabulary (lws = latent window size, default 9; latents are (B, 16, T, h, w)):

* A video of N sections has lws*N + 1 latent frames: frame 0 is the start image, section k fills frames
  [1 + k*lws, 1 + (k+1)*lws).
* The *history* is the buffer of already-known latents the next section is conditioned on. Inverted anti-drifting
  (default) generates the last section first and *prepends*; its history is [later frames..., end slot, zeros] and
  the first 19 frames give post/2x/4x. F1 generates forward and *appends*; its history is [zeros, start, earlier
  frames...] and the last 19 frames give 4x/2x/1x.
* Caching knows the whole video latent and rebuilds, for each section, the very history generation would hold at
  that point (``history_for_section``), so both paths use ``clean_latents_from_history``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from hunyuan_model.frame_math import (
    LATENT_CHANNELS,
    TEMPORAL_COMPRESSION,
    latent_frames,
    pixel_frames,
    sections_in_latent,
)
from utils.cli import UsageError

logger = logging.getLogger(__name__)

SECTION_COUNT_FPS = 30  # musubi-tuner converts seconds to sections at 30 fps whatever --fps says
CLEAN_1X_FRAMES = 1  # clean latent "post" (inverted) / "1x" (F1)
CLEAN_2X_FRAMES = 2
CLEAN_4X_FRAMES = 16
HISTORY_FRAMES = CLEAN_1X_FRAMES + CLEAN_2X_FRAMES + CLEAN_4X_FRAMES  # 19
START_FRAMES = 1  # the start image's latent frame
DEFAULT_PADDING_FULL_RANGE = 4  # up to this many sections the default paddings are N-1, ..., 0
SECTION_SEPARATOR = ";;;"
# The most sections a video can have (20 minutes at lws 9 and 30 fps). Section indices (-MAX_SECTIONS ..
# MAX_SECTIONS - 1), ranges, latent paddings and one-frame indices beyond it are typos, refused by the parsers before
# anything is allocated; the caller checks indices against the run's real section count.
MAX_SECTIONS = 1000
MAX_ONE_FRAME_INDEX = 1000  # largest one-frame target/control RoPE index (the documented methods use 0 .. 40)
MAX_DIGITS = len(str(max(MAX_SECTIONS, MAX_ONE_FRAME_INDEX)))  # longer numbers are refused without converting them
SECTION_SPEC_RE = re.compile(r"^(-?[0-9]+)(?:-(-?[0-9]+))?$")  # N, -N, S-E, S--E
SECTION_SPEC_LIKE_RE = re.compile(r"^[0-9\s-]*[0-9][0-9\s-]*$")  # digits/dashes only: meant as a spec, not text


class SectionSpecError(UsageError):
    """A section spec (``0:a;;;1-2:b``), ``--latent_paddings`` or one-frame option that cannot be used; the message
    names the text at fault."""


def _bounded_int(text: str, what: str, minimum: int, maximum: int = MAX_SECTIONS) -> int:
    """``text`` (ASCII digits, optional sign) as an integer in [minimum, maximum]; SectionSpecError naming ``what``
    otherwise. The length is checked before converting, so a 20-digit typo costs nothing."""
    text = text.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdecimal()):
        raise SectionSpecError(f"{what}: {text!r} is not an integer")
    if len(digits.lstrip("0")) > MAX_DIGITS or not minimum <= int(text) <= maximum:
        shown = text if len(text) <= 24 else text[:20] + "..."
        raise SectionSpecError(f"{what}: must be >= {minimum} and <= {maximum}, got {shown}")
    return int(text)


# ------------------------------------------------------------------------------------------------ frame counts


def section_frames(latent_window_size: int) -> int:
    """Pixel frames sampled per section (lws*4 - 3 = 33); also the pixel overlap of the sectioned decode."""
    return pixel_frames(latent_window_size)


def section_latent_frames(latent_window_size: int) -> int:
    """Latent frames sampled per section (= lws)."""
    return latent_frames(section_frames(latent_window_size))


def total_sections(video_seconds: float, latent_window_size: int, video_sections: int | None = None) -> int:
    """Number of sections: ``video_sections`` if given, else max(round(seconds*30 / (lws*4)), 1) (5 s -> 4)."""
    if video_sections is not None:
        if video_sections < 1:
            raise ValueError(f"video_sections must be >= 1, got {video_sections}")
        return video_sections
    return int(max(round(video_seconds * SECTION_COUNT_FPS / (latent_window_size * TEMPORAL_COMPRESSION)), 1))


def video_seconds_for_sections(sections: int, latent_window_size: int, fps: int) -> float:
    """Length musubi-tuner records for ``--video_sections`` ((sections*lws*4 + 1) / fps), e.g. for metadata."""
    return (sections * (latent_window_size * TEMPORAL_COMPRESSION) + 1) / fps


def video_latent_frames(sections: int, latent_window_size: int) -> int:
    """Latent frames of a finished video: lws*N + 1 (the +1 is the start image)."""
    return latent_window_size * sections + START_FRAMES


def video_pixel_frames(sections: int, latent_window_size: int) -> int:
    """Pixel frames of a finished video: 4*lws*N + 1 (145 for 4 sections of 9)."""
    return pixel_frames(video_latent_frames(sections, latent_window_size))


def section_start_seconds(section_index: int, latent_window_size: int, fps: int) -> Fraction:
    """When section k starts in the finished video: after k sections of 4*lws new pixel frames (k * 1.2 s at lws 9,
    30 fps). Exact, so a time written as "2.4s" compares equal to the start of section 2."""
    return Fraction(video_pixel_frames(section_index, latent_window_size) - START_FRAMES, fps)


def decode_sections(latent_frames: int, latent_window_size: int) -> int:
    """Sections the sectioned decode must walk for a latent of ``latent_frames`` frames (at least 1).

    The chunking follows the sections actually generated; musubi-tuner chunks by ``--video_seconds`` even when
    ``--video_sections`` set the length, which mis-splits the decode.
    """
    return max(sections_in_latent(latent_frames, latent_window_size), 1)


# ------------------------------------------------------------------------------------------------ latent paddings


def default_latent_paddings(sections: int) -> list[int]:
    """Inverted anti-drifting paddings in generation order: N-1..0 up to 4 sections, else [3, 2, ..., 2, 1, 0]."""
    if sections > DEFAULT_PADDING_FULL_RANGE:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(range(sections - 1, -1, -1))


def parse_latent_paddings(text: str | None) -> list[int] | None:
    """``--latent_paddings "3,2,1,0"`` -> [3, 2, 1, 0]; None stays None. Paddings are integers 0 .. MAX_SECTIONS,
    at most MAX_SECTIONS of them (SectionSpecError otherwise)."""
    if text is None:
        return None
    tokens = text.split(",")
    if len(tokens) > MAX_SECTIONS:
        raise SectionSpecError(
            f"--latent_paddings: {len(tokens)} values, more than the {MAX_SECTIONS} sections allowed"
        )
    return [_bounded_int(token, "--latent_paddings", 0) for token in tokens]


def resolve_latent_paddings(sections: int, user_paddings: Sequence[int] | None = None) -> list[int]:
    """Paddings per generated section (generation order) after applying a user override.

    Equal length: used as is. Longer: the first ``sections`` values. Shorter: they replace the head of the default
    list and the remaining sections keep their defaults, for any section count (musubi-tuner crashed for <= 4).
    """
    paddings = default_latent_paddings(sections)
    if user_paddings is None:
        return paddings
    user_paddings = list(user_paddings)
    if len(user_paddings) > sections:
        logger.warning(
            "latent paddings: %d values for %d sections, using the first %d", len(user_paddings), sections, sections
        )
        return user_paddings[:sections]
    if len(user_paddings) < sections:
        logger.warning(
            "latent paddings: %d values for %d sections, defaults used for the rest", len(user_paddings), sections
        )
    return user_paddings + paddings[len(user_paddings) :]


# ------------------------------------------------------------------------------------------------ indices


@dataclass(frozen=True)
class SectionIndices:
    """RoPE time indices of one DiT call, each a 1-D int64 tensor (the layout stored in latent caches)."""

    latent_indices: torch.Tensor  # (T,)
    clean_latent_indices: torch.Tensor  # (K,)
    clean_latent_2x_indices: torch.Tensor | None  # (2,) or None when not passed
    clean_latent_4x_indices: torch.Tensor | None  # (16,) or None when not passed

    def batched(self, batch_size: int = 1) -> dict[str, torch.Tensor | None]:
        """DiT keyword arguments with a batch dimension: each tensor (B, n)."""

        def rows(t):
            return None if t is None else t.unsqueeze(0).expand(batch_size, -1).clone()

        return {
            "latent_indices": rows(self.latent_indices),
            "clean_latent_indices": rows(self.clean_latent_indices),
            "clean_latent_2x_indices": rows(self.clean_latent_2x_indices),
            "clean_latent_4x_indices": rows(self.clean_latent_4x_indices),
        }


def inverted_indices(latent_window_size: int, latent_padding: int) -> SectionIndices:
    """Inverted anti-drifting: arange split [1, P, lws, 1, 2, 16] = pre, blank, latent, post, 2x, 4x (P = pad*lws).

    lws 9, padding 0: latent 1..9, clean [0, 10], 2x [11, 12], 4x 13..28.
    """
    blank = latent_padding * latent_window_size
    sizes = [START_FRAMES, blank, latent_window_size, CLEAN_1X_FRAMES, CLEAN_2X_FRAMES, CLEAN_4X_FRAMES]
    pre, _, latent, post, clean_2x, clean_4x = torch.arange(sum(sizes)).split(sizes)
    return SectionIndices(latent, torch.cat([pre, post]), clean_2x, clean_4x)


def f1_indices(latent_window_size: int) -> SectionIndices:
    """F1: arange split [1, 16, 2, 1, lws] = start, 4x, 2x, 1x, latent (lws 9: 4x 1..16, 2x 17,18, clean [0, 19])."""
    sizes = [START_FRAMES, CLEAN_4X_FRAMES, CLEAN_2X_FRAMES, CLEAN_1X_FRAMES, latent_window_size]
    start, clean_4x, clean_2x, clean_1x, latent = torch.arange(sum(sizes)).split(sizes)
    return SectionIndices(latent, torch.cat([start, clean_1x]), clean_2x, clean_4x)


# ------------------------------------------------------------------------------------------------ section plans


@dataclass(frozen=True)
class SectionPlan:
    """One sampled section, listed in generation order."""

    generation_step: int  # 0 = generated first
    section_index: int  # position in time, 0 = first section of the video
    section_index_from_last: int  # -1 = last section of the video
    latent_padding: int  # blank windows between start frame and the window (inverted); 0 for F1
    latent_range: tuple[int, int]  # frames [start, end) of the final video latent that this section fills
    indices: SectionIndices
    f1: bool
    prepends_start_latent: bool  # inverted section 0: the start latent is prepended to its output


def plan_sections(
    sections: int,
    latent_window_size: int,
    *,
    f1: bool = False,
    latent_paddings: Sequence[int] | None = None,
) -> list[SectionPlan]:
    """Plans in generation order: inverted = last section first with paddings; F1 = first section first.

    ``latent_paddings`` is a user override (see ``resolve_latent_paddings``); F1 ignores it.
    """
    if sections < 1:
        raise ValueError(f"need at least one section, got {sections}")
    if f1:
        if latent_paddings is not None:
            logger.info("latent paddings are ignored in F1 mode")
        order = list(range(sections))
        paddings = [0] * sections
    else:
        order = list(range(sections - 1, -1, -1))
        paddings = resolve_latent_paddings(sections, latent_paddings)

    plans = []
    for step, (section_index, padding) in enumerate(zip(order, paddings)):
        start = START_FRAMES + section_index * latent_window_size
        plans.append(
            SectionPlan(
                generation_step=step,
                section_index=section_index,
                section_index_from_last=section_index - sections,
                latent_padding=padding,
                latent_range=(start, start + latent_window_size),
                indices=f1_indices(latent_window_size) if f1 else inverted_indices(latent_window_size, padding),
                f1=f1,
                prepends_start_latent=not f1 and section_index == 0,
            )
        )
    return plans


# ------------------------------------------------------------------------------------------------ clean latents


@dataclass(frozen=True)
class CleanLatents:
    """Clean latents of one DiT call, each (B, 16, n, h, w)."""

    clean_latents: torch.Tensor  # (B, 16, K, h, w): [start, post/1x] for sections
    clean_latents_2x: torch.Tensor | None  # (B, 16, 2, h, w)
    clean_latents_4x: torch.Tensor | None  # (B, 16, 16, h, w)

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        return {
            "clean_latents": self.clean_latents,
            "clean_latents_2x": self.clean_latents_2x,
            "clean_latents_4x": self.clean_latents_4x,
        }


def new_history(
    start_latent: torch.Tensor,
    *,
    f1: bool,
    end_latent: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """History before the first generated section; start/end latents are (B, 16, 1, h, w).

    Inverted: 19 zero frames, frame 0 = ``end_latent`` if given (the last section then sees it as "post").
    F1: 19 zero frames followed by the start latent (end latent ignored).
    """
    b, _, _, h, w = start_latent.shape
    zeros = torch.zeros((b, LATENT_CHANNELS, HISTORY_FRAMES, h, w), dtype=dtype, device=start_latent.device)
    if f1:
        return torch.cat([zeros, start_latent.to(zeros)], dim=2)
    if end_latent is not None:
        zeros[:, :, :1] = end_latent.to(zeros)
    return zeros


def clean_latents_from_history(history: torch.Tensor, start_latent: torch.Tensor, *, f1: bool) -> CleanLatents:
    """Clean latents for the next section: ``start_latent`` (this section's start image) plus history frames.

    Inverted: post, 2x, 4x = history[:19] split [1, 2, 16]. F1: 4x, 2x, 1x = history[-19:] split [16, 2, 1].
    """
    sizes = [CLEAN_1X_FRAMES, CLEAN_2X_FRAMES, CLEAN_4X_FRAMES]
    if f1:
        clean_4x, clean_2x, nearest = history[:, :, -HISTORY_FRAMES:].split(sizes[::-1], dim=2)
    else:
        nearest, clean_2x, clean_4x = history[:, :, :HISTORY_FRAMES].split(sizes, dim=2)
    clean = torch.cat([start_latent.to(history), nearest], dim=2)
    return CleanLatents(clean, clean_2x, clean_4x)


def update_history(
    history: torch.Tensor, generated: torch.Tensor, plan: SectionPlan, start_latent: torch.Tensor
) -> torch.Tensor:
    """History after ``plan``'s section produced ``generated`` (B, 16, lws, h, w).

    Inverted: prepend (the last one generated, section 0, prepends its start latent too). F1: append.
    """
    generated = generated.to(history)
    if plan.f1:
        return torch.cat([history, generated], dim=2)
    if plan.prepends_start_latent:
        generated = torch.cat([start_latent.to(history), generated], dim=2)
    return torch.cat([generated, history], dim=2)


def video_latent_from_history(history: torch.Tensor, *, f1: bool) -> torch.Tensor:
    """The time-ordered video latent inside a history buffer (drops the 19 context frames and the end slot)."""
    return history[:, :, HISTORY_FRAMES:] if f1 else history[:, :, :-HISTORY_FRAMES]


class ImageHistory:
    """The history of a generation from a start image: ``new_history``, then per section
    ``clean_latents_from_history`` and ``update_history``. Extensions of a video (``frame_pack.extend``) have the
    same three methods, so the sampling loop does not care which one it drives."""

    def __init__(self, start_latent: torch.Tensor, *, f1: bool, end_latent: torch.Tensor | None = None):
        self.f1 = f1
        self.history = new_history(start_latent, f1=f1, end_latent=end_latent)

    def section_inputs(self, plan: SectionPlan, start_latent: torch.Tensor) -> tuple[SectionIndices, CleanLatents]:
        """(indices, clean latents) of ``plan``'s DiT call; ``start_latent`` is this section's start image."""
        return plan.indices, clean_latents_from_history(self.history, start_latent, f1=self.f1)

    def add(self, plan: SectionPlan, generated: torch.Tensor, start_latent: torch.Tensor) -> None:
        self.history = update_history(self.history, generated, plan, start_latent)

    def video_latent(self) -> torch.Tensor:
        return video_latent_from_history(self.history, f1=self.f1)


def history_for_section(
    video_latent: torch.Tensor, plan: SectionPlan, end_latent: torch.Tensor | None = None
) -> torch.Tensor:
    """The history generation holds right before ``plan``'s section, rebuilt from a fully known video latent.

    Inverted: [frames after the section, then the initial history]; F1: [initial history, frames 1 .. before
    the section]. The history keeps the video latent's dtype (caches are fp16).
    """
    start = video_latent[:, :, :START_FRAMES]
    begin, end = plan.latent_range
    initial = new_history(start, f1=plan.f1, end_latent=end_latent, dtype=video_latent.dtype)
    if plan.f1:
        return torch.cat([initial, video_latent[:, :, START_FRAMES:begin]], dim=2)
    return torch.cat([video_latent[:, :, end:], initial], dim=2)


def section_target(video_latent: torch.Tensor, plan: SectionPlan) -> torch.Tensor:
    """The ground-truth latents of ``plan``'s section: (B, 16, lws, h, w)."""
    begin, end = plan.latent_range
    return video_latent[:, :, begin:end]


def cached_section_clean_latents(video_latent: torch.Tensor, plan: SectionPlan) -> CleanLatents:
    """Clean latents caching stores for a section: what generation would see, with frame 0 as the start image."""
    history = history_for_section(video_latent, plan)
    return clean_latents_from_history(history, video_latent[:, :, :START_FRAMES], f1=plan.f1)


# ------------------------------------------------------------------------------------------------ one-frame mode


@dataclass(frozen=True)
class OneFrameOptions:
    """Parsed ``--one_frame_inference`` options."""

    no_2x: bool = False
    no_4x: bool = False
    no_post: bool = False
    target_index: int | None = None  # None -> lws
    control_indices: tuple[int, ...] = ()


ONE_FRAME_FLAGS = ("no_2x", "no_4x", "no_post")
ONE_FRAME_VALUES = ("target_index", "control_index")
ONE_FRAME_TOKENS = ("default", *ONE_FRAME_FLAGS, *(f"{key}=N" for key in ONE_FRAME_VALUES))


def parse_one_frame_options(text: str) -> OneFrameOptions:
    """Parse ``"no_2x,no_4x,target_index=1,control_index=0;10"``; order is irrelevant, duplicates merge.

    ``default`` does nothing. Indices are integers 0 .. MAX_ONE_FRAME_INDEX. An unknown token, a bad or negative
    index, or two different values for the same key raise SectionSpecError naming the token.
    """
    flags: set[str] = set()
    values: dict[str, Any] = {}
    for raw in text.split(","):
        token = raw.strip()
        if not token or token == "default":
            continue
        key, sep, value = (part.strip() for part in token.partition("="))
        if not sep and key in ONE_FRAME_FLAGS:
            flags.add(key)
            continue
        if not sep or key not in ONE_FRAME_VALUES:
            raise SectionSpecError(f"unknown one-frame option {token!r} (known: {', '.join(ONE_FRAME_TOKENS)})")
        what = f"one-frame option {token!r}"
        parsed: Any = tuple(_bounded_int(v, what, 0, MAX_ONE_FRAME_INDEX) for v in value.split(";"))
        if key == "target_index":
            if len(parsed) != 1:
                raise SectionSpecError(f"{what}: give one index")
            parsed = parsed[0]
        if key in values and values[key] != parsed:
            raise SectionSpecError(f"one-frame option {key} given twice with different values")
        values[key] = parsed
    return OneFrameOptions(
        no_2x="no_2x" in flags,
        no_4x="no_4x" in flags,
        no_post="no_post" in flags,
        target_index=values.get("target_index"),
        control_indices=values.get("control_index", ()),
    )


def one_frame_clean_count(num_control_latents: int, options: OneFrameOptions) -> int:
    """Clean 1x latents in one-frame mode: the controls (one zero latent if none) plus the zero post unless no_post."""
    return max(num_control_latents, 1) + (0 if options.no_post else CLEAN_1X_FRAMES)


def one_frame_indices(latent_window_size: int, num_control_latents: int, options: OneFrameOptions) -> SectionIndices:
    """One-frame layout: target at ``target_index`` (default lws); clean indices zeros, post = 1+lws, then the
    ``control_index`` values in order; 2x = [lws+2, lws+3], 4x = lws+4 .. lws+19 unless disabled.

    Caching uses the same function with control_indices = fp_1f_clean_indices.
    """
    target = latent_window_size if options.target_index is None else options.target_index
    clean = torch.zeros(one_frame_clean_count(num_control_latents, options), dtype=torch.int64)
    if not options.no_post:
        clean[-1] = START_FRAMES + latent_window_size
    count = min(len(options.control_indices), len(clean))
    clean[:count] = torch.tensor(options.control_indices[:count], dtype=torch.int64)

    first_2x = START_FRAMES + latent_window_size + CLEAN_1X_FRAMES
    first_4x = first_2x + CLEAN_2X_FRAMES
    return SectionIndices(
        latent_indices=torch.tensor([target], dtype=torch.int64),
        clean_latent_indices=clean,
        clean_latent_2x_indices=None if options.no_2x else torch.arange(first_2x, first_4x),
        clean_latent_4x_indices=None if options.no_4x else torch.arange(first_4x, first_4x + CLEAN_4X_FRAMES),
    )


def one_frame_clean_latents(
    control_latents: Sequence[torch.Tensor],
    options: OneFrameOptions,
    latent_hw: tuple[int, int],
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
) -> CleanLatents:
    """One-frame clean latents with a batch dimension: controls (each (B, 16, 1, h, w), already masked) or one
    zero latent, plus a zero post unless no_post; zero 2x (B,16,2,h,w) and 4x (B,16,16,h,w) unless disabled."""
    h, w = latent_hw

    def zeros(frames):
        return torch.zeros((batch_size, LATENT_CHANNELS, frames, h, w), dtype=dtype)

    frames = [c.to(dtype) for c in control_latents] or [zeros(1)]
    if not options.no_post:
        frames.append(zeros(CLEAN_1X_FRAMES))
    return CleanLatents(
        clean_latents=torch.cat(frames, dim=2),
        clean_latents_2x=None if options.no_2x else zeros(CLEAN_2X_FRAMES),
        clean_latents_4x=None if options.no_4x else zeros(CLEAN_4X_FRAMES),
    )


# ------------------------------------------------------------------------------------------------ section specs


def _parse_section_part(part: str) -> tuple[range, str]:
    """One ``SPEC:text`` part -> (indices, text). A prefix that is not a spec keeps the whole part as text."""
    if ":" not in part:
        return range(1), part.strip()
    spec, text = (s.strip() for s in part.split(":", 1))
    if not spec:
        return range(1), text
    match = SECTION_SPEC_RE.match(spec)
    if match is None:
        if SECTION_SPEC_LIKE_RE.match(spec):
            raise SectionSpecError(f"bad section spec {spec!r}: use N, -N or S-E (e.g. 0, -1, 0-2)")
        return range(1), part.strip()  # e.g. a Windows path "C:\\images\\a.png" or "Note: ..."
    what = f"section spec {spec!r}"
    start = _bounded_int(match.group(1), what, -MAX_SECTIONS, MAX_SECTIONS - 1)
    end = start if match.group(2) is None else _bounded_int(match.group(2), what, -MAX_SECTIONS, MAX_SECTIONS - 1)
    if end < start:
        raise SectionSpecError(f"bad section spec {spec!r}: range end {end} is before start {start}")
    return range(start, end + 1), text


def parse_section_spec(text: str) -> dict[int, str]:
    """Section syntax of ``--prompt`` / ``--image_path``: ``"0:a;;;1-2:b;;;-1:c"`` -> {0: a, 1: b, 2: b, -1: c}.

    Split on ``;;;`` only if present (otherwise the whole string is section 0, colons included). Empty parts are
    skipped. Indices lie in -MAX_SECTIONS .. MAX_SECTIONS - 1; an index given twice (also through overlapping
    ranges, or a part without index next to ``0:``) raises SectionSpecError naming it. Without index 0, index 0
    copies the smallest non-negative index, or the most negative one if all are negative.
    """
    if SECTION_SEPARATOR not in text:
        return {0: text}
    entries: dict[int, str] = {}
    written: dict[int, str] = {}  # index -> the part that set it, for the error message
    for part in text.split(SECTION_SEPARATOR):
        if not part.strip():
            continue
        indices, value = _parse_section_part(part)
        for index in indices:
            if index in entries:
                raise SectionSpecError(
                    f"section {index} is given twice in {text!r} (by {written[index].strip()!r} and "
                    f"{part.strip()!r}); give each section once"
                )
            entries[index], written[index] = value, part
    if not entries:
        raise SectionSpecError(f"no sections in {text!r}")
    if 0 not in entries:
        keys = list(entries)
        non_negative = [i for i in keys if i >= 0]
        entries[0] = entries[min(non_negative) if non_negative else min(keys)]
    return entries


def check_section_indices(entries: Mapping[int, Any], sections: int, what: str) -> None:
    """Every index of a parsed section spec names a section of this run (0 .. sections-1 or -sections .. -1);
    SectionSpecError naming ``what`` (the flag) and the first index that does not."""
    unused = sorted(i for i in entries if not -sections <= i < sections)
    if unused:
        raise SectionSpecError(
            f"{what}: section {unused[0]} is beyond the video's {sections} section(s) "
            f"(indices 0 .. {sections - 1} and -{sections} .. -1)"
        )


def select_section_key(entries: Mapping[int, Any], section_index: int, section_index_from_last: int) -> int:
    """Key of the entry a section uses: section_index_from_last if present, then section_index, then 0."""
    if section_index_from_last in entries:
        return section_index_from_last
    if section_index in entries:
        return section_index
    return 0


# ------------------------------------------------------------------------------------------------ decode


def decode_overlap_frames(latent_window_size: int) -> int:
    """Pixel frames blended between neighbouring decode chunks: 4*lws - 3 (33)."""
    return section_frames(latent_window_size)


def decode_chunk_ranges(latent_frames: int, latent_window_size: int) -> list[tuple[int, int]]:
    """Latent ranges [start, end) for the sectioned (non-bulk) decode, in decode order (video end first).

    In time order: [0, 2*lws+1), then 2*lws frames starting at lws+1, 2*lws+1, ... (clipped to the latent).
    Decode the first range alone; every further (earlier) range is decoded and ``soft_append``-ed in front.
    The section count comes from the latent length (``decode_sections``).
    """
    chunks = []
    start = 0
    for k in range(decode_sections(latent_frames, latent_window_size)):
        first = k == 0
        length = 2 * latent_window_size + (START_FRAMES if first else 0)
        end = min(start + length, latent_frames)
        if end > start:
            chunks.append((start, end))
        start += latent_window_size + (START_FRAMES if first else 0)
    return chunks[::-1]


def soft_append_weights(overlap: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Weights of the earlier chunk over the overlap: linspace(1, 0, overlap)."""
    return torch.linspace(1, 0, overlap, dtype=dtype, device=device)


def soft_append(earlier: torch.Tensor, later: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join two decoded (B, C, T, H, W) clips whose last/first ``overlap`` frames show the same moment.

    Result = earlier[:-O] ++ (w*earlier[-O:] + (1-w)*later[:O]) ++ later[O:], w = linspace(1, 0, O), computed in
    the earlier clip's dtype (fp16 for the VAE output).
    """
    if overlap <= 0:
        return torch.cat([earlier, later], dim=2)
    if earlier.shape[2] < overlap or later.shape[2] < overlap:
        raise ValueError(f"soft_append needs >= {overlap} frames, got {earlier.shape[2]} and {later.shape[2]}")
    w = soft_append_weights(overlap, earlier.dtype, earlier.device).view(1, 1, -1, 1, 1)
    blended = w * earlier[:, :, -overlap:] + (1 - w) * later[:, :, :overlap].to(earlier)
    return torch.cat([earlier[:, :, :-overlap], blended, later[:, :, overlap:].to(earlier)], dim=2)
