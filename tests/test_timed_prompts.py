"""Timed prompts ([0s: ...]): section -> prompt tables, blend weights, malformed tokens, a property test."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from frame_pack.sections import plan_sections, section_start_seconds
from frame_pack.timed_prompts import (
    SectionText,
    TimedPromptError,
    blend_schedule,
    blend_text_conditioning,
    is_timed_prompt,
    parse_timed_prompt,
    section_prompts,
)

LWS, FPS = 9, 30  # sections start every 36 / 30 = 1.2 s


def generation_table(prompt, sections, f1):
    """[(section index, prompt)] in generation order, as the sampling loop walks them."""
    prompts = section_prompts(prompt, sections, LWS, FPS)
    return [(p.section_index, prompts[p.section_index]) for p in plan_sections(sections, LWS, f1=f1)]


def test_section_start_times_are_exact_multiples_of_4_lws_over_fps():
    assert [section_start_seconds(k, LWS, FPS) for k in range(4)] == [
        0,
        Fraction(6, 5),
        Fraction(12, 5),
        Fraction(18, 5),
    ]
    assert section_start_seconds(2, LWS, FPS) == Fraction("2.4")
    assert section_start_seconds(3, 3, 24) == Fraction(36, 24)


ONE = "[0s: a cat sits]"
THREE = "[0s: a cat sits] [1.2s: the cat jumps]"
SEVEN = "[0s: a cat sits] [2s: the cat jumps] [3.5s-5s: the cat lands] a cat in a garden"


@pytest.mark.parametrize(
    "prompt, sections, f1, table",
    [
        (ONE, 1, True, [(0, "a cat sits")]),
        (ONE, 1, False, [(0, "a cat sits")]),
        (THREE, 3, True, [(0, "a cat sits"), (1, "the cat jumps"), (2, "the cat jumps")]),
        (THREE, 3, False, [(2, "the cat jumps"), (1, "the cat jumps"), (0, "a cat sits")]),
        (
            SEVEN,
            7,
            True,
            [
                (0, "a cat sits"),  # 0.0 s
                (1, "a cat sits"),  # 1.2 s
                (2, "the cat jumps"),  # 2.4 s
                (3, "the cat lands"),  # 3.6 s
                (4, "the cat lands"),  # 4.8 s
                (5, "a cat in a garden"),  # 6.0 s: after 5s, the text outside the brackets
                (6, "a cat in a garden"),  # 7.2 s
            ],
        ),
        (
            SEVEN,
            7,
            False,
            [
                (6, "a cat in a garden"),
                (5, "a cat in a garden"),
                (4, "the cat lands"),
                (3, "the cat lands"),
                (2, "the cat jumps"),
                (1, "a cat sits"),
                (0, "a cat sits"),
            ],
        ),
    ],
)
def test_section_to_prompt_table(prompt, sections, f1, table):
    assert generation_table(prompt, sections, f1) == table


def test_section_index_syntax_keeps_working_and_is_not_timed():
    assert not is_timed_prompt("0:a cat;;;-1:a dog")
    assert section_prompts("0:a cat;;;-1:a dog", 3, LWS, FPS) == ["a cat", "a cat", "a dog"]
    assert section_prompts("a [red] cat", 2, LWS, FPS) == ["a [red] cat"] * 2


def test_other_fps_and_window_move_the_section_starts():
    # lws 3 at 24 fps: sections start every 0.5 s
    assert section_prompts("[0s: a] [1s: b] [1.5s: c]", 4, 3, 24) == ["a", "a", "b", "c"]
    # lws 2 at 30 fps: section 4 starts at 16/15 s; a rounded time written from that is the same frame
    assert section_prompts("[0s: a] [1.0667s: b]", 5, 2, 30) == ["a", "a", "a", "a", "b"]


@pytest.mark.parametrize(
    "prompt, named",
    [
        ("[2: a cat]", "[2: a cat]"),
        ("[0s a cat]", "[0s a cat]"),
        ("[0s: ]", "[0s: ]"),
        ("[3s-2s: a cat]", "[3s-2s: a cat]"),
        ("[-1s: a cat]", "[-1s: a cat]"),
        ("[0s: a cat] [1.2s: jumps", "[1.2s: jumps"),
        ("[0s: a [big] cat]", "[0s: a "),
        ("[1girl] [0s: a cat]", "[1girl]"),
        ("[0s: a cat] x] y", "']'"),
        ("[0s: a] [1s-3s: b] [2s: c]", "[1s-3s: b]' and '[2s: c]"),
        ("[0s: a] [0s: b]", "[0s: a]' and '[0s: b]"),
        ("[0s: a] [9s: b]", "[9s: b]"),  # 3 sections end at 3.6 s
        ("[0s: a] [0.5s: b] [1.2s: c]", "[0.5s: b]"),  # no section starts in [0.5, 1.2)
        ("[1.2s: b]", "section 0"),  # nothing covers 0 s and there is no default text
        ("0:a;;;[2s: b]", ";;;"),
    ],
)
def test_malformed_tokens_are_rejected_by_name(prompt, named):
    with pytest.raises(TimedPromptError) as info:
        section_prompts(prompt, 3, LWS, FPS)
    assert named in str(info.value)


def test_parse_keeps_the_written_token_and_exact_times():
    timed = parse_timed_prompt("[2s: b] lead [0s-1.5s: a]")
    assert [(t.written, t.start, t.end, t.text) for t in timed.tokens] == [
        ("[0s-1.5s: a]", 0, Fraction(3, 2), "a"),
        ("[2s: b]", 2, None, "b"),
    ]
    assert timed.default == "lead"


def test_blend_weights():
    prompts = ["a", "a", "b", "b", "b", "c"]
    assert blend_schedule(prompts, 3) == [
        SectionText("a", "a", 1.0),
        SectionText("a", "a", 1.0),
        SectionText("a", "b", 1 / 3),
        SectionText("a", "b", 2 / 3),
        SectionText("b", "b", 1.0),
        SectionText("b", "c", 1 / 3),
    ]
    # a change inside a running blend starts over from the prompt being blended in
    assert [(s.previous, s.target, s.weight) for s in blend_schedule(["a", "b", "c", "c"], 4)] == [
        ("a", "a", 1.0),
        ("a", "b", 0.25),
        ("b", "c", 0.25),
        ("b", "c", 0.5),
    ]
    for n in (0, 1):
        assert all(not s.blended for s in blend_schedule(prompts, n))


def test_blend_text_conditioning_mixes_linearly_and_ors_the_masks():
    gen = torch.Generator().manual_seed(0)
    a = {"encoder_hidden_states": torch.randn(1, 6, 4, generator=gen), "pooled_projections": torch.randn(1, 3)}
    b = {"encoder_hidden_states": torch.randn(1, 6, 4, generator=gen), "pooled_projections": torch.randn(1, 3)}
    a["encoder_attention_mask"] = torch.tensor([[True, True, False, False, False, False]])
    b["encoder_attention_mask"] = torch.tensor([[True, True, True, True, False, False]])
    out = blend_text_conditioning(a, b, 0.25)
    for key in ("encoder_hidden_states", "pooled_projections"):
        assert torch.allclose(out[key], 0.75 * a[key] + 0.25 * b[key])
    assert out["encoder_attention_mask"].tolist() == [[True, True, True, True, False, False]]
    assert torch.equal(blend_text_conditioning(a, b, 1.0)["pooled_projections"], b["pooled_projections"])


# ---- property test -------------------------------------------------------------------------------------------

seconds = st.builds(lambda whole, frac: f"{whole}" + (f".{frac}" if frac is not None else ""),
                    st.integers(0, 12), st.one_of(st.none(), st.integers(0, 99)))  # fmt: skip
texts = st.text(alphabet="abc xyz,.!:-", min_size=0, max_size=8)


@st.composite
def timed_prompt_strings(draw):
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        start = draw(seconds)
        end = draw(st.one_of(st.none(), seconds))
        span = f"{start}s" if end is None else f"{start}s-{end}s"
        space = draw(st.sampled_from(["", " "]))
        parts.append(f"[{space}{span}{space}:{space}{draw(texts)}]")
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), draw(texts))
    return " ".join(parts)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(timed_prompt_strings(), st.integers(1, 8), st.integers(1, 9), st.sampled_from([8, 24, 30, 60]))
def test_random_well_formed_timestamps_only_ever_raise_the_validation_error(prompt, sections, lws, fps):
    try:
        prompts = section_prompts(prompt, sections, lws, fps)
    except TimedPromptError:
        return
    timed = parse_timed_prompt(prompt)
    allowed = {t.text for t in timed.tokens} | {timed.default}
    assert len(prompts) == sections and set(prompts) <= allowed

    def frame(t):  # times compare at the nearest frame
        return math.floor(t * fps + Fraction(1, 2))

    for k, p in enumerate(prompts):  # the latest token starting at or before the section, unless it has ended
        start = frame(section_start_seconds(k, lws, fps))
        later = [t for t in timed.tokens if frame(t.start) <= start]
        ended = later and later[-1].end is not None and start >= frame(later[-1].end)
        expected = later[-1].text if later and not ended else timed.default
        assert p == expected


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 9), st.sampled_from([24, 30]), st.data())
def test_one_token_per_chosen_section_start_maps_exactly(sections, lws, fps, data):
    chosen = sorted(set(data.draw(st.lists(st.integers(0, sections - 1), min_size=1, max_size=sections))) | {0})
    tokens = " ".join(f"[{float(section_start_seconds(k, lws, fps))!r}s: p{k}]" for k in chosen)
    expected = [f"p{max(c for c in chosen if c <= k)}" for k in range(sections)]
    assert section_prompts(tokens, sections, lws, fps) == expected
