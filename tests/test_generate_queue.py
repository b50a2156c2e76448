"""Queue features of fpack_generate_video.py on the tiny models: LoRA per prompt line, previews, re-running from
metadata, --skip_done, --seeds / --n_seeds, --one_frame_auto_resize."""

import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import frame_pack.dit_loader as dit_loader
from dataset.buckets import bucket_for_area
from pipelines import generate as G
from pipelines.generate_args import build_parser
from pipelines.latent_file import load_latent
from pipelines.models import load_dit
from pipelines.run_metadata import read_settings
from pipelines.settings import ModelSettings
from tests.factory.datasets import write_start_image
from tests.factory.dit import tiny_dit_config
from tests.factory.lora import framepack_lora, framepack_modules, random_lora
from utils.safetensors_utils import save_safetensors
from utils.video_io import read_video_frames

LWS = 3
H, W = 32, 48


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_start_image(tmp_path_factory.mktemp("images") / "start.png")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A: every target module; B: the double blocks only."""
    folder = tmp_path_factory.mktemp("loras")
    config = tiny_dit_config()
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    save_safetensors(framepack_lora(config, rank=4, alpha=4.0, seed=3), a)
    double = {n: s for n, (p, s) in framepack_modules(config).items() if p.startswith("transformer_blocks.")}
    save_safetensors(random_lora(double, rank=2, alpha=2.0, seed=4), b)
    return str(a), str(b)


def argv(models, out, *extra):
    return [*models.flags(), "--video_size", str(H), str(W), "--latent_window_size", str(LWS), "--infer_steps", "1",
            "--save_path", str(out), *map(str, extra)]  # fmt: skip


def run(models, out, *extra):
    assert G.main(argv(models, out, *extra)) == 0


def files(folder, suffix):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffix))


def latents_by_seed(folder):
    out = {}
    for path in files(folder, "_latent.safetensors"):
        latent, meta = load_latent(path)
        out.setdefault(int(meta["seeds"]), []).append(latent)
    return out


def count_loads(monkeypatch):
    loaded = []
    original = dit_loader.load_packed_model

    def counting(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(dit_loader, "load_packed_model", counting)
    return loaded


@pytest.mark.parametrize("fp8", [[], ["--fp8_scaled"]], ids=["bf16", "fp8_scaled"])
def test_lora_per_line_equals_separate_runs_with_one_dit_load(models, image, loras, tmp_path, monkeypatch, fp8):
    a, b = loras
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"p --i {image} --d 1 --vs 1 --lw {a}\n"
        f"p --i {image} --d 2 --vs 1 --lw none\n"
        f"p --i {image} --d 3 --vs 1 --lw {a},{b} --lm 0.8,1.0\n"
    )
    loaded = count_loads(monkeypatch)
    run(models, tmp_path / "queue", "--from_file", prompts, "--output_type", "latent", *fp8)
    assert len(loaded) == 1
    queue = latents_by_seed(tmp_path / "queue")

    separate = {1: ["--lora_weight", a], 2: [], 3: ["--lora_weight", a, b, "--lora_multiplier", "0.8", "1.0"]}
    for seed, lora_flags in separate.items():
        out = tmp_path / f"single{seed}"
        run(models, out, "--image_path", image, "--prompt", "p", "--seed", seed, "--video_sections", 1,
            "--output_type", "latent", *lora_flags, *fp8)  # fmt: skip
        ((expected,),) = latents_by_seed(out).values()
        assert torch.equal(queue[seed][0], expected), seed  # bit for bit, fp8 included
    assert not torch.equal(queue[1][0], latents_by_seed(tmp_path / "single2")[2][0])

    # after the last line the DiT holds its pristine weights again (the queue ends by unmerging)
    model = loaded[0]
    model_settings = ModelSettings.from_args(build_parser().parse_args(argv(models, tmp_path, "--prompt", "p", *fp8)))
    pristine = load_dit(model_settings, "cpu")[0]
    got, want = model.state_dict(), pristine.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        if key.startswith("proj_out."):  # the DiT's first call moves its output layer to fp32 (no LoRA there)
            got[key] = got[key].to(want[key].dtype)
        assert torch.equal(got[key].view(torch.uint8), want[key].view(torch.uint8)), key


def test_lines_with_the_same_loras_do_no_switching_work(models, image, loras, tmp_path, monkeypatch):
    from networks import lora_merge

    a, _ = loras
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"p --i {image} --d {d} --vs 1 --s 1\n" for d in (1, 2, 3)))
    merges = []
    for name in ("merge_lora_files", "plan_lora_merge"):  # a merge into the loaded model, or one while streaming
        original = getattr(lora_merge, name)
        monkeypatch.setattr(lora_merge, name, lambda *x, _f=original, _n=name, **k: merges.append(_n) or _f(*x, **k))
    run(models, tmp_path / "out", "--from_file", prompts, "--output_type", "latent", "--lora_weight", a)
    # planned once against the DiT's shapes before any model loads (the LoRA-fit check), then merged once while
    # the DiT streams in; never again
    assert merges == ["plan_lora_merge", "plan_lora_merge"]


def test_previews_after_each_section_hold_the_video_so_far(models, image, tmp_path, monkeypatch):
    seen = []
    original = G.write_preview

    def checking(latent, path, fps):
        result = original(latent, path, fps)
        assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]  # renamed into place
        if path.endswith(".mp4"):
            frames = read_video_frames(path)
            seen.append((os.path.basename(path), frames.shape))
        else:
            with Image.open(path) as strip:
                strip.load()
                seen.append((os.path.basename(path), strip.size))
        return result

    monkeypatch.setattr(G, "write_preview", checking)
    run(models, tmp_path / "inv", "--image_path", image, "--prompt", "p", "--seed", 4, "--video_sections", 3,
        "--output_type", "latent", "--preview")  # fmt: skip
    names = {name for name, _ in seen}
    assert len(names) == 1 and next(iter(names)).endswith("_4_preview.mp4")
    # inverted: k·lws latent frames after k sections, plus the start frame after the last
    assert [shape for _, shape in seen] == [(n, H // 8, W // 8, 3) for n in (3, 6, 10)]
    assert os.path.exists(tmp_path / "inv" / next(iter(names)))

    seen.clear()
    run(models, tmp_path / "f1", "--image_path", image, "--prompt", "p", "--seed", 4, "--video_sections", 2,
        "--f1", "--output_type", "latent", "--preview", "png")  # fmt: skip
    assert [size for _, size in seen] == [((W // 8) * n, H // 8) for n in (4, 7)]  # strip of 1 + k·lws frames


def test_preview_colors_are_the_linear_map_of_the_latent():
    from hunyuan_model.latent_preview import LATENT_RGB_BIAS, LATENT_RGB_FACTORS, latent_to_rgb

    latent = torch.zeros(16, 1, 1, 2)
    latent[12, 0, 0, 0] = 1.0  # channel 12 alone
    rgb = latent_to_rgb(latent)
    expected0 = [round((np.clip((f + b + 1) / 2, 0, 1)) * 255) for f, b in zip(LATENT_RGB_FACTORS[12], LATENT_RGB_BIAS)]
    expected1 = [round((np.clip((b + 1) / 2, 0, 1)) * 255) for b in LATENT_RGB_BIAS]
    assert rgb.shape == (1, 1, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == expected0 and rgb[0, 0, 1].tolist() == expected1


def test_from_metadata_reproduces_the_latent_and_flags_alongside_override(models, image, loras, tmp_path):
    a, _ = loras
    run(models, tmp_path / "orig", "--image_path", image, "--prompt", "a red box", "--seed", 5, "--video_sections",
        2, "--output_type", "both", "--lora_weight", a, "--lora_multiplier", 0.7)  # fmt: skip
    (original_path,) = files(tmp_path / "orig", ".safetensors")
    (video,) = files(tmp_path / "orig", ".mp4")
    original = load_latent(original_path)[0]
    settings = read_settings(video)
    assert settings["seed"] == 5 and settings["flags"]["lora_multiplier"] == [0.7]
    assert settings["loras"][0]["hash"] and settings["models"]["dit"]["hash"]

    for source in (video, original_path):
        out = tmp_path / f"re_{os.path.basename(source)}"
        assert G.main(["--from_metadata", source, "--save_path", str(out), "--output_type", "latent"]) == 0
        (again,) = files(out, ".safetensors")
        assert torch.equal(load_latent(again)[0], original), source

    out = tmp_path / "override"
    assert G.main(["--from_metadata", video, "--save_path", str(out), "--output_type", "latent", "--seed", "6"]) == 0
    (changed,) = files(out, ".safetensors")
    latent, meta = load_latent(changed)
    assert meta["seeds"] == "6" and meta["prompt"] == "a red box" and not torch.equal(latent, original)
    assert read_settings(changed)["flags"]["lora_weight"] == [os.path.abspath(a)]


def test_show_metadata_prints_a_command_line_that_parses_back(models, image, tmp_path, capsys):
    run(models, tmp_path, "--image_path", image, "--prompt", "a red box, 'quoted'", "--seed", 8, "--video_sections",
        1, "--output_type", "latent", "--guidance_scale", 1.5, "--fp8_scaled")  # fmt: skip
    (latent,) = files(tmp_path, ".safetensors")
    capsys.readouterr()
    assert G.main(["--show_metadata", latent]) == 0
    words = shlex.split(capsys.readouterr().out.strip())
    assert words[:2] == ["python", "fpack_generate_video.py"]
    parsed = build_parser().parse_args(words[2:])
    assert parsed.seed == 8 and parsed.prompt == "a red box, 'quoted'" and parsed.guidance_scale == 1.5
    assert parsed.fp8_scaled and parsed.video_size == [H, W] and parsed.dit == os.path.abspath(models.dit)


def test_from_metadata_on_a_file_without_settings_is_a_clear_error(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(plain)
    with pytest.raises(SystemExit) as e:
        G.main(["--from_metadata", str(plain), "--save_path", str(tmp_path / "x")])
    assert e.value.code == 2
    assert f"--from_metadata {plain}: no generation settings recorded" in capsys.readouterr().err


def test_skip_done_after_a_kill_renders_exactly_the_unfinished_lines(models, image, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"line {n} --i {image} --d {n} --vs 1 --s 1\n" for n in (1, 2, 3, 4)))
    out = tmp_path / "out"
    original_save_video = G.save_video
    videos = []

    def killed_on_the_third_video(frames, path, fps, metadata=None):
        if len(videos) == 2:  # the process dies while line 3's mp4 is being written (its latent is on disk)
            (out / "half.tmp99.mp4").write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
        videos.append(path)
        return original_save_video(frames, path, fps, metadata)

    monkeypatch.setattr(G, "save_video", killed_on_the_third_video)
    with pytest.raises(SystemExit) as interrupted:
        G.main(argv(models, out, "--from_file", prompts, "--output_type", "both"))
    assert interrupted.value.code == 130
    assert len(files(out, "_.mp4")) == 2 and len(files(out, "_latent.safetensors")) == 3
    monkeypatch.setattr(G, "save_video", original_save_video)

    rendered = []
    original_generate = G.generate_latent

    def counting(args, *rest, **kwargs):
        rendered.append(args.prompt)
        return original_generate(args, *rest, **kwargs)

    monkeypatch.setattr(G, "generate_latent", counting)
    run(models, out, "--from_file", prompts, "--output_type", "both", "--skip_done")
    assert rendered == ["line 3", "line 4"]
    run(models, out, "--from_file", prompts, "--output_type", "both", "--skip_done")
    assert rendered == ["line 3", "line 4"]  # everything is done now
    run(models, out, "--from_file", prompts, "--output_type", "latent", "--skip_done", "--infer_steps", 1)
    assert rendered == ["line 3", "line 4"]  # infer_steps equals the lines' --s: the same jobs
    run(models, out, "--from_file", prompts, "--output_type", "latent", "--skip_done", "--embedded_cfg_scale", 6)
    assert rendered[2:] == ["line 1", "line 2", "line 3", "line 4"]  # another setting: other jobs


def test_seeds_and_n_seeds(models, image, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a --i {image} --vs 1 --s 1\nb --i {image} --vs 1 --s 1 --d 7 --n_seeds 2\n")
    run(models, tmp_path / "out", "--from_file", prompts, "--output_type", "latent", "--seeds", "3,4")
    by_prompt = {}
    for path in files(tmp_path / "out", ".safetensors"):
        meta = load_latent(path)[1]
        by_prompt.setdefault(meta["prompt"], []).append(int(meta["seeds"]))
    assert {k: sorted(v) for k, v in by_prompt.items()} == {"a": [3, 4], "b": [7, 8]}


def test_one_frame_auto_resize_sizes_follow_a_hand_written_table(models, tmp_path):
    # area 512·512; W = sqrt(area·ar) rounded down to 16, best ratio of W-32..W+32 with H = (area // W) down to 16
    table = {(1024, 512): (720, 352), (480, 640): (432, 592), (1920, 1080): (672, 384)}
    for size, expected in table.items():
        assert bucket_for_area(size, (512, 512)) == expected

    control = tmp_path / "wide.png"
    Image.fromarray(np.full((32, 64, 3), 90, np.uint8)).save(control)  # 2:1 at an area of 64·64 -> 80x48
    run(models, tmp_path / "out", "--image_path", control, "--prompt", "p", "--video_size", 64, 64,
        "--one_frame_inference", "default", "--control_image_path", control, "--one_frame_auto_resize",
        "--output_type", "latent_images", "--infer_steps", 1, "--seed", 1)  # fmt: skip
    (latent,) = files(tmp_path / "out", ".safetensors")
    assert load_latent(latent)[0].shape == (16, 1, 48 // 8, 80 // 8)
    (png,) = files(tmp_path / "out", ".png")
    assert Image.open(png).size == (80, 48)
