"""Validation loss ([[validation_datasets]], --validation_split) and the real trackers (tensorboard, wandb offline)."""

import glob
import json
import os
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dataset.config import VideoDatasetParams, load_dataset_params
from dataset.image_video_dataset import build_dataset_group
from tests.factory.caches import write_video_caches
from tests.factory.datasets import write_config
from tests.test_train import LWS, metrics, train

SEED = 5
TIMESTEPS = (250, 750)


def dataset_entry(cache):
    return {
        "video_directory": cache,
        "cache_directory": cache,
        "resolution": [48, 32],
        "target_frames": [LWS * 4 + 1],
        "fp_latent_window_size": LWS,
    }


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """(training only, training + one validation clip) configs over the same training caches."""
    root = tmp_path_factory.mktemp("validation")
    write_video_caches(root / "train", ["a", "b"], LWS)
    write_video_caches(root / "val", ["v"], LWS)
    plain = write_config(root / "plain.toml", [dataset_entry(root / "train")])
    with_validation = write_config(
        root / "with_validation.toml", [dataset_entry(root / "train")], validation=[dataset_entry(root / "val")]
    )
    return plain, with_validation


@pytest.fixture(scope="module")
def runs(models, configs, tmp_path_factory):  # noqa: F811
    plain, with_validation = configs
    root = tmp_path_factory.mktemp("runs")
    base = train(models, plain, root / "plain", "--logging_dir", root / "plain" / "logs", seed=SEED)
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_SILENT", "true")
    flags = ["--validate_every_n_steps", "2", "--validation_timesteps", *map(str, TIMESTEPS)]
    flags += ["--log_with", "all", "--logging_dir", root / "val" / "logs"]
    try:
        validated = train(models, with_validation, root / "val", *flags, seed=SEED)
    finally:
        patch.undo()
    return base, validated


