"""--extend_video and timed prompts end to end on the tiny factory checkpoints."""

import numpy as np
import pytest
import torch

from pipelines import generate as G
from pipelines.latent_file import load_latent, save_latent
from pipelines.models import ModelCache
from tests.factory.datasets import write_start_image
from tests.test_generate import LWS, H, W, count_dit_calls, files, run
from utils.video_io import read_video_frames, read_video_metadata, save_video


@pytest.fixture(scope="module")
def start_image(tmp_path_factory):
    return write_start_image(tmp_path_factory.mktemp("images") / "start.png")


def saved_input(tmp_path, frames, seed=0, name="input.safetensors"):
    latent = torch.randn(1, 16, frames, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))
    return save_latent(latent, str(tmp_path / name), {"seeds": "0"}), latent[0]


def extend(models, out, source, *extra):
    run(
        models, out, "--extend_video", source, "--prompt", "a red box", "--seed", "3", "--output_type", "latent", *extra
    )
    (path,) = files(out, ".safetensors")
    return path


def cat(*parts):
    return torch.cat(parts, dim=2)


def test_f1_extension_by_one_section_keeps_the_input_and_feeds_its_tail(models, tmp_path, monkeypatch):
    source, x = saved_input(tmp_path, 5)
    calls = count_dit_calls(monkeypatch)
    path = extend(models, tmp_path / "out", source, "--f1", "--latent_window_size", "9", "--video_sections", "1")
    latent, meta = load_latent(path)
    assert latent.shape == (16, 5 + 9, H // 8, W // 8)
    assert torch.equal(latent[:, :5], x)  # the input part, bit for bit
    assert (meta["extend_video"], meta["extend_video_latent_frames"], meta["extend_context_frames"]) == (
        source,
        "5",
        "19",
    )
    x = x[None]
    for call in calls:  # F1's own continuation: start = first input frame, 4x/2x/1x = last 19 of [zeros(19), input]
        assert call["clean_latent_indices"].tolist() == [[0, 19]]
        assert call["latent_indices"].tolist() == [list(range(20, 29))]
        assert torch.equal(call["clean_latents"].float(), cat(x[:, :, :1], x[:, :, 4:5]))
        assert torch.equal(call["clean_latents_2x"].float(), x[:, :, 2:4])
        assert torch.equal(call["clean_latents_4x"].float(), cat(torch.zeros(1, 16, 14, H // 8, W // 8), x[:, :, :2]))


def test_f1_extension_continues_like_f1_generation_and_composes(models, start_image, tmp_path):
    """Seed rule: an extension skips one noise draw per whole section of its input."""

    def generate(out, sections):
        run(models, out, "--image_path", start_image, "--prompt", "a red box", "--seed", "3", "--f1",
            "--video_sections", str(sections), "--output_type", "latent")  # fmt: skip
        (path,) = files(out, ".safetensors")
        return path

    one, two = generate(tmp_path / "one", 1), generate(tmp_path / "two", 2)
    extended = extend(models, tmp_path / "e1", one, "--f1", "--image_path", start_image, "--video_sections", "1")
    assert torch.equal(load_latent(extended)[0], load_latent(two)[0])  # = having generated 2 sections at once

    twice = extend(models, tmp_path / "e2", extended, "--f1", "--image_path", start_image, "--video_sections", "1")
    once = extend(models, tmp_path / "e12", one, "--f1", "--image_path", start_image, "--video_sections", "2")
    assert load_latent(once)[0].shape[1] == 1 + 3 * LWS
    assert torch.equal(load_latent(twice)[0], load_latent(once)[0])


def encoded_end_image(models, path, seed):
    """The end image's latent as an independent VAE encode (extensions encode no start image, so the end image is
    the first draw of the seeded VAE generator)."""
    from hunyuan_model.vae import encode_pixels, load_vae

    vae = load_vae(models.vae, dtype=torch.float32)
    pixels = G.pixels_to_tensor(G.read_section_image(path, H, W).pixels)
    return encode_pixels(vae, pixels, torch.Generator().manual_seed(seed)).float()


def test_original_extension_one_section_without_end_image(models, tmp_path, monkeypatch):
    source, x = saved_input(tmp_path, 6)
    calls = count_dit_calls(monkeypatch)
    latent, _ = load_latent(extend(models, tmp_path / "out", source, "--video_sections", "1"))
    assert latent.shape[1] == 6 + LWS and torch.equal(latent[:, :6], x)
    x = x[None]
    for call in calls:  # FramePack-Studio "Video": [pre 1, latent 3, post 1, 2x 2, 4x 3]
        assert call["clean_latent_indices"].tolist() == [[0, 4]]
        assert call["clean_latent_2x_indices"].tolist() == [[5, 6]]
        assert call["clean_latent_4x_indices"].tolist() == [[7, 8, 9]]
        assert torch.equal(call["clean_latents"].float(), cat(x[:, :, 5:6], torch.zeros_like(x[:, :, :1])))
        assert torch.equal(call["clean_latents_2x"].float(), x[:, :, 3:5])
        assert torch.equal(call["clean_latents_4x"].float(), x[:, :, 0:3])


def test_original_extension_two_sections_towards_an_end_image(models, start_image, tmp_path, monkeypatch):
    source, x = saved_input(tmp_path, 6)
    calls = count_dit_calls(monkeypatch)
    path = extend(models, tmp_path / "out", source, "--video_sections", "2", "--end_image_path", start_image,
                  "--infer_steps", "1")  # fmt: skip
    latent, _ = load_latent(path)
    assert latent.shape[1] == 6 + 2 * LWS and torch.equal(latent[:, :6], x)
    first, second = calls  # one step each: new section 1 (padding 1) is sampled first, then new section 0
    x, end = x[None], encoded_end_image(models, start_image, 3)
    # new section 1: [pre 4, blank 3, latent 3, post 1 = the end image, 2x 1, 4x 1]
    assert first["clean_latent_indices"].tolist() == [[0, 1, 2, 3, 10]]
    assert first["latent_indices"].tolist() == [[7, 8, 9]]
    assert (first["clean_latent_2x_indices"].tolist(), first["clean_latent_4x_indices"].tolist()) == ([[11]], [[12]])
    assert torch.equal(first["clean_latents"][:, :, :4].float(), x[:, :, 2:6])
    assert torch.allclose(first["clean_latents"][:, :, 4:].float(), end, atol=1e-5)
    assert torch.equal(first["clean_latents_2x"].float(), x[:, :, 1:2])
    assert torch.equal(first["clean_latents_4x"].float(), x[:, :, 0:1])
    # new section 0: pre = the input's last frame, post = the first frame of new section 1 (already sampled)
    assert second["clean_latent_indices"].tolist() == [[0, 4]]
    assert torch.equal(second["clean_latents"].float(), cat(x[:, :, 5:6], latent[None, :, 6 + LWS : 7 + LWS]))
    assert torch.equal(second["clean_latents_2x"].float(), x[:, :, 3:5])
    assert torch.equal(second["clean_latents_4x"].float(), x[:, :, 0:3])


def test_mp4_input_round_trips_through_the_vae(models, tmp_path):
    frames = np.zeros((9, H, W, 3), np.uint8)
    for i in range(9):
        frames[i, :, : 4 * (i + 1)] = 200
    source = save_video(frames, str(tmp_path / "clip.mp4"), 30)
    run(models, tmp_path / "out", "--extend_video", source, "--prompt", "a bar", "--seed", "1",
        "--video_sections", "1", "--output_type", "both", "--infer_steps", "1")  # fmt: skip
    (latent_path,), (video,) = files(tmp_path / "out", ".safetensors"), files(tmp_path / "out", ".mp4")
    latent, _ = load_latent(latent_path)
    assert latent.shape[1] == 3 + LWS  # 9 frames -> 3 latent frames, then one new section
    assert read_video_frames(video).shape == (4 * (3 + LWS - 1) + 1, H, W, 3)
    assert read_video_metadata(video)["extend_video"] == source


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("text_encoders", "image_encoder", "vae", "dit"):
        monkeypatch.setattr(ModelCache, name, refuse)


def bad_inputs(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 20)
    short = save_video(np.zeros((4, H, W, 3), np.uint8), str(tmp_path / "short.mp4"), 30)
    return [
        (str(garbage), "not a readable video"),
        (short, "4 frame(s); extending needs at least 5"),
        (save_latent(torch.zeros(16, 4, 8, 8), str(tmp_path / "size.safetensors"), None), "latent of 8x8"),
        (save_latent(torch.zeros(8, 4, 4, 6), str(tmp_path / "channels.safetensors"), None), r"(8, 4, 4, 6)"),
        (save_latent(torch.zeros(16, 1, 4, 6), str(tmp_path / "still.safetensors"), None), "1 latent frame(s)"),
    ]


def test_every_bad_input_is_refused_naming_the_file_before_any_model_loads(models, tmp_path, monkeypatch, capsys):
    no_model_loads(monkeypatch)
    for path, message in bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as info:
            run(models, tmp_path / "out", "--extend_video", path, "--prompt", "p", "--video_sections", "1")
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"--extend_video {path}" in err and message in err, err


def test_bad_inline_ev_fails_its_line_only(models, tmp_path, monkeypatch, capsys):
    no_model_loads(monkeypatch)
    still = save_latent(torch.zeros(16, 1, 4, 6), str(tmp_path / "still.safetensors"), None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --ev {still}\n[0s: a] [0.5s: b] [0.7s: c] --ev {still}\n")
    with pytest.raises(SystemExit) as info:  # no line of the file can run: refused before any model loads
        run(models, tmp_path / "out", "--from_file", str(prompts), check=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"line 1: --ev {still}" in err
    assert "line 2: prompt: timed prompt token '[0.5s: b]'" in err


def test_flag_checks(models, tmp_path, capsys):
    source, _ = saved_input(tmp_path, 4)
    for extra, message in [
        (["--extend_context_frames", "11"], "--extend_context_frames: must be between 2 and 10"),
        (["--extend_context_frames", "20", "--f1"], "between 1 and 19 for F1"),
        (["--one_frame_inference", "default"], "cannot be combined with --one_frame_inference"),
        (["--prompt", "0:a;;;[1s: b]"], "do not mix"),
    ]:
        with pytest.raises(SystemExit):
            run(models, tmp_path / "out", "--extend_video", source, "--prompt", "p", *extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(models, tmp_path / "out", "--image_path", source, "--prompt", "p", "--extend_context_frames", "3")
    assert "--extend_context_frames needs --extend_video" in capsys.readouterr().err


def test_timed_prompts_with_blending_reach_the_dit(models, start_image, tmp_path, monkeypatch):
    calls = count_dit_calls(monkeypatch)
    # lws 3 at 30 fps: sections start at 0, 0.4, 0.8 s; F1 samples them in time order, one step each
    run(models, tmp_path, "--image_path", start_image, "--f1", "--video_sections", "3", "--infer_steps", "1",
        "--prompt", "[0s: a red box] [0.4s: a blue ball on the grass]", "--prompt_blend_sections", "2",
        "--output_type", "latent")  # fmt: skip
    pooled = [c["pooled_projections"].float() for c in calls]
    assert not torch.allclose(pooled[0], pooled[2])
    assert torch.allclose(pooled[1], (pooled[0] + pooled[2]) / 2, atol=2e-2)  # section 1: weight 1/2 of the new one
    masks = [c["encoder_attention_mask"] for c in calls]
    assert torch.equal(masks[1], masks[0] | masks[2])


def test_prompt_file_line_extends_with_ev_and_a_timed_prompt(models, tmp_path):
    source, x = saved_input(tmp_path, 4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"[0s: a red box] [0.4s: a blue box] --ev {source} --vs 2\n")
    run(models, tmp_path / "out", "--from_file", str(prompts), "--extend_context_frames", "3",
        "--output_type", "latent", "--infer_steps", "1")  # fmt: skip
    (path,) = files(tmp_path / "out", ".safetensors")
    latent, meta = load_latent(path)
    assert latent.shape[1] == 4 + 2 * LWS and torch.equal(latent[:, :4], x)
    assert (meta["extend_video"], meta["extend_context_frames"]) == (source, "3")
