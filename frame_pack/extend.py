"""Extending an existing video: the clean-latent context of each new section, built from the input's latents.

The input (B, 16, T_in, h, w) is followed by N new sections of lws frames; the result is the input unchanged
followed by the new frames (T_in + N*lws). Per-section prompts and images index the new sections.

* F1 (``F1Extension``): forward continuation exactly as F1 continues its own history: the history is 19 zero
  frames followed by the input, the start slot holds the input's first frame, 4x/2x/1x are the last 16/2/1 frames
  of the history, new sections are appended. ``context_frames`` keeps only the input's last N frames visible
  (older ones read as zeros, as if the input were that short); the default, 19, is all F1 looks at.
* Original model (``OriginalExtension``): FramePack-Studio's "Video" mode. Sections are sampled last first with
  the usual paddings; each call's RoPE layout is [pre, blank, latent, post, 2x, 4x]. ``pre`` is the input's last
  frames (only the last one for the new section next to the input, ``context_frames - 1`` for the others), ``post``
  the first frames of the new sections already sampled (zeros, or the end image, for the first one sampled), and
  2x/4x are the 2 and 16 frames before those last ``pre`` frames at the end of the buffer [sampled sections, input].
  With an end image the section sampled first sees it as a single ``post`` frame ("Video with Endframe").

Random draws: an extension of an input holding S whole sections (floor((T_in - 1) / lws)) skips the first S noise
draws of its seed, so extending by one section twice with the same seed equals extending once by two sections (F1;
the inverted model samples the new part last section first, so there it is not a composition of one-section runs).
"""

from __future__ import annotations

import math

import torch

from frame_pack.sections import (
    CLEAN_2X_FRAMES,
    CLEAN_4X_FRAMES,
    HISTORY_FRAMES,
    CleanLatents,
    SectionIndices,
    SectionPlan,
    clean_latents_from_history,
)
from hunyuan_model.frame_math import LATENT_CHANNELS, sections_in_latent

MIN_INPUT_LATENT_FRAMES = 2  # one latent frame is a still image: there is no motion to continue
F1_CONTEXT_FRAMES = (1, HISTORY_FRAMES, HISTORY_FRAMES)  # (min, max, default)
ORIGINAL_CONTEXT_FRAMES = (2, 10, 5)  # FramePack-Studio's num_cleaned_frames slider: 2 .. 10, default 5


def context_frames_bounds(f1: bool) -> tuple[int, int, int]:
    """(min, max, default) of ``context_frames`` for the model family."""
    return F1_CONTEXT_FRAMES if f1 else ORIGINAL_CONTEXT_FRAMES


def resolve_context_frames(value: int | None, f1: bool) -> int:
    """``value`` checked against the model's bounds (ValueError), or the model's default when None."""
    low, high, default = context_frames_bounds(f1)
    if value is None:
        return default
    if not low <= value <= high:
        model = "F1" if f1 else "the original model"
        raise ValueError(f"must be between {low} and {high} for {model}, got {value}")
    return value


def noise_draws_to_skip(input_frames: int, latent_window_size: int) -> int:
    """Noise draws an extension skips: one per whole section the input holds (see the module docstring)."""
    return sections_in_latent(input_frames, latent_window_size)


def _repeat_to(frames: torch.Tensor, count: int) -> torch.Tensor:
    """Tile ``frames`` (B, C, t, h, w) along time until it has ``count`` frames ([a, b] -> [a, b, a, ...])."""
    if frames.shape[2] >= count:
        return frames[:, :, :count]
    return frames.repeat(1, 1, math.ceil(count / frames.shape[2]), 1, 1)[:, :, :count]


class F1Extension:
    """F1 continuation of an input latent; see the module docstring."""

    def __init__(self, input_latent: torch.Tensor, context_frames: int = HISTORY_FRAMES):
        self.input = input_latent.float()
        b, _, t, h, w = self.input.shape
        visible = self.input.clone()
        if t > context_frames:
            visible[:, :, : t - context_frames] = 0
        zeros = torch.zeros((b, LATENT_CHANNELS, HISTORY_FRAMES, h, w), dtype=visible.dtype)
        self.history = torch.cat([zeros, visible], dim=2)
        self.start_latent = self.input[:, :, :1]
        self.new: list[torch.Tensor] = []

    def section_inputs(self, plan: SectionPlan, start_latent: torch.Tensor | None = None):
        """(indices, clean latents) of ``plan``'s DiT call; ``start_latent`` is unused (the input's first frame)."""
        return plan.indices, clean_latents_from_history(self.history, self.start_latent, f1=True)

    def add(self, plan: SectionPlan, generated: torch.Tensor, start_latent: torch.Tensor | None = None) -> None:
        generated = generated.to(self.history)
        self.history = torch.cat([self.history, generated], dim=2)
        self.new.append(generated)

    def video_latent(self) -> torch.Tensor:
        return torch.cat([self.input, *self.new], dim=2)


