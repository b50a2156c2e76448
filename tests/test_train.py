"""fpack_train_network.py on the tiny factory DiT and tiny cached datasets (tests/factory/caches.py).

Training runs happen in this process (accelerate's singletons are reset around each run); the two-process run and
`--help` go through the real entry points.
"""

import argparse
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.factory.caches import one_frame_dataset_config, video_dataset_config
from tests.factory.dit import tiny_dit_config
from tests.factory.lora import framepack_modules
from training import timesteps as T
from training.args import build_parser, int_or_float, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LWS = 3
RANK = 4


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One cached video section: the whole dataset is one repeated sample."""
    return video_dataset_config(tmp_path_factory.mktemp("single"), ["only"], lws=LWS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two cached sections: two batches per epoch, so a mid-epoch state exists."""
    return video_dataset_config(tmp_path_factory.mktemp("pair"), ["a", "b"], lws=LWS)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(models, dataset, out, *extra, seed=1, steps=4):
    """Run the trainer in this process; returns the output folder."""
    from training.trainer import main

    argv = [
        "--dit", str(models.dit), "--dataset_config", str(dataset), "--sdpa", "--mixed_precision", "bf16",
        "--max_train_steps", str(steps), "--max_data_loader_n_workers", "0", "--output_dir", str(out),
        "--output_name", "lora", "--network_dim", str(RANK), "--network_alpha", str(RANK),
        "--learning_rate", "1e-2", "--seed", str(seed), *map(str, extra),
    ]  # fmt: skip
    _reset_accelerate()
    try:
        assert main(argv) == 0
    finally:
        _reset_accelerate()
    return Path(out)


def sample_model_files(models):
    return [
        "--vae", models.vae, "--text_encoder1", models.text_encoder1, "--text_encoder2", models.text_encoder2,
        "--image_encoder", models.image_encoder, "--tokenizer1", models.tokenizer1, "--tokenizer2", models.tokenizer2,
    ]  # fmt: skip


def metrics(out):
    (path,) = glob.glob(os.path.join(out, "logs", "*", "metrics.jsonl"))
    return [json.loads(line) for line in open(path)]


# ---- the flags --------------------------------------------------------------------------------------------------


def test_help_lists_every_reference_flag_with_its_default():
    spec = os.path.join(ROOT, "tests", "data", "reference_flags.json")
    reference = json.load(open(spec))["scripts"]["fpack_train_network.py"]
    assert len(reference) == 112
    ours = {flag: action for action in build_parser()._actions for flag in action.option_strings}
    for row in reference:
        assert ours[row["flags"][0]].default == row["default"], row["flags"]
    help_text = subprocess.run(
        [sys.executable, os.path.join(ROOT, "fpack_train_network.py"), "--help"], capture_output=True, text=True
    ).stdout
    for row in reference:
        assert row["flags"][0] in help_text
    assert "(default: 1600)" in help_text and "(default: sigma)" in help_text


