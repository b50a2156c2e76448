"""Bad input to fpack_train_network.py and convert_lora.py through their entry points: each case is refused with
exit status 2 and one `error:` line naming the flag and the file, before the DiT loads and before anything is
written. Ctrl-C during training exits 130 with one `interrupted` line and says how to resume; what a kill -9 during
a state save leaves is cleaned up by the next run in that folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.badinput import (
    PAUSED,
    ROOT,
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
from tests.factory.caches import video_dataset_config, write_video_caches
from tests.factory.datasets import write_config
from tests.factory.dit import tiny_dit_config
from tests.factory.lora import framepack_lora
from training.checkpoints import STOPPED_BEFORE_TRAINING
from utils.cli import INTERRUPT_GRACE_S

TRAIN = "fpack_train_network.py"
CONVERT = "convert_lora.py"
LWS = 3
TRAIN_LOADING = ("DiT from ", "create LoRA network")
DATASET_READ = "VideoDatasetParams("  # logged as the datasets are read: everything not about them is checked before


def vae_file(models) -> Path:
    return next(Path(models.vae).rglob("*.safetensors"))


def lora_file(path: Path, rank: int, **dit_config) -> Path:
    """A LoRA of the tiny DiT, or of a DiT with other `dit_config` values (another model size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(framepack_lora(tiny_dit_config(**dit_config), rank=rank), str(path))
    return path


def fake_state(folder: Path, rank: int, complete: bool = True, **dit_config) -> Path:
    """A `--save_state` folder whose network has `rank` (what the checks before loading read)."""
    lora_file(folder / "model.safetensors", rank, **dit_config)
    if complete:
        for name in ("optimizer.bin", "scheduler.bin"):
            (folder / name).write_bytes(b"")
    return folder


def dataset_with(root: Path, name: str, lws_in_config: int = LWS, **table) -> Path:
    cache = root / name
    write_video_caches(cache, ["clip"], lws=LWS)
    entry = {"video_directory": cache, "cache_directory": cache, "resolution": [48, 32],
             "target_frames": [4 * LWS + 1], "fp_latent_window_size": lws_in_config, **table}  # fmt: skip
    return write_config(root / f"{name}.toml", [entry])


@pytest.fixture(scope="module")
def world(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_train")
    w = {"root": root, "models": models}
    w["dataset"] = video_dataset_config(root / "good", ["only"], lws=LWS)
    w["text"] = write_text(root / "notes.safetensors")
    w["text_pt"] = write_text(root / "notes.pt")
    w["lora4"] = lora_file(root / "lora4.safetensors", 4)
    w["lora8"] = lora_file(root / "lora8.safetensors", 8)
    w["lora_truncated"] = truncated_copy(w["lora4"], root / "cut.safetensors")
    w["lora_wide"] = lora_file(root / "lora_wide.safetensors", 4, num_attention_heads=2)  # 256 wide, not 128
    w["lora_deep"] = lora_file(root / "lora_deep.safetensors", 4, num_single_layers=5)  # blocks the DiT lacks
    w["state_wide"] = fake_state(root / "state_wide", 4, num_attention_heads=2)
    start = w["start"] = root / "start.png"
    Image.new("RGB", (48, 32), (200, 40, 40)).save(start)
    for name, text in {
        "samples_empty": "# only a comment\n\n",
        "samples_missing_image": f"a cat --i {root / 'no_such.png'}\n",
        "samples_too_long": f"a cat --i {start} --f 99999999\n",
        "samples_bad_size": f"a cat --i {start} --w 40\n",
    }.items():
        w[name] = write_text(root / f"{name}.txt", text)
    w["samples_json"] = write_text(root / "samples.json", '["a cat --i x.png",')
    w["samples_json_shape"] = write_text(root / "samples_shape.json", '{"prompt": "a cat"}')
    w["vae"] = vae_file(models)
    w["a_file"] = write_text(root / "a_file.txt")
    (root / "empty_state").mkdir()
    w["state8"] = fake_state(root / "state8", 8)
    w["state_incomplete"] = fake_state(root / "state_incomplete", 4, complete=False)
    w["lws_mismatch"] = dataset_with(root, "lws", lws_in_config=5)
    truncated = dataset_with(root, "truncated_latent")
    latent = next((root / "truncated_latent").glob("*_fp.safetensors"))
    truncated_copy(latent, latent)
    w["truncated_latent"], w["truncated_latent_file"] = truncated, latent
    w["truncated_text"] = dataset_with(root, "truncated_text")
    text_cache = next((root / "truncated_text").glob("*_fp_te.safetensors"))
    truncated_copy(text_cache, text_cache, keep=0.3)
    w["truncated_text_file"] = text_cache
    (root / "no_caches").mkdir()
    w["no_caches"] = write_config(
        root / "no_caches.toml", [{"video_directory": root / "no_caches", "resolution": [48, 32]}]
    )
    fps = root / "fps.toml"
    fps.write_text(f'[[datasets]]\nvideo_directory = "{root / "good"}"\nsource_fps = inf\n')
    w["fps_inf"] = fps
    w["typo"] = write_config(root / "typo.toml", [{"video_directory": root / "good", "resolutoin": [48, 32]}])
    w["bad_toml"] = write_text(root / "train_options.toml", "learning_rate = = 1\n")
    w["wrong_type"] = write_text(root / "wrong_type.toml", "[optimizer]\nlearning_rate = [1, 2]\n")
    return w


def sampling(w, prompts: str) -> list:
    """Flags of a run that samples the prompts of the world's file `prompts` (with the models sampling loads)."""
    m = w["models"]
    return ["--sample_prompts", w[prompts], "--sample_every_n_steps", "1", "--vae", m.vae,
            "--text_encoder1", m.text_encoder1, "--text_encoder2", m.text_encoder2, "--image_encoder",
            m.image_encoder, "--tokenizer1", m.tokenizer1, "--tokenizer2", m.tokenizer2]  # fmt: skip


def train_case(w, name: str, extra: list, expected: tuple, dataset=None, **kw) -> Case:
    out = w["root"] / f"out_{name}"
    m = w["models"]
    argv = ["--dit", m.dit, "--dataset_config", dataset or w["dataset"], "--sdpa", "--output_dir", out,
            "--network_dim", "4", "--max_train_steps", "2", "--max_data_loader_n_workers", "0", *extra]  # fmt: skip
    if "--output_dir" in extra:  # the case's own --output_dir wins (argparse keeps the last)
        out = None
    loading = TRAIN_LOADING if dataset or name in NEEDS_DATASET else (*TRAIN_LOADING, DATASET_READ)
    return Case(TRAIN, argv, expected, kw.pop("output", out), loading, **kw)


# Flag cases that can only be refused once the dataset is read (the split leaves no item to train on).
NEEDS_DATASET = {"validation_split_too_big"}
# name -> (extra flags of a training run, substrings of its error line); `w` is the module's `world`
FLAG_CASES = {
    "seed_too_big": (lambda w: ["--seed", "99999999999999999999"], ("--seed",)),
    "learning_rate_nan": (lambda w: ["--learning_rate", "nan"], ("--learning_rate", "finite")),
    "dropout_above_one": (lambda w: ["--network_dropout", "1.5"], ("--network_dropout",)),
    "alpha_negative": (lambda w: ["--network_alpha", "-4"], ("--network_alpha",)),
    "guidance_inf": (lambda w: ["--guidance_scale", "inf"], ("--guidance_scale",)),
    "network_module_missing": (
        lambda w: ["--network_module", "networks.no_such"],
        ("--network_module", "networks.no_such"),
    ),
    "include_pattern_bad_regex": (
        lambda w: ["--network_args", "include_patterns=['(']"],
        ("include_patterns", "regex"),
    ),
    "rank_dropout_above_one": (lambda w: ["--network_args", "rank_dropout=2"], ("rank_dropout",)),
    "output_dir_is_a_file": (lambda w: ["--output_dir", w["a_file"]], ("--output_dir", "not a folder")),
    "output_dir_under_a_file": (lambda w: ["--output_dir", w["a_file"] / "sub"], ("--output_dir", "is a file")),
    "resume_empty_folder": (
        lambda w: ["--resume", w["root"] / "empty_state"],
        ("--resume", "not a training state folder"),
    ),
    "resume_other_rank": (
        lambda w: ["--resume", w["state8"]],
        ("--resume", "not a training state of this network: rank 8 vs 4"),
    ),
    "resume_incomplete": (lambda w: ["--resume", w["state_incomplete"]], ("--resume", "optimizer.bin")),
    "network_weights_text": (lambda w: ["--network_weights", w["text"]], ("--network_weights", "notes.safetensors")),
    "network_weights_text_pt": (
        lambda w: ["--network_weights", w["text_pt"]],
        ("--network_weights", "not a LoRA file"),
    ),
    "network_weights_truncated": (
        lambda w: ["--network_weights", w["lora_truncated"]],
        ("--network_weights", "truncated"),
    ),
    "network_weights_vae": (
        lambda w: ["--network_weights", w["vae"]],
        ("--network_weights", "not a LoRA of this network"),
    ),
    "network_weights_other_rank": (lambda w: ["--network_weights", w["lora8"]], ("--network_weights", "rank 8 vs 4")),
    "network_weights_other_width": (
        lambda w: ["--network_weights", w["lora_wide"]],
        ("--network_weights", "lora_wide.safetensors", "256 -> 256 features", "128 -> 128"),
    ),
    "network_weights_other_depth": (
        lambda w: ["--network_weights", w["lora_deep"]],
        ("--network_weights", "not in the DiT of --dit", "single_transformer_blocks_2_"),
    ),
    "network_weights_other_width_dim_from_weights": (
        lambda w: ["--network_weights", w["lora_wide"], "--dim_from_weights"],
        ("--network_weights", "a LoRA of another model size"),
    ),
    "resume_other_width": (lambda w: ["--resume", w["state_wide"]], ("--resume", "state_wide", "another model size")),
    "sample_prompts_empty": (lambda w: sampling(w, "samples_empty"), ("--sample_prompts", "holds no prompt")),
    "sample_prompts_missing_image": (
        lambda w: sampling(w, "samples_missing_image"),
        ("sample prompt 0", "no_such.png", "not found"),
    ),
    "sample_prompts_too_long": (
        lambda w: sampling(w, "samples_too_long"),
        ("samples_too_long.txt", "sample prompt 0", "--f", "GiB", "shorter or smaller video"),
    ),
    "sample_prompts_bad_size": (lambda w: sampling(w, "samples_bad_size"), ("sample prompt 0", "40")),
    "sample_prompts_bad_json": (lambda w: sampling(w, "samples_json"), ("--sample_prompts", "not a JSON file")),
    "sample_prompts_json_not_a_list": (
        lambda w: sampling(w, "samples_json_shape"),
        ("--sample_prompts", "a JSON list"),
    ),
    "dit_text": (lambda w: ["--dit", w["text"]], ("--dit", "notes.safetensors")),
    "dit_is_a_vae": (lambda w: ["--dit", w["vae"]], ("--dit", "FramePack DiT")),
    "base_weights_truncated": (lambda w: ["--base_weights", w["lora_truncated"]], ("--base_weights", "truncated")),
    "base_weights_other_width": (
        lambda w: ["--base_weights", w["lora_wide"]],
        ("--base_weights", "lora_wide.safetensors"),
    ),
    "base_weights_vae": (lambda w: ["--base_weights", w["vae"]], ("--base_weights",)),
    "config_file_missing": (lambda w: ["--config_file", w["root"] / "nope"], ("--config_file", "not found")),
    "config_file_not_toml": (lambda w: ["--config_file", w["bad_toml"]], ("--config_file", "TOML")),
    "config_file_wrong_type": (lambda w: ["--config_file", w["wrong_type"]], ("learning_rate = [1, 2]", "a number")),
    "lr_scheduler_unknown": (lambda w: ["--lr_scheduler", "bogus"], ("--lr_scheduler bogus",)),
    "optimizer_unknown": (lambda w: ["--optimizer_type", "torch.optim.NoSuch"], ("--optimizer_type",)),
    "optimizer_args_not_literal": (lambda w: ["--optimizer_args", "weight_decay=("], ("--optimizer_args",)),
    "optimizer_args_unknown_keyword": (
        lambda w: ["--optimizer_args", "no_such_kw=1"],
        ("--optimizer_args", "no_such_kw"),
    ),
    "log_with_without_logging_dir": (lambda w: ["--log_with", "tensorboard"], ("--log_with", "--logging_dir")),
    "latent_window_size_too_large": (
        lambda w: ["--latent_window_size", "90"],
        ("--latent_window_size 90", "from 1 to 33", "129 frames"),
    ),
    "vae_tile_too_small": (lambda w: ["--vae_spatial_tile_sample_min_size", "8"], ("at least 16", "got 8")),
    "network_args_unknown_key": (
        lambda w: ["--network_args", "loraplus_lr_rato=4"],
        ("--network_args loraplus_lr_rato=4", "did you mean loraplus_lr_ratio?"),
    ),
    "output_name_empty": (lambda w: ["--output_name", ""], ("--output_name ''", "file name")),
    "output_name_with_a_folder": (lambda w: ["--output_name", "runs/a"], ("--output_name 'runs/a'", "--output_dir")),
    "dataset_config_is_a_folder": (lambda w: ["--dataset_config", w["root"]], ("is a folder", ".toml")),
    "validation_split_too_big": (lambda w: ["--validation_split", "0.5"], ("--validation_split",)),
}  # fmt: skip
# name -> (the world's dataset config to train on, substrings of the error line)
DATASET_CASES = {
    "dataset_without_caches": ("no_caches", lambda w: ("--dataset_config", "no cached items")),
    "cache_window_size_mismatch": ("lws_mismatch", lambda w: ("_fp.safetensors", "fp_latent_window_size 3", "sets 5")),
    "latent_cache_truncated": ("truncated_latent", lambda w: (str(w["truncated_latent_file"]), "--skip_existing")),
    "text_cache_truncated": ("truncated_text", lambda w: (str(w["truncated_text_file"]), "--skip_existing")),
    "source_fps_inf": ("fps_inf", lambda w: ("source_fps", "finite")),
    "dataset_key_typo": ("typo", lambda w: ("resolutoin", "did you mean 'resolution'")),
}  # fmt: skip


def _convert(inputs: str, output=lambda w: w["root"] / "converted.safetensors", target="other"):
    return lambda w: [
        "--input",
        w[inputs] if inputs in w else w["root"] / inputs,
        "--output",
        output(w),
        "--target",
        target,
    ]


# name -> (convert_lora.py arguments, substrings of the error line)
CONVERT_CASES = {
    "convert_input_text": (_convert("text"), ("--input", "notes.safetensors")),
    "convert_input_text_pt": (_convert("text_pt"), ("--input", "not a LoRA file")),
    "convert_input_truncated": (_convert("lora_truncated"), ("--input", "truncated")),
    "convert_input_vae": (_convert("vae"), ("--input", "no key is in a LoRA layout")),
    "convert_output_is_a_folder": (_convert("lora4", lambda w: w["root"]), ("--output", "is a folder")),
    "convert_output_under_a_file": (
        _convert("lora4", lambda w: w["a_file"] / "x.safetensors", "default"),
        ("--output", "is a file"),
    ),
    "convert_inspect_text": (lambda w: ["--inspect", w["text"]], ("--inspect", "notes.safetensors")),
}  # fmt: skip
CASE_NAMES = [*FLAG_CASES, *DATASET_CASES, *CONVERT_CASES]


def cases(w) -> dict[str, Case]:
    built = {name: train_case(w, name, extra(w), expected) for name, (extra, expected) in FLAG_CASES.items()}
    for name, (dataset, expected) in DATASET_CASES.items():
        built[name] = train_case(w, name, [], expected(w), w[dataset])
    for name, (argv, expected) in CONVERT_CASES.items():
        built[name] = Case(CONVERT, argv(w), expected, w["root"] / f"out_{name}")
    return built


@pytest.fixture(scope="module")
def refusals(world):
    return run_cases(cases(world), world["root"] / "logs")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_refused_with_one_line_before_loading(refusals, name):
    check_refusal(refusals[name])


@pytest.mark.parametrize("name", ["dit_is_a_vae", "network_weights_other_width", "sample_prompts_too_long"])
def test_a_fresh_interpreter_refuses_as_the_forked_case_does(refusals, name):
    """The cases run forked from a runner that imported torch once; a cold start of the script gives the same."""
    case = refusals[name]
    cold = run_script(case.script, case.argv)
    assert cold.returncode == case.result.returncode == 2
    error_lines = [
        [line for line in text.splitlines() if line.startswith("error:")] for text in (cold.stderr, case.result.stderr)
    ]
    assert error_lines[0] == error_lines[1] and len(error_lines[0]) == 1, cold.stderr[-3000:]


def test_converted_file_is_not_written_by_any_refused_conversion(refusals, world):
    assert not (world["root"] / "converted.safetensors").exists()


# ---- interruptions ---------------------------------------------------------------------------------------------


class Running:
    """A script started in the background; its stderr collected as it comes."""

    def __init__(self, script: str, argv: list):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("FPACK_DEBUG", None)
        cmd = [sys.executable, str(ROOT / script), *map(str, argv)]
        self.process = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.chunks: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: self.process.stderr.read1(4096), b""):
            self.chunks.append(chunk.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.chunks)

    def wait_for(self, condition, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited early ({self.process.returncode}):\n{self.stderr[-3000:]}"
            assert time.monotonic() < end, f"timed out:\n{self.stderr[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self.reader.join(10)
        return code


def long_training(w, out: Path, *extra) -> list:
    m = w["models"]
    return ["--dit", m.dit, "--dataset_config", w["dataset"], "--sdpa", "--output_dir", out, "--output_name", "lora",
            "--network_dim", "4", "--max_train_steps", "100000", "--max_data_loader_n_workers", "0",
            "--mixed_precision", "bf16", "--seed", "1", *extra]  # fmt: skip


def test_ctrl_c_during_training_exits_130_keeps_complete_saves_and_says_how_to_resume(world, tmp_path):
    out = tmp_path / "out"
    run = Running(TRAIN, long_training(world, out, "--save_every_n_steps", "2", "--save_state"))
    run.wait_for(lambda: (out / "lora-step00000002-state").is_dir())
    time.sleep(0.3)
    run.process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = run.finish()
    seconds = time.monotonic() - sent
    lines = run.stderr.splitlines()
    assert code == 130, run.stderr[-3000:]
    assert seconds < 10, seconds
    assert [line for line in lines if line.strip() == "interrupted"] == ["interrupted"]
    assert "Traceback" not in run.stderr and not any(line.startswith("error:") for line in lines)
    assert "--resume " + str(out / "lora-step0000000") in run.stderr  # the last complete state, by name
    assert leftovers(out) == []
    for lora in out.glob("*.safetensors"):
        assert load_file(lora)  # every LoRA left is complete
    for state in out.glob("*-state"):
        assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(os.listdir(state))


def test_kill_during_a_state_save_leaves_nothing_after_the_next_run(world, tmp_path):
    out = tmp_path / "out"
    run = Running(TRAIN, long_training(world, out, "--save_every_n_steps", "1", "--save_state"))
    run.wait_for(lambda: run.stderr.count("saving state:") >= 3)
    run.process.kill()
    run.finish()
    if not leftovers(out):  # the kill fell between two saves: leave what a kill inside one leaves
        (out / "lora-step00000099-state.tmp").mkdir()
        (out / "lora-step00000099-state.tmp" / "optimizer.bin").write_bytes(b"half")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (out / f"lora-step00000099.safetensors.tmp{dead.pid}").write_bytes(b"half")
    assert leftovers(out)
    m = world["models"]
    result = run_script(TRAIN, ["--dit", m.dit, "--dataset_config", world["dataset"], "--sdpa", "--output_dir", out,
                                "--output_name", "again", "--network_dim", "4", "--max_train_steps", "1",
                                "--max_data_loader_n_workers", "0", "--seed", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert leftovers(out) == []
    assert "left by an interrupted save" in result.stderr
    assert torch.is_tensor(next(iter(load_file(out / "again.safetensors").values())))


# Ctrl-C in a chosen phase: tests/pause_launcher.py holds the run up there and the signal is sent when it says so.


def training_cmd(w, out: Path, *extra) -> list:
    return [sys.executable, TRAIN, *long_training(w, out, *extra)]


def test_ctrl_c_while_the_dit_loads_exits_130_and_says_nothing_was_saved(world, tmp_path):
    out = tmp_path / "out"
    cmd = held_up(training_cmd(world, out), "frame_pack.dit_loader:load_packed_model")
    code, stderr, seconds = interrupt_when(cmd, PAUSED)
    assert_interrupted(code, stderr, seconds)
    assert "create LoRA network" not in stderr  # the signal came while the DiT loaded
    assert STOPPED_BEFORE_TRAINING in stderr
    assert files_under(out) == []


def test_ctrl_c_while_a_lora_is_saved_removes_it_and_keeps_the_previous_one(world, tmp_path):
    out = tmp_path / "out"
    held = r"lora-step\d+\.safetensors\.tmp\d+',"  # the second LoRA save, its file written, not yet renamed
    cmd = held_up(training_cmd(world, out, "--save_every_n_steps", "1"), "os:replace", match=held, call=2)
    seen = {}
    code, stderr, seconds = interrupt_when(cmd, PAUSED, at_signal=lambda: seen.update(files=files_under(out)))
    assert_interrupted(code, stderr, seconds)
    assert [name for name in seen["files"] if ".tmp" in name] != []  # the signal came during that save
    assert files_under(out) == ["lora-step00000001.safetensors"]
    assert load_file(out / "lora-step00000001.safetensors")
    assert "last LoRA saved: " + str(out / "lora-step00000001.safetensors") in stderr
    assert "no training state was saved" in stderr and "--save_state" in stderr


def test_a_swallowed_ctrl_c_during_a_state_save_is_ended_by_the_watchdog_which_removes_the_half_state(world, tmp_path):
    """The KeyboardInterrupt is dropped (as a library dropped one while text encoders loaded): the watchdog ends the
    run after the grace, removes this run's half-written state folder and still says where to resume."""
    out = tmp_path / "out"
    held = r"-state\.tmp',"  # the second state: its folder written, not yet renamed
    extra = ("--save_every_n_steps", "1", "--save_state")
    cmd = held_up(training_cmd(world, out, *extra), "os:replace", match=held, call=2, swallow=True)
    seen = {}
    code, stderr, seconds = interrupt_when(cmd, PAUSED, at_signal=lambda: seen.update(files=leftovers(out)))
    assert_interrupted(code, stderr, seconds)
    assert seconds >= INTERRUPT_GRACE_S  # ended by the watchdog, not by the KeyboardInterrupt
    assert "lora-step00000002-state.tmp" in seen["files"]
    assert leftovers(out) == []
    (state,) = out.glob("*-state")
    assert state.name == "lora-step00000001-state"
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(os.listdir(state))
    assert "--resume " + str(out / "lora-step00000001-state") in stderr
