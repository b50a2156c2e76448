"""Step caches and --compile through fpack_generate_video.py: every mode, per-line overrides, calibration files."""

import logging
import re

import pytest
import torch

from frame_pack.magcache import DEFAULT_MAG_RATIOS, magcache_schedule, parse_mag_ratios, resample_ratios
from pipelines.latent_file import load_latent
from tests import test_generate as TG
from tests.test_generate import files, generate_latent_file, run

images = TG.images  # the same module-scoped start images (models: the conftest fixture)

REPORT = re.compile(r"(MagCache|TeaCache): (?:positive branch: )?the blocks ran on (\d+) of (\d+) steps")


def reports(text: str) -> list[tuple[str, int, int]]:
    return [(m[1], int(m[2]), int(m[3])) for m in REPORT.finditer(text)]


def default_computes(steps: int, retention=0.2, threshold=0.24, k=6) -> int:
    return sum(magcache_schedule(resample_ratios(DEFAULT_MAG_RATIOS, steps), retention, threshold, k))


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO)
    return caplog


ORIGINAL, F1 = ["--video_sections", "2"], ["--video_sections", "2", "--f1"]
ONE_FRAME = ["--one_frame_inference", "target_index=1", "--control_image_path"]


@pytest.mark.parametrize(
    "mode, cache",
    [(ORIGINAL, "magcache"), (F1, "magcache"), (F1, "teacache"), (ONE_FRAME, "magcache"), (ONE_FRAME, "teacache")],
    ids=["original-magcache", "f1-magcache", "f1-teacache", "one_frame-magcache", "one_frame-teacache"],
)
def test_every_mode_logs_per_section_how_many_steps_ran_the_blocks(models, images, tmp_path, log, mode, cache):
    flags = ["--magcache_mag_ratios", "0"] if cache == "magcache" else ["--teacache_thresh", "1e9"]
    mode = [*mode, images[1]] if mode is ONE_FRAME else mode
    run(models, tmp_path, "--image_path", images[0], "--prompt", "p", "--seed", "3", "--infer_steps", "6",
        "--output_type", "latent", *mode, *flags)  # fmt: skip
    sections = 1 if "--one_frame_inference" in mode else 2
    expected = default_computes(6) if cache == "magcache" else 2  # TeaCache at 1e9: first and last step only
    assert expected < 6
    name = "MagCache" if cache == "magcache" else "TeaCache"
    assert reports(log.text) == [(name, expected, 6)] * sections


def test_cfg_keeps_one_cache_per_branch(models, images, tmp_path, log):
    latent = generate_latent_file(models, images, tmp_path, "--guidance_scale", "3", "--negative_prompt", "blurry",
                                  "--infer_steps", "6", "--magcache_mag_ratios", "0")  # fmt: skip
    n = default_computes(6)
    assert f"negative branch: the blocks ran on {n} of 6 steps" in log.text
    assert reports(log.text) == [("MagCache", n, 6)]
    assert torch.isfinite(latent).all()


def test_disabled_cache_is_bit_identical_and_a_cache_that_never_skips_too(models, images, tmp_path, log):
    base = generate_latent_file(models, images, tmp_path / "a", "--infer_steps", "6")
    never = generate_latent_file(models, images, tmp_path / "b", "--infer_steps", "6",
                                 "--magcache_mag_ratios", "0", "--magcache_k", "0")  # fmt: skip
    assert torch.equal(base, never)
    assert reports(log.text) == [("MagCache", 6, 6)]
    (path,) = files(tmp_path / "b", ".safetensors")
    meta = load_latent(path)[1]
    assert meta["step_cache"] == "MagCache default ratios, retention 0.2, threshold 0.24, K 0"
    assert "step_cache" not in load_latent(files(tmp_path / "a", ".safetensors")[0])[1]


