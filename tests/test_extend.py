"""Extend-video context builders: clean latents and indices against hand-built expectations from the input's tail."""

import pytest
import torch

from frame_pack.extend import (
    F1Extension,
    OriginalExtension,
    noise_draws_to_skip,
    original_extension_context,
    resolve_context_frames,
)
from frame_pack.sections import plan_sections

H = W = 2


def frames(count, offset=0):
    """(1, 16, count, H, W) whose frame i is filled with offset + i + 1 (never zero, so zeros mean "empty")."""
    values = torch.arange(offset + 1, offset + count + 1, dtype=torch.float32)
    return values.view(1, 1, count, 1, 1).expand(1, 16, count, H, W).clone()


def zeros(count):
    return torch.zeros(1, 16, count, H, W)


def cat(*parts):
    return torch.cat(parts, dim=2)


def ids(t):
    return t.tolist()


def test_f1_extension_continues_like_f1_history():
    lws = 9
    x = frames(5)
    ext = F1Extension(x)
    (plan,) = plan_sections(1, lws, f1=True)
    indices, clean = ext.section_inputs(plan)
    assert ids(indices.clean_latent_indices) == [0, 19] and ids(indices.latent_indices) == list(range(20, 29))
    assert torch.equal(clean.clean_latents, cat(x[:, :, :1], x[:, :, 4:5]))  # start = first frame, 1x = last
    assert torch.equal(clean.clean_latents_2x, x[:, :, 2:4])
    assert torch.equal(clean.clean_latents_4x, cat(zeros(14), x[:, :, 0:2]))

    generated = frames(lws, offset=100)
    ext.add(plan, generated)
    _, clean = ext.section_inputs(plan_sections(2, lws, f1=True)[1])
    assert torch.equal(clean.clean_latents, cat(x[:, :, :1], generated[:, :, 8:9]))
    assert torch.equal(clean.clean_latents_2x, generated[:, :, 6:8])
    assert torch.equal(clean.clean_latents_4x, cat(zeros(5), x, generated[:, :, :6]))
    assert torch.equal(ext.video_latent(), cat(x, generated))


def test_f1_context_frames_hides_older_input_frames():
    x = frames(5)
    ext = F1Extension(x, context_frames=2)
    _, clean = ext.section_inputs(plan_sections(1, 9, f1=True)[0])
    assert torch.equal(clean.clean_latents, cat(x[:, :, :1], x[:, :, 4:5]))  # the start slot keeps frame 0
    assert torch.equal(clean.clean_latents_2x, cat(zeros(1), x[:, :, 3:4]))
    assert torch.equal(clean.clean_latents_4x, zeros(16))
    assert torch.equal(ext.video_latent(), x)


@pytest.mark.parametrize("with_end", [False, True])
def test_original_one_section_uses_the_last_frame_and_the_tail(with_end):
    lws, x = 3, frames(6)
    end = frames(1, offset=50) if with_end else None
    ext = OriginalExtension(x, lws, context_frames=5, end_latent=end)
    (plan,) = plan_sections(1, lws)
    indices, clean = ext.section_inputs(plan)
    # [pre 1, blank 0, latent 3, post 1, 2x 2, 4x 3]
    assert ids(indices.clean_latent_indices) == [0, 4] and ids(indices.latent_indices) == [1, 2, 3]
    assert ids(indices.clean_latent_2x_indices) == [5, 6] and ids(indices.clean_latent_4x_indices) == [7, 8, 9]
    assert torch.equal(clean.clean_latents, cat(x[:, :, 5:6], end if with_end else zeros(1)))
    assert torch.equal(clean.clean_latents_2x, x[:, :, 3:5])
    assert torch.equal(clean.clean_latents_4x, x[:, :, 0:3])
    generated = frames(lws, offset=100)
    ext.add(plan, generated)
    assert torch.equal(ext.video_latent(), cat(x, generated))


