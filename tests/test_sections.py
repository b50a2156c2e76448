import pytest
import torch

from frame_pack.sections import (
    HISTORY_FRAMES,
    OneFrameOptions,
    cached_section_clean_latents,
    clean_latents_from_history,
    decode_chunk_ranges,
    decode_overlap_frames,
    decode_sections,
    default_latent_paddings,
    f1_indices,
    history_for_section,
    inverted_indices,
    new_history,
    one_frame_clean_latents,
    one_frame_indices,
    parse_latent_paddings,
    parse_one_frame_options,
    parse_section_spec,
    plan_sections,
    resolve_latent_paddings,
    section_frames,
    section_latent_frames,
    section_target,
    select_section_key,
    soft_append,
    soft_append_weights,
    total_sections,
    update_history,
    video_latent_frames,
    video_latent_from_history,
    video_pixel_frames,
    video_seconds_for_sections,
)
from hunyuan_model.frame_math import latent_frames, pixel_frames, sections_in_latent

LWS = 9
H = W = 2


def r(a, b):
    return list(range(a, b))


def lists(indices):
    return (
        indices.latent_indices.tolist(),
        indices.clean_latent_indices.tolist(),
        None if indices.clean_latent_2x_indices is None else indices.clean_latent_2x_indices.tolist(),
        None if indices.clean_latent_4x_indices is None else indices.clean_latent_4x_indices.tolist(),
    )


def video(sections, lws=LWS, seed=0):
    """A recognisable latent video: frame t is filled with t + 1 (zeros stay distinguishable), plus noise."""
    frames = video_latent_frames(sections, lws)
    base = torch.arange(1, frames + 1, dtype=torch.float32).view(1, 1, -1, 1, 1)
    noise = 0.01 * torch.randn(1, 16, frames, H, W, generator=torch.Generator().manual_seed(seed))
    return base + noise


def frame_ids(latents):
    """Frame t of ``video`` -> t; zero frames -> -1."""
    means = latents[0, 0].mean(dim=(1, 2))
    return [int(round(m.item())) - 1 if abs(m.item()) > 0.5 else -1 for m in means]


# ------------------------------------------------------------------------------------------------ counts


def test_total_sections():
    assert total_sections(5.0, 9) == 4  # 150 / 36 = 4.17
    assert total_sections(60.0, 9) == 50
    assert total_sections(0.1, 9) == 1
    assert total_sections(3.0, 9) == 2  # 2.5 rounds half to even
    assert total_sections(5.0, 9, video_sections=7) == 7
    with pytest.raises(ValueError):
        total_sections(5.0, 9, video_sections=0)
    assert video_seconds_for_sections(4, 9, 30) == pytest.approx(145 / 30)


def test_frame_counts():
    assert section_frames(9) == 33 and section_latent_frames(9) == 9
    assert section_latent_frames(5) == 5
    assert video_latent_frames(4, 9) == 37 and video_pixel_frames(4, 9) == 145
    assert pixel_frames(19) == 73 and latent_frames(73) == 19
    assert sections_in_latent(37, 9) == 4 and sections_in_latent(19, 9) == 2
    assert sections_in_latent(9, 9) == 0 and decode_sections(9, 9) == 1
    assert sections_in_latent(40, 9) == 4


# ------------------------------------------------------------------------------------------------ paddings


def test_default_paddings():
    expected = {
        1: [0],
        2: [1, 0],
        3: [2, 1, 0],
        4: [3, 2, 1, 0],
        5: [3, 2, 2, 1, 0],
        6: [3, 2, 2, 2, 1, 0],
        7: [3, 2, 2, 2, 2, 1, 0],
        8: [3, 2, 2, 2, 2, 2, 1, 0],
    }
    for n, paddings in expected.items():
        assert default_latent_paddings(n) == paddings
    assert default_latent_paddings(50) == [3] + [2] * 47 + [1, 0]


def test_parse_latent_paddings():
    assert parse_latent_paddings(None) is None
    assert parse_latent_paddings("0,0,0,0") == [0, 0, 0, 0]
    assert parse_latent_paddings(" 3, 1 ") == [3, 1]
    with pytest.raises(ValueError, match="'x'"):
        parse_latent_paddings("1,x")
    with pytest.raises(ValueError, match=">= 0"):
        parse_latent_paddings("1,-1")