def test_validation_leaves_the_trained_lora_bit_identical(runs):
    base, validated = runs
    a, b = load_file(base / "lora.safetensors"), load_file(validated / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in metrics(validated) if "loss/validation" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        per_timestep = [row[f"loss/validation_t{t}"] for t in TIMESTEPS]
        assert row["loss/validation"] == pytest.approx(sum(per_timestep) / len(per_timestep))
    assert rows[0]["loss/validation"] != rows[-1]["loss/validation"]  # the LoRA trained in between
    steps = [r for r in metrics(validated) if "loss/current" in r]
    assert all(1 <= r["timestep/min"] <= r["timestep/mean"] <= r["timestep/max"] <= 1001 for r in steps)


def test_validation_loss_equals_an_independent_computation(runs, models, configs):  # noqa: F811
    """Step 0 (the LoRA's up weights are zero, so the model is the base DiT): the validation clip's latents at
    σ = t / 1000 with noise from torch.Generator().manual_seed(--seed + 0), the DiT under bf16 autocast,
    mean squared error against noise − latents."""
    from frame_pack.dit_loader import load_packed_model
    from training.trainer import model_inputs

    _, validated = runs
    row = next(r for r in metrics(validated) if "loss/validation" in r and r["step"] == 0)
    (latent_path,) = glob.glob(str(configs[1].parent / "val" / "*_fp.safetensors"))
    (text_path,) = glob.glob(str(configs[1].parent / "val" / "*_fp_te.safetensors"))
    cache = {**load_file(latent_path), **load_file(text_path)}
    batch = {}
    for key, value in cache.items():
        name = key if key.endswith("_mask") else key.rsplit("_", 1)[0]
        name = name.rsplit("_", 1)[0] if name.startswith("latents_") else name
        batch[name] = value[None]
    dit = load_packed_model(str(models.dit), "cpu", attn_mode="sdpa").eval()
    latents = batch["latents"]
    noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    noise = noise.half()[None]
    for t in TIMESTEPS:
        sigma = t / 1000
        noisy = sigma * noise + (1 - sigma) * latents
        inputs = model_inputs(batch, noisy, torch.tensor([float(t)]), 1.0, torch.device("cpu"), torch.float32)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = dit(**inputs)
        expected = F.mse_loss(prediction.float(), noise.float() - latents.float()).item()
        assert row[f"loss/validation_t{t}"] == pytest.approx(expected, rel=1e-6)


def test_tensorboard_event_file_holds_the_logged_values(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, validated = runs
    (events,) = glob.glob(str(validated / "logs" / "*" / "**" / "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "timestep/mean", "loss/validation"} <= tags
    jsonl = [r for r in metrics(validated) if "loss/validation" in r]
    logged = [(e.step, e.value) for e in accumulator.Scalars("loss/validation")]
    assert logged == [(r["step"], pytest.approx(r["loss/validation"], rel=1e-6)) for r in jsonl]
    assert [e.step for e in accumulator.Scalars("loss/current")] == [1, 2, 3, 4]


def wandb_records(path):
    """The protobuf records of a `.wandb` run file: a 7-byte `:W&B` file header, then LevelDB-log framing (32 KiB
    blocks; each chunk has a 7-byte header: CRC32, little-endian length, type 1 full / 2 first / 3 middle /
    4 last; a block's tail shorter than a header is padding)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, pending = header, b""
    while position + header <= len(data):
        left = block - position % block
        if left < header:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        if kind == 0 and length == 0:
            break
        chunk = data[position + header : position + header + length]
        position += header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_logged_values(runs):
    _, validated = runs
    (run_file,) = glob.glob(str(validated / "logs" / "**" / "offline-run-*" / "*.wandb"), recursive=True)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in wandb_records(run_file)
        if record.WhichOneof("record_type") == "history"
    ]
    validation = [(h["_step"], h["loss/validation"]) for h in history if "loss/validation" in h]
    jsonl = [(r["step"], r["loss/validation"]) for r in metrics(validated) if "loss/validation" in r]
    assert validation == [(s, pytest.approx(v, rel=1e-9)) for s, v in jsonl]
    assert any("lr/unet" in h and "loss/current" in h and "timestep/mean" in h for h in history)


def test_validation_split_holds_out_whole_items_the_same_for_every_seed(tmp_path):
    write_video_caches(tmp_path / "cache", ["a", "b", "c", "d", "e"], LWS, sections=2)
    params = VideoDatasetParams(
        video_directory=str(tmp_path / "cache"), resolution=(48, 32), num_repeats=2, fp_latent_window_size=LWS
    )
    held = []
    for seed in (1, 2):
        (dataset,) = build_dataset_group([params], training=True, seed=seed).datasets
        validation = dataset.split_off(0.2)
        paths = set(validation.items_by_path)
        held.append(paths)
        assert len(paths) == 2 and len({os.path.basename(p).split("_")[0] for p in paths}) == 1  # one clip, 2 sections
        assert not paths & set(dataset.items_by_path) and len(dataset.items_by_path) == 8
        assert (dataset.num_train_items, validation.num_train_items) == (16, 2)  # repeats only in training
    assert held[0] == held[1]
    with pytest.raises(ValueError, match="--validation_split 0.95"):
        build_dataset_group([params], training=True, seed=1).datasets[0].split_off(0.95)


def test_validation_tables_in_the_config_and_flag_errors(configs, models, tmp_path, capsys):  # noqa: F811
    plain, with_validation = configs
    params = load_dataset_params(str(with_validation))
    assert [(p.is_validation, p.label) for p in params] == [
        (False, "[[datasets]] #1"),
        (True, "[[validation_datasets]] #1"),
    ]
    with pytest.raises(SystemExit) as refused:  # a user error: one `error:` line, exit status 2
        train(models, plain, tmp_path / "none", "--validate_every_n_steps", "1")
    assert refused.value.code == 2 and "need validation data" in capsys.readouterr().err