@pytest.mark.parametrize("with_end", [False, True])
def test_original_two_sections(with_end):
    lws, x = 3, frames(6)
    end = frames(1, offset=50) if with_end else None
    ext = OriginalExtension(x, lws, context_frames=5, end_latent=end)
    last, first = plan_sections(2, lws)  # generation order: new section 1 (padding 1), then new section 0
    assert (last.section_index, last.latent_padding, first.section_index) == (1, 1, 0)

    indices, clean = ext.section_inputs(last)
    post = 1 if with_end else 4
    # [pre 4, blank 3, latent 3, post (1 end frame, or 4), 2x 1, 4x 1]
    assert ids(indices.latent_indices) == [7, 8, 9]
    assert ids(indices.clean_latent_indices) == [0, 1, 2, 3, *range(10, 10 + post)]
    assert ids(indices.clean_latent_2x_indices) == [10 + post]
    assert ids(indices.clean_latent_4x_indices) == [11 + post]
    assert torch.equal(clean.clean_latents, cat(x[:, :, 2:6], end if with_end else zeros(4)))
    assert torch.equal(clean.clean_latents_2x, x[:, :, 1:2])
    assert torch.equal(clean.clean_latents_4x, x[:, :, 0:1])
    g1 = frames(lws, offset=100)
    ext.add(last, g1)

    indices, clean = ext.section_inputs(first)
    assert ids(indices.clean_latent_indices) == [0, 4] and ids(indices.latent_indices) == [1, 2, 3]
    assert torch.equal(clean.clean_latents, cat(x[:, :, 5:6], g1[:, :, 0:1]))  # post = the section after it
    assert torch.equal(clean.clean_latents_2x, x[:, :, 3:5])
    assert torch.equal(clean.clean_latents_4x, x[:, :, 0:3])
    g0 = frames(lws, offset=200)
    ext.add(first, g0)
    assert torch.equal(ext.video_latent(), cat(x, g0, g1))


@pytest.mark.parametrize("input_frames", [2, 3, 4, 7, 30])
@pytest.mark.parametrize("context_frames", [2, 5, 10])
@pytest.mark.parametrize("sections", [1, 3, 6])
def test_original_tensor_lengths_always_match_their_indices(input_frames, context_frames, sections):
    lws = 2
    ext = OriginalExtension(frames(input_frames), lws, context_frames=context_frames, end_latent=frames(1))
    for plan in plan_sections(sections, lws):
        indices, clean = ext.section_inputs(plan)
        assert clean.clean_latents.shape[2] == len(indices.clean_latent_indices)
        assert clean.clean_latents_2x.shape[2] == len(indices.clean_latent_2x_indices)
        assert clean.clean_latents_4x.shape[2] == len(indices.clean_latent_4x_indices)
        all_indices = torch.cat([indices.latent_indices, indices.clean_latent_indices,
                                 indices.clean_latent_2x_indices, indices.clean_latent_4x_indices])  # fmt: skip
        assert sorted(all_indices.tolist()) == sorted(set(all_indices.tolist()))  # no position used twice
        ext.add(plan, frames(lws, offset=1000))
    assert ext.video_latent().shape[2] == input_frames + sections * lws


def test_short_input_repeats_its_oldest_frame():
    x = frames(2)
    indices, clean = original_extension_context(
        x, x, next_to_input=True, sampled_first=True, latent_padding=0, latent_window_size=3, context_frames=5
    )
    assert torch.equal(clean.clean_latents_4x, x[:, :, :1]) and torch.equal(clean.clean_latents_2x, x[:, :, :1])
    assert torch.equal(clean.clean_latents, cat(x[:, :, 1:2], zeros(1)))


def test_context_frame_bounds_and_noise_skip():
    assert resolve_context_frames(None, f1=True) == 19 and resolve_context_frames(None, f1=False) == 5
    assert resolve_context_frames(10, f1=False) == 10 and resolve_context_frames(1, f1=True) == 1
    for value, f1 in ((1, False), (11, False), (0, True), (20, True)):
        with pytest.raises(ValueError, match="between"):
            resolve_context_frames(value, f1=f1)
    assert [noise_draws_to_skip(t, 9) for t in (2, 10, 18, 19, 28)] == [0, 1, 1, 2, 3]
