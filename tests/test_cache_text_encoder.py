"""fpack_cache_text_encoder_outputs.py end to end on the tiny text encoders: names, keys, shapes, reruns."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

import hunyuan_model.text_encoder as text_encoder_module
import hunyuan_model.tokenizers as tokenizers_module
import pipelines.cache_text_encoder_outputs as ct
from hunyuan_model.text_encoder import encode_prompt_conds, load_text_encoder1, load_text_encoder2
from hunyuan_model.tokenizers import load_tokenizer1, load_tokenizer2
from tests.factory.datasets import make_image_dataset, make_video_dataset, write_config
from tests.factory.dims import CLIP_HIDDEN, LLAMA_HIDDEN
from tests.factory.text_encoders import make_text_encoder_files

REFERENCE_FLAGS = {
    "--dataset_config": None, "--device": None, "--batch_size": None, "--num_workers": None,
    "--skip_existing": False, "--keep_cache": False, "--text_encoder1": None, "--text_encoder2": None,
    "--fp8_llm": False,
}  # fmt: skip
KEYS = {"llama_vec_float16", "llama_attention_mask", "clip_l_pooler_float16"}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return make_text_encoder_files(tmp_path_factory.mktemp("text_encoders"))


@pytest.fixture
def dataset(tmp_path):
    """A video dataset and an image dataset in one config; caches in one directory per dataset."""
    videos = make_video_dataset(tmp_path, lengths=(5, 5))
    images = make_image_dataset(tmp_path, sizes=((32, 32),))
    entries = [
        dict(video_directory=videos.directory, cache_directory=tmp_path / "vcache", caption_extension=".txt"),
        dict(image_directory=images.directory, cache_directory=tmp_path / "icache", caption_extension=".txt"),
    ]
    config = str(write_config(tmp_path / "config.toml", entries, general=dict(resolution=[32, 32])))
    files = {
        tmp_path / "vcache" / "clip_0_fp_te.safetensors": videos.captions["clip_0"],
        tmp_path / "vcache" / "clip_1_fp_te.safetensors": videos.captions["clip_1"],
        tmp_path / "icache" / "img_0_fp_te.safetensors": images.captions["img_0"],
    }
    return config, files


def cache(config, encoders, *flags) -> int:
    return ct.main(
        [
            "--dataset_config", config, "--text_encoder1", str(encoders.llama_comfy),
            "--text_encoder2", str(encoders.clip_comfy), "--tokenizer1", str(encoders.tokenizer1),
            "--tokenizer2", str(encoders.tokenizer2), *flags,
        ]
    )  # fmt: skip


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_names_keys_shapes_and_values(dataset, encoders):
    config, files = dataset
    assert cache(config, encoders, "--batch_size", "2") == 0
    for directory in {path.parent for path in files}:
        assert sorted(os.listdir(directory)) == sorted(p.name for p in files if p.parent == directory)

    models = (
        load_text_encoder1(encoders.llama_comfy),
        load_text_encoder2(encoders.clip_comfy),
        load_tokenizer1(str(encoders.tokenizer1)),
        load_tokenizer2(str(encoders.tokenizer2)),
    )
    for path, caption in files.items():
        tensors, metadata = read(path)
        assert set(tensors) == KEYS
        assert metadata == {"architecture": "framepack", "caption1": caption, "format_version": "1.0.1"}
        llama, mask, clip = (
            tensors["llama_vec_float16"],
            tensors["llama_attention_mask"],
            tensors["clip_l_pooler_float16"],
        )
        assert llama.shape == (512, LLAMA_HIDDEN) and llama.dtype == torch.float16
        assert mask.shape == (512,) and mask.dtype == torch.bool
        assert clip.shape == (CLIP_HIDDEN,) and clip.dtype == torch.float16
        valid = int(mask.sum())
        assert 0 < valid <= 256 and mask[:valid].all() and not llama[valid:].any()
        expected = encode_prompt_conds(caption, *models)
        assert torch.equal(llama, expected[0][0]) and torch.equal(mask, expected[1][0])
        assert torch.equal(clip, expected[2][0])


def test_rerun_is_bit_identical_and_skip_existing_redoes_only_bad_files(dataset, encoders, tmp_path, monkeypatch):
    config, files = dataset
    assert cache(config, encoders) == 0
    first = {path: path.read_bytes() for path in files}
    assert cache(config, encoders) == 0
    assert {path: path.read_bytes() for path in files} == first

    paths = list(files)
    truncated, recaptioned, untouched = paths
    truncated.write_bytes(first[truncated][:100])
    caption_file = tmp_path / "videos" / "clip_1.txt"
    caption_file.write_text("a new caption", encoding="utf-8")
    stale = tmp_path / "vcache" / "removed_clip_fp_te.safetensors"
    stale.write_bytes(first[untouched])
    mtime = untouched.stat().st_mtime_ns

    assert cache(config, encoders, "--skip_existing", "--keep_cache") == 0
    assert truncated.read_bytes() == first[truncated]
    assert read(recaptioned)[1]["caption1"] == "a new caption"
    assert untouched.stat().st_mtime_ns == mtime and stale.exists()

    nothing_to_load = lambda *a, **k: pytest.fail("all complete: nothing to load")  # noqa: E731
    monkeypatch.setattr(text_encoder_module, "load_text_encoder1", nothing_to_load)
    assert cache(config, encoders, "--skip_existing") == 0
    assert not stale.exists() and untouched.stat().st_mtime_ns == mtime


def test_fp8_llm_keeps_the_layout(dataset, encoders):
    config, files = dataset
    assert cache(config, encoders, "--fp8_llm") == 0
    for path in files:
        tensors, _ = read(path)
        assert set(tensors) == KEYS and tensors["llama_vec_float16"].shape == (512, LLAMA_HIDDEN)


def test_help_lists_every_reference_flag(capsys):
    parser = ct.build_parser()
    defaults = {opt: a.default for a in parser._actions for opt in a.option_strings}
    for flag, default in {**REFERENCE_FLAGS, "--tokenizer1": None, "--tokenizer2": None}.items():
        assert flag in defaults and defaults[flag] == default, flag
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in REFERENCE_FLAGS)


@pytest.mark.parametrize(("case", "message"), [("missing_encoder", "no such file"), ("bad_config", "batch_sizes")])
def test_bad_input_fails_before_any_model_is_loaded(case, message, dataset, encoders, tmp_path, monkeypatch, capsys):
    config, files = dataset
    monkeypatch.setattr(text_encoder_module, "load_text_encoder1", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(tokenizers_module, "load_tokenizer1", lambda *a, **k: pytest.fail("a tokenizer was loaded"))
    if case == "bad_config":
        config = str(write_config(tmp_path / "bad.toml", [dict(image_directory=tmp_path, batch_sizes=2)]))
        argv = ["--text_encoder1", str(encoders.llama_comfy)]
    else:
        argv = ["--text_encoder1", str(tmp_path / "missing.safetensors")]
    assert ct.main(["--dataset_config", config, *argv, "--text_encoder2", str(encoders.clip_comfy)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err.split("error: ", 1)[1]
    assert not any(path.exists() for path in files)


def test_missing_text_encoder_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        ct.main(["--dataset_config", "x.toml", "--text_encoder1", "a"])
    assert e.value.code == 2 and "--text_encoder2" in capsys.readouterr().err