def test_resolve_latent_paddings():
    assert resolve_latent_paddings(4, [0, 0, 0, 0]) == [0, 0, 0, 0]
    assert resolve_latent_paddings(2, [0, 0, 0, 0]) == [0, 0]  # longer: truncated
    assert resolve_latent_paddings(3, [0]) == [0, 1, 0]  # shorter, <= 4 sections: no crash
    assert resolve_latent_paddings(4, [1, 1]) == [1, 1, 1, 0]
    assert resolve_latent_paddings(6, [1, 1]) == [1, 1, 2, 2, 1, 0]
    assert resolve_latent_paddings(1, []) == [0]


# ------------------------------------------------------------------------------------------------ indices / plans


def test_inverted_indices_examples():
    assert lists(inverted_indices(9, 0)) == (r(1, 10), [0, 10], [11, 12], r(13, 29))
    assert lists(inverted_indices(9, 3)) == (r(28, 37), [0, 37], [38, 39], r(40, 56))  # P = 27
    assert lists(inverted_indices(9, 1)) == (r(10, 19), [0, 19], [20, 21], r(22, 38))  # caching example, section 1


def test_f1_indices_example():
    assert lists(f1_indices(9)) == (r(20, 29), [0, 19], [17, 18], r(1, 17))


def test_batched_indices():
    batched = inverted_indices(9, 0).batched()
    assert batched["latent_indices"].shape == (1, 9)
    assert batched["clean_latent_indices"].tolist() == [[0, 10]]
    assert batched["clean_latent_4x_indices"].shape == (1, 16)
    assert inverted_indices(9, 0).batched(3)["clean_latent_2x_indices"].shape == (3, 2)
    assert all(t.dtype == torch.int64 for t in batched.values())


def test_plan_inverted():
    plans = plan_sections(4, 9)
    assert [p.section_index for p in plans] == [3, 2, 1, 0]
    assert [p.section_index_from_last for p in plans] == [-1, -2, -3, -4]
    assert [p.latent_padding for p in plans] == [3, 2, 1, 0]
    assert [p.prepends_start_latent for p in plans] == [False, False, False, True]
    assert [p.latent_range for p in plans] == [(28, 37), (19, 28), (10, 19), (1, 10)]
    assert lists(plans[0].indices) == lists(inverted_indices(9, 3))
    forced = plan_sections(4, 9, latent_paddings=[0, 0, 0, 0])
    assert all(lists(p.indices)[0] == r(1, 10) for p in forced)


def test_plan_f1_ignores_paddings():
    plans = plan_sections(4, 9, f1=True, latent_paddings=[0, 0, 0, 0, 5])
    assert [p.section_index for p in plans] == [0, 1, 2, 3]
    assert [p.section_index_from_last for p in plans] == [-4, -3, -2, -1]
    assert all(p.latent_padding == 0 and not p.prepends_start_latent for p in plans)
    assert all(lists(p.indices) == lists(f1_indices(9)) for p in plans)
    with pytest.raises(ValueError):
        plan_sections(0, 9)


# ------------------------------------------------------------------------------------------------ history


def simulate_generation(sections, f1, lws=LWS, end_latent=None, paddings=None):
    """Run the section loop with a fake sampler that returns the ground-truth frames of a known video.

    Returns (video latent, final history latent, [(plan, clean latents seen by the model, history before)]).
    """
    truth = video(sections, lws)
    start = truth[:, :, :1]
    history = new_history(start, f1=f1, end_latent=end_latent)
    seen = []
    for plan in plan_sections(sections, lws, f1=f1, latent_paddings=paddings):
        clean = clean_latents_from_history(history, start, f1=f1)
        seen.append((plan, clean, history))
        generated = section_target(truth, plan)
        assert generated.shape[2] == lws
        history = update_history(history, generated, plan, start)
    return truth, video_latent_from_history(history, f1=f1), seen


@pytest.mark.parametrize("f1", [False, True])
@pytest.mark.parametrize("sections", [1, 2, 3, 5])
def test_generation_reassembles_the_video(sections, f1):
    truth, result, _ = simulate_generation(sections, f1)
    assert result.shape[2] == video_latent_frames(sections, LWS) == LWS * sections + 1
    assert torch.equal(result, truth)
    assert pixel_frames(result.shape[2]) == 4 * LWS * sections + 1