def original_extension_context(
    input_latent: torch.Tensor,
    buffer: torch.Tensor,
    *,
    next_to_input: bool,
    sampled_first: bool,
    latent_padding: int,
    latent_window_size: int,
    context_frames: int,
    end_latent: torch.Tensor | None = None,
) -> tuple[SectionIndices, CleanLatents]:
    """Indices and clean latents of one new section in FramePack-Studio's "Video" layout.

    ``buffer`` is [new sections sampled so far (time order), input]. ``next_to_input``: the new section right after
    the input (sampled last); ``sampled_first``: the last new section (sampled first). Where the buffer is shorter
    than the frame counts Studio's rule asks for (a 2-frame input), the oldest available frame is repeated.
    """
    input_frames, buffered = input_latent.shape[2], buffer.shape[2]
    one_x = 1 if next_to_input else max(context_frames - 1, 1)
    available = input_frames if next_to_input else buffered
    pre = one_x
    n_2x = min(CLEAN_2X_FRAMES, max(1, available - pre - 1)) if available > pre + 1 else 1
    n_4x = min(CLEAN_4X_FRAMES, max(1, available - pre - n_2x)) if available > pre + n_2x else 1
    n_post = 1 if sampled_first and end_latent is not None else one_x

    sizes = [pre, latent_padding * latent_window_size, latent_window_size, n_post, n_2x, n_4x]
    pre_i, _, latent_i, post_i, i_2x, i_4x = torch.arange(sum(sizes)).split(sizes)
    indices = SectionIndices(latent_i, torch.cat([pre_i, post_i]), i_2x, i_4x)

    tail = max(min(n_2x + n_4x, available - pre), 0)
    end = max(buffered - pre, 1)
    context = buffer[:, :, max(end - tail, 0) : end] if tail else buffer[:, :, :1]
    context = torch.cat([context[:, :, :1].expand(-1, -1, n_2x + n_4x - context.shape[2], -1, -1), context], 2)
    clean_4x, clean_2x = context.split([n_4x, n_2x], dim=2)

    pre_latents = _repeat_to(input_latent[:, :, -min(one_x, input_frames) :], pre)
    if sampled_first:
        first = end_latent[:, :, :1] if end_latent is not None else torch.zeros_like(input_latent[:, :, :1])
        post_latents = _repeat_to(first.to(buffer), n_post)
    else:
        post_latents = _repeat_to(buffer[:, :, : min(one_x, buffered)], n_post)
    clean = CleanLatents(torch.cat([pre_latents.to(buffer), post_latents], dim=2), clean_2x, clean_4x)
    return indices, clean


class OriginalExtension:
    """Inverted continuation of an input latent (FramePack-Studio "Video" / "Video with Endframe")."""

    def __init__(
        self,
        input_latent: torch.Tensor,
        latent_window_size: int,
        context_frames: int = ORIGINAL_CONTEXT_FRAMES[2],
        end_latent: torch.Tensor | None = None,
    ):
        self.input = input_latent.float()
        self.buffer = self.input  # [new sections sampled so far, in time order, then the input]
        self.latent_window_size = latent_window_size
        self.context_frames = context_frames
        self.end_latent = None if end_latent is None else end_latent.float()

    def section_inputs(self, plan: SectionPlan, start_latent: torch.Tensor | None = None):
        """(indices, clean latents) of ``plan``'s DiT call; ``start_latent`` is unused (the context is the input)."""
        return original_extension_context(
            self.input,
            self.buffer,
            next_to_input=plan.section_index == 0,
            sampled_first=plan.generation_step == 0,
            latent_padding=plan.latent_padding,
            latent_window_size=self.latent_window_size,
            context_frames=self.context_frames,
            end_latent=self.end_latent,
        )

    def add(self, plan: SectionPlan, generated: torch.Tensor, start_latent: torch.Tensor | None = None) -> None:
        self.buffer = torch.cat([generated.to(self.buffer), self.buffer], dim=2)

    def video_latent(self) -> torch.Tensor:
        new_frames = self.buffer.shape[2] - self.input.shape[2]
        return torch.cat([self.input, self.buffer[:, :, :new_frames]], dim=2)