def test_int_or_float_and_config_file(tmp_path, models, single):
    assert int_or_float("100") == 100 and int_or_float("0.1") == 0.1 and int_or_float("5%") == 0.05
    with pytest.raises(argparse.ArgumentTypeError):
        int_or_float("10.0")
    config = tmp_path / "train.toml"
    config.write_text('[optimizer]\nlearning_rate = 0.5\nmax_train_steps = 7\n[net]\nnetwork_args = ["verbose=True"]\n')
    base = ["--dit", str(models.dit), "--dataset_config", str(single), "--sdpa", "--output_dir", str(tmp_path)]
    args = parse_args([*base, "--config_file", str(tmp_path / "train"), "--max_train_steps", "3"])
    assert (args.learning_rate, args.max_train_steps, args.network_args) == (0.5, 3, ["verbose=True"])
    assert args.config_file == str(tmp_path / "train")


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--sdpa"),
        (["--sdpa", "--sage_attn"], "--sage_attn"),
        (["--sdpa", "--fp8_scaled"], "--fp8_base"),
        (["--sdpa", "--blocks_to_swap", "37"], "--blocks_to_swap"),
        (["--sdpa", "--vae_dtype", "float64"], "--vae_dtype"),
        (["--sdpa", "--dim_from_weights"], "--network_weights"),
        (["--sdpa", "--sample_prompts", __file__], "--vae"),
    ],
)
def test_bad_flags_are_refused_before_loading(models, single, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(["--dit", str(models.dit), "--dataset_config", str(single), "--output_dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err


def test_explicit_trackers_must_be_installed():
    from training.tracking import resolve_trackers

    with pytest.raises(ValueError, match="--logging_dir"):
        resolve_trackers(build_parser().parse_args(["--log_with", "tensorboard"]), None)
    for tracker in ("tensorboard", "wandb"):
        if importlib.util.find_spec(tracker) is None:
            with pytest.raises(ImportError, match=f"--log_with {tracker} needs the {tracker} package"):
                resolve_trackers(build_parser().parse_args(["--log_with", tracker]), "logs")


# ---- timesteps ----------------------------------------------------------------------------------------------------


def sampling_args(mode, **overrides):
    flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    return build_parser().parse_args(["--timestep_sampling", mode, *flags])


def draw(mode, n=20000, **overrides):
    """Timesteps and noisy values of `n` samples with latents 0 and noise 1, so the noisy value is σ (or t)."""
    args = sampling_args(mode, **overrides)
    torch.manual_seed(0)
    latents = torch.zeros(n, 1, 1, 1, 1)
    noisy, timesteps = T.noisy_model_input_and_timesteps(args, torch.ones_like(latents), latents, "cpu", torch.float32)
    return timesteps, noisy.flatten()


def draw_continuous(mode, latent_hw, n=20000, **overrides):
    """Model timesteps of the continuous modes for latents of spatial size `latent_hw` (flux_shift depends on it)."""
    torch.manual_seed(0)
    return T.continuous_t(sampling_args(mode, **overrides), n, latent_hw, "cpu") * 1000 + 1


@pytest.mark.parametrize("mode", T.TIMESTEP_SAMPLING_MODES)
def test_every_timestep_mode_stays_in_range_and_matches_its_noise_level(mode):
    timesteps, sigma = draw(mode, 4000)
    if mode == "sigma":
        assert timesteps.min() >= 1 and timesteps.max() <= 1000
        assert torch.allclose(timesteps, timesteps.round(), atol=1e-3)  # the table is linspace(1, 0, 1001)·1000
        assert torch.allclose(sigma, timesteps / 1000, atol=1e-6)
    else:
        assert timesteps.min() >= 1 and timesteps.max() <= 1001
        assert torch.allclose(sigma * 1000 + 1, timesteps, atol=1e-3)


def quantile(t, q):
    return float(torch.quantile(t.float(), q))


def test_timestep_distribution_shapes():
    uniform, _ = draw("uniform")
    assert abs(uniform.mean() - 501) < 10 and abs(quantile(uniform, 0.25) - 251) < 15
    sigmoid, _ = draw("sigmoid")
    middle = ((sigmoid > 250) & (sigmoid < 750)).float().mean()
    assert abs(sigmoid.mean() - 501) < 10 and middle > 0.6  # uniform would give 0.5
    shifted, _ = draw("shift", discrete_flow_shift=3.0)
    assert quantile(shifted, 0.5) > 700  # shift 3 moves the median σ 0.5 to 0.75
    unshifted, _ = draw("shift", discrete_flow_shift=1.0)
    assert abs(quantile(unshifted, 0.5) - 501) < 15
    sigma, _ = draw("sigma", discrete_flow_shift=3.0)  # the shift does not apply to the sigma mode
    assert abs(sigma.float().mean() - 500.5) < 10
    logit, _ = draw("sigma", weighting_scheme="logit_normal")
    assert ((logit > 250) & (logit < 750)).float().mean() > 0.6
    flux_small = draw_continuous("flux_shift", (16, 16))
    flux_large = draw_continuous("flux_shift", (128, 128))
    assert quantile(flux_large, 0.5) > quantile(flux_small, 0.5) > 501  # more tokens, more noise
    logsnr, _ = draw("logsnr", logit_mean=-6.0, logit_std=2.0)
    assert quantile(logsnr, 0.5) > 900  # style-friendly: mostly high noise
    qinglong = draw_continuous("qinglong", (80, 80))
    low = (qinglong < 200).float().mean()
    assert 0.08 < low < 0.2  # the 12.5 % logsnr(+5.36) share sits near t = 0.06


def test_timestep_bounds_and_sigma_mode_reversal():
    uniform, _ = draw("uniform", min_timestep=200, max_timestep=300)
    assert uniform.min() >= 201 and uniform.max() <= 301
    sigma, _ = draw("sigma", min_timestep=200, max_timestep=300)
    assert sigma.min() > 700 and sigma.max() <= 800  # bounds apply to the table index: (1000 − max, 1000 − min]


def test_loss_weighting():
    timesteps = torch.tensor([1000.0, 500.0, 250.0])
    sigma_sqrt = T.loss_weighting("sigma_sqrt", timesteps, "cpu", torch.float32).flatten()
    assert torch.allclose(sigma_sqrt, torch.tensor([1.0, 4.0, 16.0]))
    cosmap = T.loss_weighting("cosmap", timesteps, "cpu", torch.float32).flatten()
    s = torch.tensor([1.0, 0.5, 0.25])
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    assert T.loss_weighting("none", timesteps, "cpu", torch.float32) is None
    assert T.loss_weighting("logit_normal", timesteps, "cpu", torch.float32) is None


def test_show_timesteps_console(capsys):
    from training.trainer import main

    assert main(["--show_timesteps", "console", "--timestep_sampling", "uniform"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("   0-  24:")]) == 2
    assert len(lines) == 2 + 2 * 40


# ---- training -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit(models, single, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit")
    return train(
        models,
        single,
        out,
        "--logging_dir",
        out / "logs",
        "--log_config",
        "--training_comment",
        "tiny",
        steps=20,
        seed=3,
    )


def test_overfitting_one_sample_lowers_the_loss_and_logs_every_step(overfit):
    rows = [r for r in metrics(overfit) if "loss/current" in r]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(r["lr/unet"] == 1e-2 for r in rows)
    losses = [r["loss/current"] for r in rows]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert any("loss/epoch" in r for r in metrics(overfit))
    config = metrics(overfit)[0]["config"]
    assert config["max_train_steps"] == 20 and "dit" not in config and "output_dir" not in config


def test_lora_keys_shapes_and_metadata(overfit, single):
    path = overfit / "lora.safetensors"
    expected = {}
    for name, (_, (out_features, in_features)) in framepack_modules(tiny_dit_config()).items():
        expected[f"{name}.lora_down.weight"] = (RANK, in_features)
        expected[f"{name}.lora_up.weight"] = (out_features, RANK)
        expected[f"{name}.alpha"] = ()
    tensors = load_file(path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert "ss_ss_session_id" not in meta and meta["ss_session_id"].isdigit()
    assert meta["ss_network_module"] == "networks.lora_framepack" and meta["ss_network_dim"] == str(RANK)
    assert (meta["ss_seed"], meta["ss_steps"], meta["ss_max_train_steps"]) == ("3", "20", "20")
    assert meta["ss_base_model_version"] == "framepack" and meta["ss_training_comment"] == "tiny"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" and meta["ss_output_name"] == "lora"
    assert json.loads(meta["ss_datasets"])[0]["batch_size_per_device"] == 1
    assert meta["modelspec.architecture"] == "framepack/lora" and meta["modelspec.title"] == "lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.resolution"] == "1280x720"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    for key in (
        "ss_training_started_at",
        "ss_training_finished_at",
        "ss_num_epochs",
        "ss_lr_scheduler",
        "ss_mixed_precision",
        "ss_timestep_sampling",
        "ss_sd_model_name",
        "modelspec.date",
    ):
        assert key in meta, key


def test_trained_lora_changes_generation_and_multiplier_zero_reproduces_the_base(overfit, models, tmp_path):
    import numpy as np
    from PIL import Image

    from pipelines import generate as G
    from pipelines.latent_file import load_latent

    image = tmp_path / "start.png"
    Image.fromarray(np.full((32, 48, 3), 120, np.uint8)).save(image)

    def generate(out, *extra):
        argv = [*models.flags(), "--video_size", "32", "48", "--latent_window_size", str(LWS), "--infer_steps", "2",
                "--save_path", str(out), "--image_path", str(image), "--prompt", "p", "--seed", "5",
                "--video_sections", "1", "--output_type", "latent", *extra]  # fmt: skip
        assert G.main(argv) == 0
        (path,) = glob.glob(os.path.join(out, "*.safetensors"))
        return load_latent(path)[0]

    lora = str(overfit / "lora.safetensors")
    base = generate(tmp_path / "base")
    assert not torch.equal(base, generate(tmp_path / "lora", "--lora_weight", lora))
    assert torch.equal(base, generate(tmp_path / "zero", "--lora_weight", lora, "--lora_multiplier", "0"))


@pytest.mark.parametrize("save", [["--save_every_n_steps", "3"], ["--save_every_n_epochs", "1"]])
def test_resume_from_a_saved_state_ends_with_the_same_lora(models, pair, tmp_path, save):
    """Mid-epoch (step 3 of 2-batch epochs) and epoch-end states: resuming reproduces the uninterrupted run."""
    full = train(models, pair, tmp_path / "full", *save, "--save_state", steps=6)
    (state,) = sorted(glob.glob(str(full / "lora-*-state")))[:1]
    resumed = train(models, pair, tmp_path / "resumed", "--resume", state, steps=6)
    a, b = load_file(full / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(resumed / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_steps"] == "6"
    other_seed = load_file(train(models, pair, tmp_path / "other", steps=6, seed=2) / "lora.safetensors")
    assert not all(torch.equal(a[k], other_seed[k]) for k in a)


def test_saves_are_named_and_pruned_like_the_reference(models, pair, tmp_path):
    flags = "--save_every_n_steps 1 --save_last_n_steps 2 --save_every_n_epochs 1 --save_last_n_epochs 1 "
    flags += "--save_state --save_last_n_steps_state 1"
    out = train(models, pair, tmp_path, *flags.split(), steps=6)
    names = sorted(os.listdir(out))
    assert "lora.safetensors" in names and not any(n.endswith(".tmp") for n in names)
    assert [n for n in names if "step" in n and n.endswith(".safetensors")] == [
        f"lora-step{s:08d}.safetensors" for s in (4, 5, 6)
    ]
    assert [n for n in names if "step" in n and n.endswith("-state")] == [
        "lora-step00000005-state",
        "lora-step00000006-state",
    ]
    # epochs 1 and 2 of 3 are saved (the last one is the final save); keeping 1 leaves epoch 2
    assert [n for n in names if n.startswith("lora-0")] == ["lora-000002-state", "lora-000002.safetensors"]


def test_batch_of_two_with_split_attn_and_without(models, tmp_path):
    dataset = video_dataset_config(tmp_path / "data", ["a", "b", "c", "d"], lws=LWS, batch_size=2)
    losses = []
    for name, extra in (("split", ["--split_attn"]), ("masked", [])):
        out = train(models, dataset, tmp_path / name, "--logging_dir", tmp_path / name / "logs", *extra, steps=2)
        assert load_file(out / "lora.safetensors")[
            "lora_unet_single_transformer_blocks_1_proj_out.lora_up.weight"
        ].any()
        losses.append(metrics(out)[0]["loss/current"])
    # both attend over each sample's valid tokens only, so the first step sees the same loss
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_memory_options_gradient_checkpointing_fp8_and_block_swap_train(models, single, tmp_path, caplog):
    flags = "--gradient_checkpointing --fp8_base --fp8_scaled --blocks_to_swap 2 --gradient_accumulation_steps 2 "
    flags += "--max_grad_norm 0.5 --scale_weight_norms 1.0"
    out = train(models, single, tmp_path, *flags.split(), steps=2)
    assert load_file(out / "lora.safetensors")["lora_unet_transformer_blocks_0_ff_net_2.lora_up.weight"].any()
    assert "no effect when the model runs on the CPU" in caplog.text


def test_network_weights_dim_from_weights_and_base_weights(models, single, overfit, tmp_path):
    start = overfit / "lora.safetensors"
    cont = train(
        models, single, tmp_path / "cont", "--network_weights", start, "--learning_rate", "1e-12", steps=1, seed=9
    )
    a, b = load_file(start), load_file(cont / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # a negligible step: the loaded weights come back unchanged
    from_weights = train(models, single, tmp_path / "dim", "--network_weights", start, "--dim_from_weights",
                         "--network_dim", "8", steps=1)  # fmt: skip
    down = load_file(from_weights / "lora.safetensors")["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"]
    assert down.shape[0] == RANK  # the file's rank, not --network_dim
    merged = train(models, single, tmp_path / "merged", "--base_weights", start, "--base_weights_multiplier", "0.5",
                   "--logging_dir", tmp_path / "merged" / "logs", steps=1, seed=3)  # fmt: skip
    fresh = train(models, single, tmp_path / "fresh", "--logging_dir", tmp_path / "fresh" / "logs", steps=1, seed=3)
    assert metrics(merged)[0]["loss/current"] != metrics(fresh)[0]["loss/current"]


def test_optimizers(models, single, tmp_path):
    from training.optim import ConstantLRScheduler, create_lr_scheduler, create_optimizer

    def make(*flags):
        args = build_parser().parse_args(["--learning_rate", "0.1", *flags])
        params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": args.learning_rate}]
        info = create_optimizer(args, params)
        return args, info, create_lr_scheduler(args, info, 1)

    assert type(make()[1].optimizer) is torch.optim.AdamW  # the empty default
    assert type(make("--optimizer_type", "SGD", "--optimizer_args", "momentum=0.9")[1].optimizer) is torch.optim.SGD
    _, info, _ = make("--optimizer_type", "torch.optim.RMSprop", "--optimizer_args", "alpha=0.9")
    assert info.name == "torch.optim.rmsprop.RMSprop" and info.args == "alpha=0.9"
    with pytest.raises(ImportError, match="--optimizer_type AdamW8bit needs the bitsandbytes"):
        make("--optimizer_type", "AdamW8bit")
    args, info, scheduler = make("--optimizer_type", "Adafactor")
    assert info.lr_scheduler == "adafactor:0.1" and info.learning_rate is None
    assert (args.lr_scheduler, args.learning_rate) == ("constant", 0.1)  # the flags are left as given
    _, info, scheduler = make("--optimizer_type", "tests.test_train.AdamWScheduleFree")
    assert isinstance(scheduler, ConstantLRScheduler) and scheduler.get_last_lr() == [0.1]
    args, info, scheduler = make(
        "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.5", "--max_train_steps", "4"
    )
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        info.optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.1])
    _, info, scheduler = make("--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:2,0.1'")
    info.optimizer.step()
    scheduler.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.01])
    with pytest.raises(ValueError, match="takes no warmup"):
        make("--lr_scheduler", "constant", "--lr_warmup_steps", "2")
    out = train(
        models,
        single,
        tmp_path,
        "--optimizer_type",
        "Adafactor",
        "--optimizer_args",
        "relative_step=False",
        "scale_parameter=False",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "1",
        steps=2,
    )
    with safe_open(out / "lora.safetensors", "pt") as f:
        assert "Adafactor(relative_step=False,scale_parameter=False)" in f.metadata()["ss_optimizer"]


class AdamWScheduleFree(torch.optim.AdamW):
    """A stand-in schedule-free optimizer (name ends with ScheduleFree, has train/eval)."""

    def train(self):
        pass

    def eval(self):
        pass


# ---- one-frame training and sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"no_2x": True, "no_4x": True},
        {"no_post": True, "target_index": 1},
    ],
)
def test_one_frame_training_runs_and_writes_a_lora(models, tmp_path, options):
    clean = (0, 10) if options.get("no_post") else (0,)
    dataset = one_frame_dataset_config(tmp_path, ["x", "y"], batch_size=2, clean_indices=clean, **options)
    out = train(models, dataset, tmp_path / "out", "--split_attn", steps=2)
    assert load_file(out / "lora.safetensors")["lora_unet_transformer_blocks_1_attn_to_v.lora_up.weight"].any()