@pytest.mark.parametrize("f1", [False, True])
@pytest.mark.parametrize("sections", [1, 2, 3, 5])
def test_caching_sees_what_generation_sees(sections, f1):
    truth, _, seen = simulate_generation(sections, f1)
    for plan, clean, history in seen:
        assert torch.equal(history_for_section(truth, plan), history)
        cached = cached_section_clean_latents(truth, plan)
        assert torch.equal(cached.clean_latents, clean.clean_latents)
        assert torch.equal(cached.clean_latents_2x, clean.clean_latents_2x)
        assert torch.equal(cached.clean_latents_4x, clean.clean_latents_4x)
        assert cached.clean_latents.shape == (1, 16, 2, H, W)
        assert cached.clean_latents_2x.shape == (1, 16, 2, H, W)
        assert cached.clean_latents_4x.shape == (1, 16, 16, H, W)


def test_end_latent_slot():
    end = torch.full((1, 16, 1, H, W), -7.0)
    truth, result, seen = simulate_generation(2, f1=False, end_latent=end)
    assert torch.equal(result, truth)
    first_plan, first_clean, _ = seen[0]
    assert torch.equal(first_clean.clean_latents[:, :, 1:], end)  # last section sees the end image as "post"
    assert torch.equal(first_clean.clean_latents[:, :, :1], truth[:, :, :1])
    for plan, _, history in seen:
        assert torch.equal(history_for_section(truth, plan, end_latent=end), history)
    assert not new_history(truth[:, :, :1], f1=True, end_latent=end).eq(-7.0).any()  # F1 ignores it


def test_inverted_caching_worked_example():
    """lws 9, 73 frames (19 latents, 2 sections): section 1 has only zeros; section 0 sees frames 10.. ."""
    truth = video(2)
    plans = plan_sections(2, 9)
    assert [p.section_index for p in plans] == [1, 0] and [p.latent_padding for p in plans] == [1, 0]
    c1 = cached_section_clean_latents(truth, plans[0])
    assert frame_ids(c1.clean_latents) == [0, -1] and frame_ids(c1.clean_latents_2x) == [-1, -1]
    assert frame_ids(c1.clean_latents_4x) == [-1] * 16
    assert frame_ids(section_target(truth, plans[0])) == r(10, 19)
    c0 = cached_section_clean_latents(truth, plans[1])
    assert frame_ids(c0.clean_latents) == [0, 10]
    assert frame_ids(c0.clean_latents_2x) == [11, 12]
    assert frame_ids(c0.clean_latents_4x) == r(13, 19) + [-1] * 10
    assert frame_ids(section_target(truth, plans[1])) == r(1, 10)


def test_f1_caching_worked_example():
    truth = video(2)
    plans = plan_sections(2, 9, f1=True)
    c0 = cached_section_clean_latents(truth, plans[0])
    assert frame_ids(c0.clean_latents) == [0, 0]
    assert frame_ids(c0.clean_latents_2x) == [-1, -1] and frame_ids(c0.clean_latents_4x) == [-1] * 16
    c1 = cached_section_clean_latents(truth, plans[1])
    assert frame_ids(c1.clean_latents_4x) == [-1] * 9 + r(0, 7)
    assert frame_ids(c1.clean_latents_2x) == [7, 8]
    assert frame_ids(c1.clean_latents) == [0, 9]
    assert frame_ids(section_target(truth, plans[1])) == r(10, 19)


def test_section_start_latent_and_dtype():
    truth = video(3).half()
    plan = plan_sections(3, 9)[1]
    history = history_for_section(truth, plan)
    assert history.dtype == torch.float16 and history.shape[2] == truth.shape[2] - plan.latent_range[1] + HISTORY_FRAMES
    other_start = torch.full((1, 16, 1, H, W), 42.0)
    clean = clean_latents_from_history(new_history(other_start, f1=False), other_start, f1=False)
    assert clean.clean_latents.dtype == torch.float32 and clean.clean_latents[:, :, 0].eq(42.0).all()


# ------------------------------------------------------------------------------------------------ one-frame


