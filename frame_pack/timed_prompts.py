"""Prompts placed by time, ``"[0s: a cat sits] [2s: the cat jumps] [3.5s-5s: the cat lands]"``, and prompt blending.

The rule (also in ``--help``): section k starts at k * 4 * lws / fps seconds (``section_start_seconds``; 1.2 s per
section at lws 9 and 30 fps); times are compared at the nearest frame at ``fps``, so "1.0667s" is the start of a
section that starts at 16/15 s. Times are positions in the finished video whatever the generation order (the
inverted model samples the last section first; its last section still gets the prompt of the last time).

* ``[Ts: text]`` applies to every section that starts at or after T and before the next token's time.
* ``[As-Bs: text]`` applies to the sections that start at or after A and before B.
* Text outside the brackets is the prompt of sections that no token covers; without it every section must be
  covered.
* Errors name the token: malformed brackets, two tokens covering the same time, a start at or after the end of
  the video, a token that covers no section start, and mixing with the ``0:text;;;1:text`` syntax.

``blend_schedule`` moves the text embeddings linearly from one prompt to the next over N sections at each change
(FramePack-Studio's ``blend_sections``): at a change at section c, section c + j (j < N) uses
(1 - w) * previous + w * next with w = (j + 1) / N (w = 1 from section c + N - 1 on).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from frame_pack.sections import (
    SECTION_SEPARATOR,
    check_section_indices,
    parse_section_spec,
    section_start_seconds,
    select_section_key,
)
from utils.cli import UserError

BRACKET_RE = re.compile(r"\[[^\[\]]*\]?")  # a bracket group; an unclosed one runs to the next "[" or the end
TIMED_HINT_RE = re.compile(r"\[\s*[-+\d.]")  # "[" followed by a (signed) number: the prompt means to use timed tokens
_TIME = r"([0-9]+(?:\.[0-9]+)?)\s*s"
TOKEN_RE = re.compile(rf"^\[\s*{_TIME}\s*(?:-\s*{_TIME}\s*)?:(.*)\]$", re.DOTALL)
TOKEN_FORM = "[Ts: text] or [As-Bs: text], times in seconds such as 0s, 2s, 3.5s"
MAX_TIME_CHARS = 32  # longer than any float repr (digits and point): a typo, refused before it is converted


class TimedPromptError(UserError, ValueError):
    """A timed prompt that cannot be placed; the message names the token at fault."""


@dataclass(frozen=True)
class TimedToken:
    """One ``[...]`` token: its text as written, its time span in seconds (end None = until the next token)."""

    written: str
    start: Fraction
    end: Fraction | None
    text: str


@dataclass(frozen=True)
class TimedPrompt:
    tokens: tuple[TimedToken, ...]  # sorted by start
    default: str | None  # the text outside the brackets, if any


@dataclass(frozen=True)
class SectionText:
    """The text conditioning of one section: ``weight`` of ``target`` mixed with 1 - weight of ``previous``."""

    previous: str
    target: str
    weight: float  # 1.0 = the target prompt alone

    @property
    def blended(self) -> bool:
        return self.weight < 1.0 and self.previous != self.target


def is_timed_prompt(text: str | None) -> bool:
    """True when the prompt contains a ``[`` followed by a number, i.e. it means to use timed tokens."""
    return bool(text) and TIMED_HINT_RE.search(text) is not None


def _seconds(text: str) -> Fraction:
    return Fraction(text)  # exact: "2.4" equals the start of section 2 at lws 9, 30 fps


def _frame(seconds: Fraction, fps: int) -> int:
    """The nearest pixel frame at ``fps`` (halves round up)."""
    return math.floor(seconds * fps + Fraction(1, 2))


def _format_seconds(value: Fraction) -> str:
    return f"{float(value):g}s"


def parse_timed_prompt(text: str) -> TimedPrompt:
    """Tokens sorted by start plus the text outside them; raises TimedPromptError naming a malformed token."""
    if SECTION_SEPARATOR in text:
        raise TimedPromptError(
            f"timed prompt {text!r}: do not mix [Ts: text] tokens with the {SECTION_SEPARATOR!r} section syntax"
        )
    tokens = []
    for match in BRACKET_RE.finditer(text):
        written = match.group(0)
        parsed = TOKEN_RE.match(written)
        if parsed is None:
            raise TimedPromptError(f"timed prompt token {written!r} is malformed: expected {TOKEN_FORM}")
        for time in parsed.group(1, 2):
            if time is not None and len(time) > MAX_TIME_CHARS:
                raise TimedPromptError(f"timed prompt token {written!r}: time {time[:MAX_TIME_CHARS]}... is too long")
        start, end, body = _seconds(parsed.group(1)), parsed.group(2), parsed.group(3).strip()
        if not body:
            raise TimedPromptError(f"timed prompt token {written!r} has no text")
        end = _seconds(end) if end is not None else None
        if end is not None and end <= start:
            raise TimedPromptError(f"timed prompt token {written!r}: the end time is not after the start time")
        tokens.append(TimedToken(written, start, end, body))
    outside = BRACKET_RE.sub(" ", text)
    if "]" in outside:
        raise TimedPromptError(f"timed prompt {text!r}: a ']' without its '['")
    tokens.sort(key=lambda t: t.start)
    for earlier, later in zip(tokens, tokens[1:]):
        if earlier.start == later.start or (earlier.end is not None and earlier.end > later.start):
            raise TimedPromptError(
                f"timed prompt tokens {earlier.written!r} and {later.written!r} overlap: each time belongs to one token"
            )
    default = " ".join(outside.split()) or None
    return TimedPrompt(tuple(tokens), default)


def timed_section_prompts(text: str, sections: int, latent_window_size: int, fps: int) -> list[str]:
    """The prompt of each section in time order (index 0 = first section of the video) for a timed prompt."""
    timed = parse_timed_prompt(text)
    starts = [section_start_seconds(k, latent_window_size, fps) for k in range(sections)]
    video_end = section_start_seconds(sections, latent_window_size, fps)
    start_frames = [_frame(s, fps) for s in starts]
    listed = ", ".join(_format_seconds(s) for s in starts)
    prompts: list[str | None] = [timed.default] * sections
    for i, token in enumerate(timed.tokens):
        if _frame(token.start, fps) >= _frame(video_end, fps):
            raise TimedPromptError(
                f"timed prompt token {token.written!r} starts at or after the end of the video "
                f"({_format_seconds(video_end)}, {sections} section(s) starting at {listed})"
            )
        end = token.end
        if end is None:
            end = timed.tokens[i + 1].start if i + 1 < len(timed.tokens) else video_end
        first, stop = _frame(token.start, fps), _frame(end, fps)
        covered = [k for k, s in enumerate(start_frames) if first <= s < stop]
        if not covered:
            raise TimedPromptError(
                f"timed prompt token {token.written!r} covers no section: sections start at {listed} "
                f"(4 * latent_window_size / fps = {_format_seconds(starts[1] if sections > 1 else video_end)} apart)"
            )
        for k in covered:
            prompts[k] = token.text
    for k, prompt in enumerate(prompts):
        if prompt is None:
            raise TimedPromptError(
                f"timed prompt {text!r}: no token covers section {k} (starting at {_format_seconds(starts[k])}); "
                "add a token for it or text outside the brackets as the default"
            )
    return prompts  # type: ignore[return-value]


def section_prompts(text: str, sections: int, latent_window_size: int, fps: int) -> list[str]:
    """The prompt of each section in time order, for either syntax: timed tokens, or ``0:a;;;-1:b`` (an index
    names a section from the start, a negative index from the end; unnamed sections use index 0's prompt; an index
    beyond the video's sections raises SectionSpecError)."""
    if is_timed_prompt(text):
        return timed_section_prompts(text, sections, latent_window_size, fps)
    entries = parse_section_spec(text)
    check_section_indices(entries, sections, "prompt")
    return [entries[select_section_key(entries, k, k - sections)] for k in range(sections)]


def blend_schedule(prompts: Sequence[str], blend_sections: int) -> list[SectionText]:
    """Per section (time order) the prompts to mix and the weight of the new one.

    At each change (section c's prompt differs from section c-1's) sections c .. c+N-1 move from the previous
    prompt to the new one with weights 1/N, 2/N, ..., 1; N <= 1 switches at once. A change inside a running blend
    starts a new blend from the prompt that was being blended in.
    """
    schedule = []
    change = None  # section index of the most recent change
    for k, prompt in enumerate(prompts):
        if k > 0 and prompt != prompts[k - 1]:
            change = k
        if change is not None and k - change + 1 < blend_sections:
            weight = (k - change + 1) / blend_sections
            schedule.append(SectionText(prompts[change - 1], prompt, weight))
        else:
            schedule.append(SectionText(prompt, prompt, 1.0))
    return schedule


def blend_text_conditioning(
    previous: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """(1 - weight) * previous + weight * target for every floating tensor (LLaMA states, CLIP pooler, in fp32);
    boolean attention masks are OR-ed so the tokens of both prompts stay visible while they are mixed."""
    out = {}
    for key, prev in previous.items():
        new = target[key]
        if prev.dtype == torch.bool:
            out[key] = prev | new
        else:
            mixed = (1 - weight) * prev.float() + weight * new.float()
            out[key] = mixed.to(prev.dtype)
    return out