def test_one_frame_model_inputs_get_zero_2x_4x_latents_only_where_indices_were_cached():
    from training.trainer import model_inputs

    h, w = 4, 6
    batch = {
        "latents": torch.randn(2, 16, 1, h, w).half(),
        "latents_clean": torch.randn(2, 16, 2, h, w).half(),
        "latent_indices": torch.tensor([[9], [9]]),
        "clean_latent_indices": torch.tensor([[0, 10], [0, 10]]),
        "clean_latent_2x_indices": torch.tensor([[11, 12]] * 2),
        "image_embeddings": torch.randn(2, 729, 72).half(),
        "llama_vec": torch.randn(2, 512, 128).half(),
        "llama_attention_mask": torch.ones(2, 512, dtype=torch.bool),
        "clip_l_pooler": torch.randn(2, 64).half(),
    }
    noisy, timesteps = torch.randn(2, 16, 1, h, w), torch.tensor([500.0, 20.0])
    inputs = model_inputs(batch, noisy, timesteps, 1.0, "cpu", torch.float32)
    assert torch.equal(inputs["clean_latents_2x"], torch.zeros(2, 16, 2, h, w))
    assert "clean_latents_4x" not in inputs and "clean_latent_4x_indices" not in inputs
    assert torch.equal(inputs["guidance"], torch.tensor([1000.0, 1000.0]))
    assert inputs["clean_latents"].dtype == torch.float32 and inputs["encoder_attention_mask"].dtype == torch.bool