def test_calibration_writes_one_ratio_per_step_and_feeding_it_back_repeats_its_decisions(
    models, images, tmp_path, log, capsys
):
    generate_latent_file(models, images, tmp_path / "cal", "--infer_steps", "8",
                         "--magcache_calibration", "--magcache_threshold", "0.5")  # fmt: skip
    (saved,) = files(tmp_path / "cal", "_magcache_ratios.txt")
    with open(saved) as f:
        (line,) = f.read().splitlines()
    assert line in capsys.readouterr().out
    ratios = parse_mag_ratios(line)
    assert len(ratios) == 8 and ratios[0] == 1.0
    would = sum(magcache_schedule(ratios, 0.2, 0.5, 6))
    assert f"would run the blocks on {would} of 8 steps" in log.text
    log.clear()
    generate_latent_file(models, images, tmp_path / "fed", "--infer_steps", "8",
                         "--magcache_mag_ratios", line, "--magcache_threshold", "0.5")  # fmt: skip
    assert reports(log.text) == [("MagCache", would, 8)]


def test_prompt_file_lines_override_the_cache_settings(models, images, tmp_path, log):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"no skips --i {images[0]} --d 1 --vs 1 --mck 0\n"
        f"bad --i {images[0]} --d 1 --vs 1 --mct -1\n"
        f"keep half, strict --i {images[0]} --d 1 --vs 1 --mcrr 0.5 --mct 0.01\n"
        f"fewer steps --i {images[0]} --d 1 --vs 1 --s 5\n"
    )
    code = run(models, tmp_path / "out", "--from_file", str(prompts), "--infer_steps", "10",
               "--magcache_mag_ratios", "0", "--output_type", "latent", check=False)  # fmt: skip
    assert code == 1  # the bad line
    assert "prompts.txt:2: --magcache_threshold must be >= 0" in log.text
    assert reports(log.text) == [
        ("MagCache", 10, 10),
        ("MagCache", default_computes(10, retention=0.5, threshold=0.01), 10),
        ("MagCache", default_computes(5), 5),
    ]
    assert len(files(tmp_path / "out", ".safetensors")) == 3


def test_teacache_threshold_from_a_prompt_line(models, images, tmp_path, log):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a --i {images[0]} --vs 1 --tct 1e9\nb --i {images[0]} --vs 1\n")
    assert run(models, tmp_path / "out", "--from_file", str(prompts), "--infer_steps", "5",
               "--output_type", "latent") == 0  # fmt: skip
    assert reports(log.text) == [("TeaCache", 2, 5)]  # the second line has no cache


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacache_thresh", "0.1", "--magcache_mag_ratios", "0"], "choose one"),
        (["--magcache_mag_ratios", "1,x"], "--magcache_mag_ratios '1,x'"),
        (["--magcache_k", "-1"], "--magcache_k must be >= 0"),
        (["--compile", "--compile_backend", "nosuch"], "--compile_backend 'nosuch'"),
    ],
)
def test_bad_cache_and_compile_flags_fail_before_loading(models, images, tmp_path, extra, message, capsys):
    TG.check_fails_before_loading(models, images, tmp_path, extra, message, capsys)


def test_compile_on_the_cpu_gives_the_uncompiled_latent_within_bf16_tolerance(models, images, tmp_path, monkeypatch):
    compiled_blocks = []
    original = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compiled_blocks.append(kw) or original(self, **kw)
    )
    base = generate_latent_file(models, images, tmp_path / "eager", "--infer_steps", "2")
    compiled = generate_latent_file(models, images, tmp_path / "compiled", "--infer_steps", "2", "--compile",
                                    "--compile_dynamic", "false")  # fmt: skip
    assert len(compiled_blocks) == 4  # 2 double + 2 single blocks of the tiny DiT, not the whole model
    assert compiled_blocks[0] == {"backend": "inductor", "mode": "default", "dynamic": False, "fullgraph": False}
    rel = ((compiled - base).norm() / base.norm()).item()
    assert 0 <= rel < 2e-2
    assert load_latent(files(tmp_path / "compiled", ".safetensors")[0])[0].shape == base.shape
