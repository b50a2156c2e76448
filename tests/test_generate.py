"""fpack_generate_video.py end to end on the tiny factory checkpoints."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked
from pipelines import generate as G
from pipelines.generate_args import build_parser, parse_prompt_line
from pipelines.latent_file import load_latent
from tests.factory.datasets import write_start_image
from utils.video_io import read_video_frames, read_video_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LWS = 3  # small windows keep runs fast; the layout rules do not depend on it
H, W = 32, 48


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [write_start_image(folder / f"img{i}.png", i) for i in range(3)]


def run(models, out, *extra, check=True):
    argv = [
        *models.flags(),
        "--video_size", str(H), str(W),
        "--latent_window_size", str(LWS),
        "--infer_steps", "2",
        "--save_path", str(out),
        *extra,
    ]  # fmt: skip
    code = G.main(argv)
    if check:
        assert code == 0
    return code


def files(folder, suffix):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffix))


def pixel_frames(sections):
    return 4 * LWS * sections + 1


@pytest.mark.parametrize(
    "extra, sections",
    [
        (["--video_sections", "1"], 1),
        (["--video_sections", "3"], 3),
        (["--video_sections", "3", "--f1"], 3),
        (["--video_seconds", "0.8"], 2),  # round(0.8·30 / (4·3)) = 2
    ],
)
def test_video_frame_count_is_4_lws_sections_plus_1(models, images, tmp_path, extra, sections):
    run(models, tmp_path, "--image_path", images[0], "--prompt", "a red box", "--seed", "7", *extra)
    (video,) = files(tmp_path, ".mp4")
    assert os.path.basename(video).endswith("_7_.mp4")
    frames = read_video_frames(video)
    assert frames.shape == (pixel_frames(sections), H, W, 3)
    meta = read_video_metadata(video)
    assert meta["seeds"] == "7" and meta["prompt"] == "a red box"


def test_same_seed_gives_bit_identical_latents_and_the_first_frame_is_the_start_image(models, images, tmp_path):
    for sub in ("a", "b"):
        run(models, tmp_path / sub, "--image_path", images[0], "--prompt", "p", "--seed", "3",
            "--video_sections", "2", "--output_type", "latent")  # fmt: skip
    (a,), (b,) = files(tmp_path / "a", ".safetensors"), files(tmp_path / "b", ".safetensors")
    la, meta = load_latent(a)
    lb, _ = load_latent(b)
    assert torch.equal(la, lb)
    assert la.shape == (16, LWS * 2 + 1, H // 8, W // 8) and la.dtype == torch.float32
    assert meta["seeds"] == "3" and meta["latent_window_size"] == str(LWS) and meta["height"] == str(H)
    with safe_open(a, "pt") as f:
        assert list(f.keys()) == ["latent"]
    run(models, tmp_path / "c", "--image_path", images[0], "--prompt", "p", "--seed", "4",
        "--video_sections", "2", "--output_type", "latent")  # fmt: skip
    (c,) = files(tmp_path / "c", ".safetensors")
    assert not torch.equal(load_latent(c)[0], la)


def count_dit_calls(monkeypatch):
    """Record the keyword arguments of every DiT forward call from now on (the returned list grows as it runs)."""
    calls = []
    original = HunyuanVideoTransformer3DModelPacked.forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HunyuanVideoTransformer3DModelPacked, "forward", counting)
    return calls


@pytest.mark.parametrize("cfg, per_step", [("1.0", 1), ("3.0", 2)])
def test_real_cfg_runs_two_model_calls_per_step(models, images, tmp_path, monkeypatch, cfg, per_step):
    calls = count_dit_calls(monkeypatch)
    run(models, tmp_path, "--image_path", images[0], "--prompt", "p", "--negative_prompt", "blurry",
        "--guidance_scale", cfg, "--infer_steps", "3", "--video_sections", "1", "--output_type", "latent")  # fmt: skip
    assert len(calls) == 3 * per_step
    guidance = {float(c["guidance"][0]) for c in calls}
    assert guidance == {9984.0}  # 10.0 · 1000 in bf16


def test_section_images_prompts_and_indices_follow_the_plan(models, images, tmp_path, monkeypatch):
    calls = count_dit_calls(monkeypatch)
    run(models, tmp_path, "--image_path", f"0:{images[0]};;;-1:{images[2]}", "--prompt", "0:first;;;1:middle",
        "--video_sections", "3", "--infer_steps", "1", "--output_type", "latent",
        "--end_image_path", images[1])  # fmt: skip
    assert len(calls) == 3
    # inverted order: sections 2, 1, 0; paddings [2, 1, 0] -> latent indices start at 1 + padding·lws
    starts = [int(c["latent_indices"][0, 0]) for c in calls]
    assert starts == [1 + 2 * LWS, 1 + LWS, 1]
    embeds = [c["image_embeddings"] for c in calls]
    assert torch.equal(embeds[1], embeds[2]) and not torch.equal(embeds[0], embeds[1])  # -1 → last section only
    texts = [c["encoder_hidden_states"] for c in calls]
    assert torch.equal(texts[0], texts[2]) and not torch.equal(texts[1], texts[0])  # section 1 has its own prompt
    # the first generated section sees the end image as its "post" clean latent; the start-image slot is image 2's
    clean = calls[0]["clean_latents"]
    assert clean.shape == (1, 16, 2, H // 8, W // 8) and clean[:, :, 1].abs().sum() > 0


def test_f1_layout(models, images, tmp_path, monkeypatch):
    calls = count_dit_calls(monkeypatch)
    run(models, tmp_path, "--image_path", images[0], "--prompt", "p", "--video_sections", "2", "--f1",
        "--infer_steps", "1", "--output_type", "latent")  # fmt: skip
    assert [c["latent_indices"][0].tolist() for c in calls] == [[20, 21, 22]] * 2
    assert calls[0]["clean_latent_indices"][0].tolist() == [0, 19]
    assert calls[0]["clean_latent_4x_indices"][0].tolist() == list(range(1, 17))


def test_every_output_type_writes_what_it_promises(models, images, tmp_path):
    expected = {
        "video": (1, 0, 0),
        "latent": (0, 1, 0),
        "both": (1, 1, 0),
        "images": (0, 0, 1),
        "latent_images": (0, 1, 1),
    }
    for output_type, (n_video, n_latent, n_images) in expected.items():
        out = tmp_path / output_type
        run(models, out, "--image_path", images[0], "--prompt", "p", "--seed", "5", "--video_sections", "1",
            "--output_type", output_type)  # fmt: skip
        assert len(files(out, ".mp4")) == n_video, output_type
        assert len(files(out, ".safetensors")) == n_latent, output_type
        folders = [d for d in os.listdir(out) if os.path.isdir(out / d)]
        assert len(folders) == n_images, output_type
        if n_images:
            pngs = sorted(os.listdir(out / folders[0]))
            assert len(pngs) == pixel_frames(1) and pngs[0] == f"{folders[0]}_000.png"


def test_saved_latent_decodes_to_the_same_frames(models, images, tmp_path):
    run(models, tmp_path / "gen", "--image_path", images[0], "--prompt", "p", "--seed", "9",
        "--video_sections", "2", "--output_type", "latent_images")  # fmt: skip
    (latent,) = files(tmp_path / "gen", ".safetensors")
    (folder,) = [d for d in os.listdir(tmp_path / "gen") if os.path.isdir(tmp_path / "gen" / d)]
    original = [np.array(Image.open(p)) for p in files(tmp_path / "gen" / folder, ".png")]
    G.main(["--vae", str(models.vae), "--latent_path", latent, "--save_path", str(tmp_path / "dec"),
            "--output_type", "images"])  # fmt: skip
    (dec_folder,) = os.listdir(tmp_path / "dec")
    assert dec_folder.endswith(f"_9__{os.path.basename(latent)[:-12]}")
    decoded = [np.array(Image.open(p)) for p in files(tmp_path / "dec" / dec_folder, ".png")]
    assert len(decoded) == len(original) == pixel_frames(2)
    for a, b in zip(original, decoded):
        assert np.array_equal(a, b)


def test_batch_file_runs_good_lines_and_reports_bad_ones(models, images, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\n\n"
        f"first prompt --i {images[0]} --d 11 --vs 1\n"
        f"bad size --i {images[0]} --w 50\n"
        f"second prompt --i {images[1]} --d 12 --vs 1 --s 1\n"
        f"unknown option --i {images[0]} --zz 3\n"
    )
    code = run(models, tmp_path / "out", "--from_file", str(prompts), check=False)
    assert code == 1
    videos = files(tmp_path / "out", ".mp4")
    assert len(videos) == 2
    assert {read_video_metadata(v)["prompt"] for v in videos} == {"first prompt", "second prompt"}
    assert "prompts.txt:4:" in caplog.text and "width 50" in caplog.text
    assert "prompts.txt:6:" in caplog.text and "--zz" in caplog.text


def test_interactive_mode_reads_stdin(models, images, tmp_path, monkeypatch):
    lines = f"one --i {images[0]} --d 1 --vs 1\n\ntwo --i {images[2]} --d 2 --vs 1\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    run(models, tmp_path, "--interactive", "--output_type", "latent")
    latents = files(tmp_path, ".safetensors")
    assert sorted(load_latent(p)[1]["prompt"] for p in latents) == ["one", "two"]


def test_prompt_line_grammar():
    parsed = parse_prompt_line("A cat --w 832 --h 480 --f 5 --d 42 --s 20 --g 3 --ci a.png --ci b.png --of no_2x")
    assert parsed == {
        "prompt": "A cat",
        "w": 832, "h": 480, "f": 5.0, "d": 42, "s": 20, "g": 3.0, "ci": ["a.png", "b.png"], "of": "no_2x",
    }  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--video_size", "40", "48"], "--video_size: height 40 is not a positive multiple of 16"),
        (["--sample_solver", "dpm++"], "--sample_solver"),
        (["--save_merged_model", "x.safetensors"], "--save_merged_model needs --lora_weight"),
        (["--image_path", "missing.png"], "--image_path missing.png: file not found"),
        (["--infer_steps", "0"], "--infer_steps must be > 0"),
        (["--skip_done", "--no_metadata"], "--skip_done recognizes finished outputs by their metadata"),
        (["--seeds", "1,x"], "argument --seeds: expected comma-separated integers"),
    ],
)
def test_bad_flags_fail_before_loading_with_the_flag_named(models, images, tmp_path, extra, message, capsys):
    check_fails_before_loading(models, images, tmp_path, extra, message, capsys)


def check_fails_before_loading(models, images, tmp_path, extra, message, capsys):
    """A generation command line plus `extra` exits with status 2, names the problem, and writes nothing."""
    argv = [*models.flags(), "--image_path", images[0], "--prompt", "p", "--save_path", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as e:
        G.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_help_lists_every_reference_flag_with_its_default():
    import json

    spec = os.path.join(ROOT, "tests", "data", "reference_flags.json")
    reference = json.load(open(spec))["scripts"]["fpack_generate_video.py"]
    parser = build_parser()
    ours = {flag: action for action in parser._actions for flag in action.option_strings}
    for row in reference:
        action = ours[row["flags"][0]]
        assert action.default == row["default"] or list(action.default) == row["default"], row["flags"]
    help_text = subprocess.run(
        [sys.executable, os.path.join(ROOT, "fpack_generate_video.py"), "--help"], capture_output=True, text=True
    ).stdout
    for row in reference:
        assert row["flags"][0] in help_text
    assert "(default: 25)" in help_text  # --infer_steps


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from tests.factory.dit import tiny_dit_config
    from tests.factory.lora import framepack_lora
    from utils.safetensors_utils import save_safetensors

    path = tmp_path_factory.mktemp("lora") / "tiny_lora.safetensors"
    save_safetensors(framepack_lora(tiny_dit_config(), rank=4, alpha=4.0, seed=3), path)
    return str(path)


def generate_latent_file(models, images, out, *extra):
    run(models, out, "--image_path", images[0], "--prompt", "p", "--seed", "21", "--video_sections", "1",
        "--output_type", "latent", *extra)  # fmt: skip
    (path,) = files(out, ".safetensors")
    return load_latent(path)[0]


def test_lora_changes_the_output_and_multiplier_zero_reproduces_the_base(models, images, lora_file, tmp_path):
    base = generate_latent_file(models, images, tmp_path / "base")
    with_lora = generate_latent_file(models, images, tmp_path / "lora", "--lora_weight", lora_file)
    zero = generate_latent_file(models, images, tmp_path / "zero", "--lora_weight", lora_file, "--lora_multiplier", "0")
    assert not torch.equal(base, with_lora)
    assert torch.equal(base, zero)


def test_saved_merged_model_loads_as_dit_and_generates_the_same_latents(models, images, lora_file, tmp_path):
    from dataclasses import replace

    merged = tmp_path / "merged.safetensors"
    run(models, tmp_path / "unused", "--image_path", images[0], "--prompt", "p", "--lora_weight", lora_file,
        "--lora_multiplier", "0.7", "--save_merged_model", str(merged))  # fmt: skip
    assert merged.exists()
    assert not (tmp_path / "unused").exists() or not files(tmp_path / "unused", ".mp4")
    at_run_time = generate_latent_file(
        models, images, tmp_path / "a", "--lora_weight", lora_file, "--lora_multiplier", "0.7"
    )
    from_merged = generate_latent_file(replace(models, dit=merged), images, tmp_path / "b")
    assert torch.equal(at_run_time, from_merged)


@pytest.mark.parametrize("flag", ["--fp8_scaled", "--fp8"])
def test_fp8_generation_runs_and_stays_close(models, images, tmp_path, flag):
    base = generate_latent_file(models, images, tmp_path / "bf16")
    quantized = generate_latent_file(models, images, tmp_path / "fp8", flag)
    assert torch.isfinite(quantized).all()
    rel = (quantized - base).norm() / base.norm()
    assert 0 < rel < 0.2, rel  # e4m3 weights: a few percent, compounded over 2 sampling steps


def test_bulk_decode_gives_every_frame_and_matches_sectioned_decode_at_one_chunk(models, images, tmp_path):
    frames = {}
    for sub, extra in (("sectioned", []), ("bulk", ["--bulk_decode"])):
        run(models, tmp_path / sub, "--image_path", images[0], "--prompt", "p", "--seed", "2",
            "--video_sections", "1", "--output_type", "images", *extra)  # fmt: skip
        (folder,) = os.listdir(tmp_path / sub)
        frames[sub] = np.stack([np.array(Image.open(p)) for p in files(tmp_path / sub / folder, ".png")])
    assert frames["bulk"].shape == (pixel_frames(1), H, W, 3)
    # one section is one decode chunk: both paths decode the same latent (PNGs are lossless; mp4 is not compared,
    # FFmpeg's threaded conversion and encoding can differ by a few levels between runs)
    assert np.array_equal(frames["sectioned"], frames["bulk"])


def test_teacache_threshold_zero_is_exact_and_a_large_threshold_skips_the_middle_steps(
    models, images, tmp_path, caplog
):
    import logging

    caplog.set_level(logging.INFO)
    base = generate_latent_file(models, images, tmp_path / "base", "--infer_steps", "5")
    exact = generate_latent_file(models, images, tmp_path / "zero", "--infer_steps", "5", "--teacache_thresh", "0")
    assert torch.equal(base, exact)
    cached = generate_latent_file(models, images, tmp_path / "big", "--infer_steps", "5", "--teacache_thresh", "1e9")
    assert "TeaCache: the blocks ran on 2 of 5 steps (skipped steps 1-3)" in caplog.text  # first and last compute
    assert torch.isfinite(cached).all() and not torch.equal(cached, base)