def test_sample_prompt_lines_and_files(tmp_path):
    from training.sample_prompts import load_prompts, parse_prompt_line

    parsed = parse_prompt_line(
        "i like cats --W 64 --h 32 --f 37 --d 5 --s 5000 --g 6 --l 2.5 --n ugly --i a.png "
        "--ci b.png --ci c.png --of no_2x,target_index=1 --fs 3 --bogus 1"
    )
    assert parsed == {
        "prompt": "i like cats",
        "width": 64,
        "height": 32,
        "frame_count": 37,
        "seed": 5,
        "sample_steps": 1000,
        "guidance_scale": 6.0,
        "cfg_scale": 2.5,
        "negative_prompt": "ugly",
        "image_path": "a.png",
        "control_image_path": ["b.png", "c.png"],
        "one_frame": "no_2x,target_index=1",
        "discrete_flow_shift": 3.0,
    }
    toml_file = tmp_path / "prompts.toml"
    toml_file.write_text(
        '[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nwidth = 32\n'
    )
    assert load_prompts(str(toml_file)) == [
        {"width": 64, "prompt": "a", "enum": 0},
        {"width": 32, "prompt": "b", "enum": 1},
    ]


def test_sampling_during_training_writes_samples_and_leaves_the_training_unchanged(models, single, tmp_path):
    import numpy as np
    from PIL import Image

    from utils.video_io import read_video_frames

    image = tmp_path / "start.png"
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"a box --w 48 --h 32 --f {4 * LWS + 1} --d 7 --s 2 --i {image}\n"
        f"# a comment\ntoo short --w 32 --h 32 --f 5 --s 2 --i {image}\n"
    )
    flags = [
        "--sample_prompts",
        prompts,
        "--sample_at_first",
        "--sample_every_n_steps",
        "2",
        "--latent_window_size",
        LWS,
        "--sample_preview",
        *sample_model_files(models),
    ]
    sampled = train(models, single, tmp_path / "sampled", *flags, steps=2)
    previews = sorted(f for f in os.listdir(sampled / "sample") if f.endswith("_7_preview.mp4"))
    assert len(previews) == 3  # one section: the preview holds its LWS latent frames and the start frame
    assert all(read_video_frames(str(sampled / "sample" / f)).shape == (LWS + 1, 4, 6, 3) for f in previews)
    files = sorted(f for f in os.listdir(sampled / "sample") if "_preview" not in f)
    assert [f.split("_")[1] for f in files] == ["000002", "e000000", "e000002"]  # step 2 = the end of epoch 2
    assert all(f.startswith("lora_") and f.split("_")[2] == "00" and f.endswith("_7.mp4") for f in files)
    plain = train(models, single, tmp_path / "plain", steps=2)
    a, b = load_file(sampled / "lora.safetensors"), load_file(plain / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_frame_sampling_works_with_2x_4x_clean_latents(models, tmp_path):
    import numpy as np
    from PIL import Image

    image = tmp_path / "start.png"
    Image.fromarray(np.full((32, 48, 3), 60, np.uint8)).save(image)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            [
                f"edit --w 48 --h 32 --d 3 --s 2 --i {image} --ci {image} --of target_index=1",
                {
                    "prompt": "kisekaeichi",
                    "width": 48,
                    "height": 32,
                    "sample_steps": 2,
                    "image_path": str(image),
                    "control_image_path": [str(image), str(image)],
                    "one_frame": "no_post,target_index=1,control_index=0;10",
                },
            ]
        )
    )
    dataset = one_frame_dataset_config(tmp_path, ["x"])
    flags = ["--one_frame", "--sample_prompts", prompts, "--sample_at_first", *sample_model_files(models)]
    out = train(models, dataset, tmp_path / "out", *flags, steps=1)
    files = sorted(os.listdir(out / "sample"))
    assert len(files) == 2 and all(f.endswith("_000.png") for f in files)


