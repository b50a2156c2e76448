"""Generation and caching spread over two CPU processes (gloo): the same outputs as one process, one summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.cache_latents as cl
import pipelines.cache_text_encoder_outputs as ct
from pipelines import generate as G
from pipelines.latent_file import load_latent
from tests.factory.datasets import make_video_dataset, write_config
from utils.distributed import SINGLE_PROCESS, Outcome, Processes, ShareFailed, failure_summary, share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@contextmanager
def one_thread():
    """The thread count of the launched processes (OMP_NUM_THREADS=1), so reductions add in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def launch(launcher: list[str], script: str, *flags) -> subprocess.CompletedProcess:
    cmd = [*launcher, os.path.join(ROOT, script), *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


ACCELERATE = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
TORCHRUN = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"]


# ---- the split --------------------------------------------------------------------------------------------------


def test_items_go_round_robin_and_the_split_continues_across_datasets():
    items = list("abcdefg")
    assert [share(items, r, 3) for r in range(3)] == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    # datasets of 3 and 2 media files: global numbers 0 1 2 | 3 4 → rank 0 gets 0, 2 | 4, rank 1 gets 1 | 3
    rank0, rank1 = Processes(0, 2), Processes(1, 2)
    assert (rank0.share_of_range(0, 3), rank0.share_of_range(3, 2)) == ([0, 2], [1])
    assert (rank1.share_of_range(0, 3), rank1.share_of_range(3, 2)) == ([1], [0])


def test_one_process_runs_everything_and_reports_its_error_unchanged():
    assert SINGLE_PROCESS.share([1, 2, 3]) == [1, 2, 3] and SINGLE_PROCESS.gather([5]) == [5]
    assert SINGLE_PROCESS.run_share(lambda: "done", (ValueError,)) == ["done"]

    def fail():
        raise ValueError("clip_1: too short")

    with pytest.raises(ShareFailed, match=r"^clip_1: too short$"):
        SINGLE_PROCESS.run_share(fail, (ValueError,))
    outcomes = [Outcome(0, [], None), Outcome(1, None, "clip_1: too short"), Outcome(2, None, "bad.png")]
    assert failure_summary(outcomes) == "process 1 of 3 failed: clip_1: too short; process 2 of 3 failed: bad.png"
    assert failure_summary(outcomes[:1]) is None


def test_each_process_takes_its_own_device_unless_one_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a named --device must exist
    assert Processes(3, 4, local_rank=1).device(None) == torch.device("cuda", 1)
    assert Processes(3, 4, local_rank=1).device("cuda") == torch.device("cuda", 1)
    assert Processes(3, 4, local_rank=1).device("cuda:0") == torch.device("cuda", 0)
    assert Processes(3, 4, local_rank=1).device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Processes(1, 2, local_rank=1).device(None) == torch.device("cpu")


# ---- two processes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_config(tmp_path_factory):
    """Three clips (one and two sections at window size 2) and a config writer for any cache directory."""
    root = tmp_path_factory.mktemp("distributed_videos")
    videos = make_video_dataset(root, lengths=(13, 17, 13))

    def config(cache_directory):
        entry = dict(video_directory=videos.directory, cache_directory=cache_directory, caption_extension=".txt",
                     resolution=[48, 32], frame_extraction="full", max_frames=64, fp_latent_window_size=2)  # fmt: skip
        return str(write_config(cache_directory.parent / f"{cache_directory.name}.toml", [entry]))

    return config


def cache_files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["fpack_cache_latents.py", "fpack_cache_text_encoder_outputs.py"])
def test_two_process_caches_are_byte_identical_and_only_stale_files_go(models, video_config, tmp_path, script):
    m = models
    if script == "fpack_cache_latents.py":
        module, stale = cl, "gone_00000-013-0000_0048x0032_fp.safetensors"
        flags = ["--vae", m.vae, "--image_encoder", m.image_encoder]
    else:
        module, stale = ct, "gone_fp_te.safetensors"
        flags = ["--text_encoder1", m.text_encoder1, "--text_encoder2", m.text_encoder2,
                 "--tokenizer1", m.tokenizer1, "--tokenizer2", m.tokenizer2]  # fmt: skip
    single, several = tmp_path / "single", tmp_path / "several"
    with one_thread():
        assert module.main(["--dataset_config", video_config(single), *map(str, flags)]) == 0
    several.mkdir()
    (several / stale).write_bytes(b"left over from an earlier dataset")
    result = launch(TORCHRUN, script, "--dataset_config", video_config(several), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = cache_files(single)
    assert len(expected) == (4 if module is cl else 3)  # 1 + 2 + 1 sections, or one text cache per clip
    assert cache_files(several) == expected
    assert result.stderr.count("removed old cache file") == 1  # by the main process only
    # each clip was read by one process (ranks 0 and 1 take 2 and 1 of the 3 clips)
    if module is cl:
        assert len(re.findall(r"cache_latents: caching \S*clip_\d", result.stderr)) == 3
    else:
        assert "| 2/2 [" in result.stderr and "| 1/1 [" in result.stderr and "| 3/3 [" not in result.stderr


def write_image(path, color):
    Image.fromarray(np.full((32, 48, 3), color, np.uint8)).save(path)
    return str(path)


@pytest.mark.slow
def test_two_process_prompt_file_matches_one_process_and_reports_the_failing_line(models, tmp_path):
    start = write_image(tmp_path / "start.png", (200, 40, 40))
    prompts = tmp_path / "prompts.txt"
    # prompt i goes to rank i mod 2: rank 0 gets file lines 2, 5, 7; rank 1 gets lines 4 (a missing image) and 6.
    # Lines 2 and 6 share a seed, so the two processes write names of the same second and seed at once.
    prompts.write_text(
        "# queue\n"
        "a red square --d 5\n"
        "\n"
        "a missing image --i no_such_file.png --d 6\n"
        "a blue square --d 7\n"
        "a green square --d 5 --g 8\n"
        "a white square --d 9\n",
        encoding="utf-8",
    )
    flags = [*models.flags(), "--from_file", prompts, "--image_path", start, "--video_size", 32, 48,
             "--latent_window_size", 3, "--video_sections", 1, "--infer_steps", 2,
             "--output_type", "latent"]  # fmt: skip
    with one_thread():
        assert G.main([*map(str, flags), "--save_path", str(tmp_path / "single")]) == 1
    result = launch(ACCELERATE, "fpack_generate_video.py", *flags, "--save_path", tmp_path / "several")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{prompts}:4: " in result.stderr and "no_such_file.png" in result.stderr
    assert result.stderr.count("prompts done") == 1 and "4 of 5 prompts done; failed: line 4" in result.stderr

    def latents(folder):
        found = {}
        for name in os.listdir(folder):
            latent, meta = load_latent(str(folder / name))
            found[(meta["prompt"], meta["seeds"])] = latent
        return found

    expected, actual = latents(tmp_path / "single"), latents(tmp_path / "several")
    assert len(os.listdir(tmp_path / "several")) == 4 and sorted(actual) == sorted(expected)
    assert all(actual[key].equal(expected[key]) for key in expected)


def test_processes_pick_free_output_names_from_disjoint_sets(tmp_path, monkeypatch):
    base = str(tmp_path / "20260101-120000_5_latent.safetensors")
    monkeypatch.setenv("WORLD_SIZE", "2")
    picks = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        picks[rank] = G._unique(base)
    assert picks == {0: base, 1: base.replace("_latent.", "_latent-1.")}
    open(base, "w").close()
    monkeypatch.setenv("RANK", "0")
    assert G._unique(base) == base.replace("_latent.", "_latent-2.")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert G._unique(base) == base.replace("_latent.", "_latent-1.")  # one process: the first free suffix