def test_parse_one_frame_options():
    assert parse_one_frame_options("default") == OneFrameOptions()
    opts = parse_one_frame_options(" no_2x , no_4x,no_post, target_index=1, control_index=0;10,no_2x")
    assert opts == OneFrameOptions(no_2x=True, no_4x=True, no_post=True, target_index=1, control_indices=(0, 10))
    assert parse_one_frame_options("target_index = 5").target_index == 5
    with pytest.raises(ValueError, match="unknown one-frame option 'zero_post'"):
        parse_one_frame_options("zero_post,no_4x")
    with pytest.raises(ValueError, match=r"'target_index=-5'.*>= 0"):
        parse_one_frame_options("target_index=-5")
    with pytest.raises(ValueError, match="target_index=x"):
        parse_one_frame_options("target_index=x")
    with pytest.raises(ValueError, match="control_index=0;a"):
        parse_one_frame_options("control_index=0;a")
    with pytest.raises(ValueError, match="twice"):
        parse_one_frame_options("target_index=1,target_index=2")


def test_one_frame_indices_default():
    indices = one_frame_indices(9, 0, OneFrameOptions())
    assert lists(indices) == ([9], [0, 10], [11, 12], r(13, 29))
    batched = indices.batched()
    assert batched["latent_indices"].tolist() == [[9]]
    assert batched["clean_latent_2x_indices"].shape == (1, 2)  # musubi-tuner passed 1-D tensors here
    assert batched["clean_latent_4x_indices"].shape == (1, 16)


def test_one_frame_methods():
    kisekaeichi = parse_one_frame_options("target_index=1,control_index=0;10,no_post,no_2x,no_4x")
    assert lists(one_frame_indices(9, 2, kisekaeichi)) == ([1], [0, 10], None, None)
    mc = parse_one_frame_options("target_index=9,control_index=0;1,no_2x,no_4x")
    assert lists(one_frame_indices(9, 2, mc)) == ([9], [0, 1, 10], None, None)
    basic_cache = OneFrameOptions(target_index=9, control_indices=(0,))  # fp_1f_clean_indices [0]
    assert lists(one_frame_indices(9, 1, basic_cache)) == ([9], [0, 10], [11, 12], r(13, 29))
    more_than_slots = OneFrameOptions(no_post=True, control_indices=(3, 4, 5))
    assert one_frame_indices(9, 2, more_than_slots).clean_latent_indices.tolist() == [3, 4]


def test_one_frame_clean_latents():
    empty = one_frame_clean_latents([], OneFrameOptions(), (H, W))
    assert empty.clean_latents.shape == (1, 16, 2, H, W) and not empty.clean_latents.any()
    assert empty.clean_latents_2x.shape == (1, 16, 2, H, W) and not empty.clean_latents_2x.any()
    assert empty.clean_latents_4x.shape == (1, 16, 16, H, W) and not empty.clean_latents_4x.any()
    controls = [torch.ones(1, 16, 1, H, W), 2 * torch.ones(1, 16, 1, H, W)]
    opts = OneFrameOptions(no_post=True, no_2x=True, no_4x=True)
    clean = one_frame_clean_latents(controls, opts, (H, W))
    assert clean.clean_latents[0, 0, :, 0, 0].tolist() == [1.0, 2.0]
    assert clean.clean_latents_2x is None and clean.clean_latents_4x is None
    with_post = one_frame_clean_latents(controls, OneFrameOptions(), (H, W))
    assert with_post.clean_latents[0, 0, :, 0, 0].tolist() == [1.0, 2.0, 0.0]
    assert set(with_post.as_kwargs()) == {"clean_latents", "clean_latents_2x", "clean_latents_4x"}


# ------------------------------------------------------------------------------------------------ section specs


def test_section_strings_basic():
    assert parse_section_spec("a cat: walking") == {0: "a cat: walking"}
    assert parse_section_spec("0:a;;;1:b;;;-1:c") == {0: "a", 1: "b", -1: "c"}
    assert parse_section_spec("0-2:a;;;3:b") == {0: "a", 1: "a", 2: "a", 3: "b"}
    assert parse_section_spec("-3-1:x;;;") == {-3: "x", -2: "x", -1: "x", 0: "x", 1: "x"}
    assert parse_section_spec("-3--1:x;;;0:y") == {-3: "x", -2: "x", -1: "x", 0: "y"}
    assert parse_section_spec("plain ;;;1:b") == {0: "plain", 1: "b"}
    assert parse_section_spec("0:a;;;") == {0: "a"}  # empty parts skipped
    assert parse_section_spec(":x;;;2:y") == {0: "x", 2: "y"}


