"""Bad input to fpack_cache_latents.py and fpack_cache_text_encoder_outputs.py through their entry points: each
case is refused with exit status 2 and one `error:` line naming the flag, the file or the dataset key, before any
model loads and without writing a cache file. Ctrl-C while caching exits 130 with one `interrupted` line and
leaves only complete cache files; a file left by a killed write is removed by the next run.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dataset.config import load_dataset_params
from tests.badinput import (
    PAUSED,
    Case,
    assert_interrupted,
    check_refusal,
    files_under,
    held_up,
    interrupt_when,
    leftovers,
    run_cases,
    run_script,
    truncated_copy,
    write_text,
)
from tests.factory.datasets import make_video_dataset, write_config, write_jsonl
from utils.cli import INTERRUPT_GRACE_S

LATENTS = "fpack_cache_latents.py"
TEXT = "fpack_cache_text_encoder_outputs.py"
LWS = 3
LATENT_LOADING = ("Loading VAE from", "models: ")
TEXT_LOADING = ("models: ",)


def video_entry(directory: Path, **table) -> dict:
    return {"video_directory": directory, "resolution": [48, 32], "target_frames": [4 * LWS + 1],
            "fp_latent_window_size": LWS, "caption_extension": ".txt", **table}  # fmt: skip


@pytest.fixture(scope="module")
def world(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_cache")
    w = {"root": root, "models": models}
    videos = make_video_dataset(root, lengths=(13,), name="videos")
    w["videos"] = videos.directory

    def config(name: str, *entries: dict) -> Path:
        return write_config(root / f"{name}.toml", list(entries))

    def own_videos(name: str, **table) -> Path:  # a copy of the videos, so a refused case cannot touch another's
        copy = make_video_dataset(root, lengths=(13,), name=name)
        return config(name, video_entry(copy.directory, **table))

    (root / "empty").mkdir()
    w["empty"] = config("empty", video_entry(root / "empty"))
    w["fps_inf"] = write_text(
        root / "fps_inf.toml", f'[[datasets]]\nvideo_directory = "{root / "fps"}"\nsource_fps = inf\n'
    )
    w["cache_is_a_file"] = own_videos("cache_is_a_file", cache_directory=write_text(root / "a_file"))
    write_jsonl(root / "list.jsonl", [{"video_path": str(videos.videos[0]), "caption": "x"}])
    (root / "list.jsonl").write_text((root / "list.jsonl").read_text() + "{not json\n")
    jsonl = {"video_jsonl_file": root / "list.jsonl", "cache_directory": root / "jsonl_cache", "resolution": [48, 32],
             "target_frames": [13], "fp_latent_window_size": LWS}  # fmt: skip
    w["jsonl"] = config("jsonl", jsonl)
    w["no_captions"] = own_videos("no_captions", caption_extension=".caption")
    w["good"] = own_videos("good")
    w["window_too_large"] = own_videos("window_too_large", fp_latent_window_size=90)
    w["text"] = write_text(root / "notes.safetensors")
    encoder = Path(models.image_encoder)
    w["image_encoder_cut"] = truncated_copy(encoder, root / "cut" / encoder.name)
    clip = Path(models.text_encoder2)
    w["clip_cut"] = truncated_copy(clip, root / "cut" / clip.name)
    return w


def latents(w, dataset, *extra) -> list:
    m = w["models"]
    return ["--dataset_config", w[dataset], "--vae", m.vae, "--image_encoder", m.image_encoder, "--device", "cpu",
            *extra]  # fmt: skip


def text(w, dataset, *extra) -> list:
    m = w["models"]
    return ["--dataset_config", w[dataset], "--text_encoder1", m.text_encoder1, "--text_encoder2", m.text_encoder2,
            "--tokenizer1", m.tokenizer1, "--tokenizer2", m.tokenizer2, "--device", "cpu", *extra]  # fmt: skip


def _dataset_dir(w, dataset: str) -> Path:
    return {"empty": w["root"] / "empty", "cache_is_a_file": None, "jsonl": w["root"] / "jsonl_cache"}.get(
        dataset, w["root"] / dataset
    )


# name -> (script, argv builder, substrings of the error line, the dataset whose folder must stay free of caches)
CASES = {
    "latents_empty_video_directory": (
        LATENTS,
        lambda w: latents(w, "empty"),
        ("[[datasets]] #1", "no videos"),
        "empty",
    ),
    "latents_source_fps_inf": (LATENTS, lambda w: latents(w, "fps_inf"), ("source_fps", "finite"), None),
    "latents_vae_tile_too_small": (
        LATENTS,
        lambda w: latents(w, "good", "--vae_spatial_tile_sample_min_size", "7"),
        ("--vae_spatial_tile_sample_min_size", "at least 16", "got 7"),
        "good",
    ),
    "latents_vae_chunk_zero": (
        LATENTS,
        lambda w: latents(w, "good", "--vae_chunk_size", "0"),
        ("--vae_chunk_size must be > 0",),
        "good",
    ),
    "latents_window_size_too_large": (
        LATENTS,
        lambda w: latents(w, "window_too_large"),
        ("fp_latent_window_size", "<= 33", "90"),
        "window_too_large",
    ),
    "latents_cache_directory_is_a_file": (
        LATENTS,
        lambda w: latents(w, "cache_is_a_file"),
        ("cache_directory", "not a folder"),
        "cache_is_a_file",
    ),
    "latents_jsonl_bad_line": (LATENTS, lambda w: latents(w, "jsonl"), ("list.jsonl:2", "invalid JSON"), "jsonl"),
    "latents_vae_text_file": (
        LATENTS,
        lambda w: ["--dataset_config", w["good"], "--vae", w["text"], "--image_encoder", w["models"].image_encoder],
        ("--vae", "notes.safetensors"),
        "good",
    ),
    "latents_image_encoder_truncated": (
        LATENTS,
        lambda w: ["--dataset_config", w["good"], "--vae", w["models"].vae, "--image_encoder", w["image_encoder_cut"]],
        ("--image_encoder", "truncated"),
        "good",
    ),
    "latents_device_unknown": (
        LATENTS,
        lambda w: latents(w, "good", "--device", "banana"),
        ("--device banana", "not a device name"),
        "good",
    ),
    "latents_device_cuda_index": (
        LATENTS,
        lambda w: latents(w, "good", "--device", "cuda:99"),
        ("--device cuda:99",),
        "good",
    ),
    "latents_num_workers_zero": (
        LATENTS,
        lambda w: latents(w, "good", "--num_workers", "0"),
        ("--num_workers",),
        "good",
    ),
    "latents_one_frame_on_videos": (
        LATENTS,
        lambda w: latents(w, "good", "--one_frame"),
        ("--one_frame", "video dataset"),
        "good",
    ),
    "text_empty_video_directory": (TEXT, lambda w: text(w, "empty"), ("[[datasets]] #1", "no videos"), "empty"),
    "text_missing_captions": (TEXT, lambda w: text(w, "no_captions"), ("caption file(s) missing",), "no_captions"),
    "text_encoder1_text_file": (
        TEXT,
        lambda w: text(w, "good", "--text_encoder1", w["text"]),
        ("--text_encoder1", "notes.safetensors"),
        "good",
    ),
    "text_encoder2_truncated": (
        TEXT,
        lambda w: text(w, "good", "--text_encoder2", w["clip_cut"]),
        ("--text_encoder2", "truncated"),
        "good",
    ),
    "text_device_unknown": (TEXT, lambda w: text(w, "good", "--device", "banana"), ("--device banana",), "good"),
    "text_cache_directory_is_a_file": (
        TEXT,
        lambda w: text(w, "cache_is_a_file"),
        ("cache_directory", "not a folder"),
        "cache_is_a_file",
    ),
}


@pytest.fixture(scope="module")
def refusals(world):
    built = {}
    for name, (script, argv, expected, dataset) in CASES.items():
        loading = LATENT_LOADING if script == LATENTS else TEXT_LOADING
        folder = _dataset_dir(world, dataset) if dataset else None
        built[name] = Case(script, argv(world), expected, None, loading, cache_folder=folder)
    return run_cases(built, world["root"] / "logs")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_one_line_before_loading(refusals, name):
    case = refusals[name]
    check_refusal(case)
    if case.cache_folder is not None and case.cache_folder.is_dir():
        assert sorted(p.name for p in case.cache_folder.glob("*.safetensors*")) == []


def test_a_video_resolution_off_the_bucket_step_warns_with_the_bucket_it_gets(tmp_path, caplog):
    config = write_config(tmp_path / "d.toml", [video_entry(tmp_path, resolution=[30, 30])])
    with caplog.at_level(logging.WARNING):
        (params,) = load_dataset_params(str(config))
    assert params.resolution == (30, 30)
    assert "resolution 30x30 is not a multiple of 16" in caplog.text and "cached as 16x32" in caplog.text


def test_ctrl_c_while_caching_exits_130_and_the_next_run_cleans_up(models, tmp_path):
    """SIGINT while the fourth cache file is saved (held up before its rename by tests/pause_launcher.py): the three
    finished files stay, the fourth's temporary file goes; the next run with --skip_existing caches only the rest."""
    videos = make_video_dataset(tmp_path, lengths=(13,) * 6, name="many")
    config = write_config(tmp_path / "many.toml", [video_entry(videos.directory)])
    argv = ["--dataset_config", config, "--vae", models.vae, "--image_encoder", models.image_encoder,
            "--device", "cpu", "--num_workers", "1", "--skip_existing"]  # fmt: skip
    held = r"_fp\.safetensors\.tmp\d+',"  # one file per video: 13 frames are one section of window size 3
    seen = {}
    code, stderr, seconds = interrupt_when(
        held_up([sys.executable, LATENTS, *argv], "os:replace", match=held, call=4),
        PAUSED,
        at_signal=lambda: seen.update(temporary=leftovers(videos.directory)),
    )
    assert_interrupted(code, stderr, seconds)
    assert len(seen["temporary"]) == 1  # the signal came while the fourth file was being saved
    assert leftovers(videos.directory) == []
    written = sorted(videos.directory.glob("*_fp.safetensors"))
    assert len(written) == 3
    for path in written:
        assert load_file(path)  # complete: the header's length matches and every tensor reads

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = videos.directory / f"{written[0].name}.tmp{dead.pid}"
    stale.write_bytes(b"half a file")
    result = run_script(LATENTS, argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert leftovers(videos.directory) == []
    assert len(list(videos.directory.glob("*_fp.safetensors"))) == 6
    assert result.stderr.count(": caching ") == 3  # the complete ones were kept


# Ctrl-C while the models load: tests/pause_launcher.py holds the loader up and the signal is sent when it says so.
# The models load on the first item to cache, so no cache file is complete yet; none may be written.
PLACED = "models: text encoders "  # logged once a model has loaded, with where each model is


def test_ctrl_c_while_the_vae_loads_exits_130_and_writes_no_cache(models, tmp_path):
    videos = make_video_dataset(tmp_path, lengths=(13,), name="videos")
    config = write_config(tmp_path / "videos.toml", [video_entry(videos.directory)])
    cmd = held_up([sys.executable, LATENTS, "--dataset_config", config, "--vae", models.vae, "--image_encoder",
                   models.image_encoder, "--device", "cpu"], "hunyuan_model.vae:load_vae")  # fmt: skip
    code, stderr, seconds = interrupt_when(cmd, PAUSED)
    assert_interrupted(code, stderr, seconds)
    assert "Loading VAE from" in stderr and PLACED not in stderr  # the signal came while the VAE loaded
    assert [name for name in files_under(videos.directory) if name.endswith(".safetensors")] == []
    assert leftovers(videos.directory) == []


def test_a_swallowed_ctrl_c_while_the_text_encoders_load_is_ended_by_the_watchdog(models, tmp_path):
    """The KeyboardInterrupt is dropped while LLaMA loads (a library printing "Exception ignored in ..." did that
    once): the watchdog ends the run within the grace."""
    videos = make_video_dataset(tmp_path, lengths=(13,), name="videos")
    config = write_config(tmp_path / "videos.toml", [video_entry(videos.directory)])
    m = models
    argv = ["--dataset_config", config, "--text_encoder1", m.text_encoder1, "--text_encoder2", m.text_encoder2,
            "--tokenizer1", m.tokenizer1, "--tokenizer2", m.tokenizer2, "--device", "cpu"]  # fmt: skip
    cmd = held_up([sys.executable, TEXT, *argv], "hunyuan_model.text_encoder:load_text_encoder1", swallow=True)
    code, stderr, seconds = interrupt_when(cmd, PAUSED)
    assert_interrupted(code, stderr, seconds)
    assert seconds >= INTERRUPT_GRACE_S  # ended by the watchdog, not by the KeyboardInterrupt
    assert PLACED not in stderr  # the signal came while the text encoders loaded
    assert [name for name in files_under(videos.directory) if name.endswith(".safetensors")] == []
    assert leftovers(videos.directory) == []