# ---- several processes --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_cpu_run(models, pair, tmp_path):
    """torchrun with two CPU processes (gloo): DDP network, per-process batches, only the main process saves."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "out"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "fpack_train_network.py"),
           "--dit", str(models.dit), "--dataset_config", str(pair), "--sdpa", "--mixed_precision", "bf16",
           "--max_train_steps", "3", "--max_data_loader_n_workers", "0", "--output_dir", str(out),
           "--output_name", "lora", "--seed", "1", "--save_every_n_steps", "2", "--save_state"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI_CPU, 2 process(es)" in result.stderr
    assert sorted(os.listdir(out)) == [
        "lora-state",
        "lora-step00000002-state",
        "lora-step00000002.safetensors",
        "lora.safetensors",
    ]
    assert sorted(f for f in os.listdir(out / "lora-state") if f.startswith("random_states")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    with safe_open(out / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_num_batches_per_epoch"] == "1"  # two batches split over two processes


@pytest.mark.slow
def test_caching_scripts_then_training(models, tmp_path):
    """End to end: fpack_cache_latents.py and fpack_cache_text_encoder_outputs.py on tiny videos, then training."""
    from tests.factory.datasets import make_video_dataset, write_config

    videos = make_video_dataset(tmp_path, lengths=(13, 30))
    held_out = make_video_dataset(tmp_path, lengths=(14,), name="validation")
    dataset = {"video_directory": videos.directory, "resolution": [48, 32], "target_frames": [4 * LWS + 1],
               "fp_latent_window_size": LWS, "caption_extension": ".txt"}  # fmt: skip
    validation = {**dataset, "video_directory": held_out.directory}
    config = str(write_config(tmp_path / "dataset.toml", [dataset], validation=[validation]))
    m = models
    for script, flags in (
        ("fpack_cache_latents.py", ["--vae", m.vae, "--image_encoder", m.image_encoder]),
        ("fpack_cache_text_encoder_outputs.py", ["--text_encoder1", m.text_encoder1, "--text_encoder2",
                                                 m.text_encoder2, "--tokenizer1", m.tokenizer1, "--tokenizer2",
                                                 m.tokenizer2]),
    ):  # fmt: skip
        cmd = [sys.executable, os.path.join(ROOT, script), "--dataset_config", config, *map(str, flags)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(glob.glob(str(videos.directory / "*_fp.safetensors"))) == 2
    # the [[validation_datasets]] entry is cached by both scripts too
    assert len(glob.glob(str(held_out.directory / "*_fp.safetensors"))) == 1
    assert len(glob.glob(str(held_out.directory / "*_fp_te.safetensors"))) == 1
    out = tmp_path / "out"
    train(models, config, out, "--validate_every_n_steps", "2", "--logging_dir", out / "logs", steps=2)
    assert load_file(out / "lora.safetensors")["lora_unet_transformer_blocks_0_attn_to_k.lora_up.weight"].any()
    assert [r["step"] for r in metrics(out) if "loss/validation" in r] == [0, 2]


def test_save_diffusers_lora_writes_an_export_diffusers_merges_like_our_file(models, single, tmp_path):
    from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked
    from networks.lora_merge import merge_lora_files
    from tests.test_lora_export import diffusers_fuse, max_abs_diff

    flags = "--save_diffusers_lora --network_alpha 2 --save_every_n_steps 1 --save_last_n_steps 1"
    out = train(models, single, tmp_path, *flags.split(), steps=3)
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == [
        "lora-step00000002.diffusers.safetensors",
        "lora-step00000002.safetensors",
        "lora-step00000003.diffusers.safetensors",
        "lora-step00000003.safetensors",
        "lora.diffusers.safetensors",
        "lora.safetensors",
    ]  # the step-1 export was pruned with its LoRA
    ours, exported = str(out / "lora.safetensors"), str(out / "lora.diffusers.safetensors")
    with safe_open(ours, "pt") as f, safe_open(exported, "pt") as g:
        ours_meta, exported_meta = f.metadata(), g.metadata()
    assert ours_meta["ss_network_alpha"] == "2.0" and ours_meta["ss_steps"] == "3"
    assert {k: v for k, v in ours_meta.items() if not k.startswith("sshs_")} == {
        k: v for k, v in exported_meta.items() if not k.startswith("lora_")
    }

    base = {k: v.float() for k, v in load_file(models.dit).items()}
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModelPacked(tiny_dit_config())
    model.load_state_dict({k: v.clone() for k, v in base.items()}, assign=True)
    merge_lora_files(model, [ours])
    merged = model.state_dict()
    assert max_abs_diff(merged, base) > 1e-3  # three steps at lr 1e-2 moved the weights
    assert max_abs_diff(diffusers_fuse(exported, dit_state_dict={k: v.clone() for k, v in base.items()}), merged) < 1e-6