def test_section_strings_index0_fallback():
    assert parse_section_spec("2:a;;;1:b") == {2: "a", 1: "b", 0: "b"}
    assert parse_section_spec("-1:a;;;-3:b") == {-1: "a", -3: "b", 0: "b"}
    assert parse_section_spec("-1:a;;;3:b")[0] == "b"  # non-negative preferred


def test_section_strings_keep_non_spec_prefix():
    paths = parse_section_spec(r"C:\img\start.png;;;-1:D:\img\end.png")
    assert paths == {0: r"C:\img\start.png", -1: r"D:\img\end.png"}
    assert parse_section_spec("Scene: dawn;;;1:noon") == {0: "Scene: dawn", 1: "noon"}


def test_section_strings_bad_specs():
    with pytest.raises(ValueError, match="3-1"):
        parse_section_spec("3-1:a;;;0:b")
    with pytest.raises(ValueError, match="1-2-3"):
        parse_section_spec("1-2-3:a;;;0:b")
    with pytest.raises(ValueError):
        parse_section_spec(";;;")


def test_section_strings_duplicates_and_huge_indices_are_refused():
    with pytest.raises(ValueError, match=r"section 0 is given twice .*'0:a'.*'0:b'"):
        parse_section_spec("0:a;;;0:b")
    with pytest.raises(ValueError, match="section 2 is given twice"):
        parse_section_spec("0-3:a;;;2:b")
    with pytest.raises(ValueError, match=r"section spec '0-100000000'.*<= 999"):
        parse_section_spec("0-100000000:a;;;1:b")
    with pytest.raises(ValueError, match="section spec '99999999999999999999'"):
        parse_section_spec("99999999999999999999:a;;;1:b")
    assert parse_section_spec("-1000-999:a;;;") == dict.fromkeys(range(-1000, 1000), "a")


def test_select_section_key():
    entries = parse_section_spec("0:a;;;1:b;;;-1:c")
    plans = plan_sections(3, 9)  # sections 2, 1, 0
    keys = [select_section_key(entries, p.section_index, p.section_index_from_last) for p in plans]
    assert keys == [-1, 1, 0]
    assert select_section_key({0: "x"}, 5, -1) == 0
    assert select_section_key({0: "x", 2: "y", -1: "z"}, 2, -1) == -1  # negative wins


# ------------------------------------------------------------------------------------------------ decode


def test_decode_chunk_ranges():
    assert decode_overlap_frames(9) == 33
    assert decode_chunk_ranges(10, 9) == [(0, 10)]
    assert decode_chunk_ranges(28, 9) == [(19, 28), (10, 28), (0, 19)]
    assert decode_chunk_ranges(37, 9) == [(28, 37), (19, 37), (10, 28), (0, 19)]
    # the section count follows the latent, not --video_seconds (6 sections here)
    assert len(decode_chunk_ranges(video_latent_frames(6, 9), 9)) == 6


@pytest.mark.parametrize("sections", [1, 3, 4, 6])
def test_decode_blending_length(sections):
    latent_frames = video_latent_frames(sections, LWS)
    overlap = decode_overlap_frames(LWS)
    pixels = None
    for start, end in decode_chunk_ranges(latent_frames, LWS):
        decoded = torch.zeros(1, 3, pixel_frames(end - start), 1, 1)
        pixels = decoded if pixels is None else soft_append(decoded, pixels, overlap)
    assert pixels.shape[2] == video_pixel_frames(sections, LWS) == 4 * LWS * sections + 1


def test_soft_append_weights():
    w = soft_append_weights(33)
    assert w.shape == (33,) and w[0].item() == 1.0 and w[-1].item() == 0.0
    assert torch.allclose(w, torch.linspace(1, 0, 33))
    earlier = torch.ones(1, 3, 40, 1, 1, dtype=torch.float16)
    later = torch.zeros(1, 3, 50, 1, 1, dtype=torch.float16)
    out = soft_append(earlier, later, 33)
    assert out.shape[2] == 40 + 50 - 33 and out.dtype == torch.float16
    assert out[0, 0, :7, 0, 0].tolist() == [1.0] * 7
    assert torch.allclose(out[0, 0, 7:40, 0, 0].float(), torch.linspace(1, 0, 33), atol=1e-3)
    assert not out[0, 0, 40:].any()
    with pytest.raises(ValueError):
        soft_append(earlier[:, :, :10], later, 33)
