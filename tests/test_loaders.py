"""One loader battery for the five model families (DiT, VAE, LLaMA, CLIP, SigLIP).

For each family: every layout the factory writes loads the factory's weights exactly; another family's checkpoint,
a truncated file, a missing file, an empty folder and a missing shard are refused with a WeightFileError naming the
flag and the file, before any tensor data is read.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

import frame_pack.dit_loader as dit_loader
import hunyuan_model.encoder_loader as encoder_loader
import hunyuan_model.vae as vae_module
from frame_pack.dit_loader import load_packed_model
from hunyuan_model.image_encoder import load_image_encoder
from hunyuan_model.text_encoder import load_text_encoder1, load_text_encoder2
from hunyuan_model.vae import load_vae
from tests.factory.dit import tiny_dit_state_dict
from tests.factory.image_encoder import make_image_encoder_files, siglip_state_dict
from tests.factory.text_encoders import clip_state_dict, llama_state_dict, make_text_encoder_files
from tests.factory.tokenizers import clip_vocab_size
from tests.factory.vae import make_vae_state_dict, write_diffusers_safetensors, write_official_pt, write_snapshot
from utils.safetensors_utils import WeightFileError

FAMILIES = ("dit", "vae", "llama", "clip", "siglip")
SHARDED = ("dit", "llama")  # the families published as index json + shards


@dataclass(frozen=True)
class Family:
    flag: str
    expected: str  # the phrase the refusal uses for what the flag takes
    load: Callable[[Path], torch.nn.Module]
    reader: ModuleType  # the module whose load_state_dict reads the tensor data
    weights: Callable[[], dict[str, torch.Tensor]]  # the factory's weights, keyed as the model names them
    layouts: dict[str, Path]
    files: tuple[Path, ...]  # the single-file layouts (the first is handed to the other families)
    shard_folder: Path | None = None  # index json + shards, for the families published sharded


def without_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The CLIP and SigLIP files prefix every key with the wrapper's name; the loaded modules are the inner ones."""
    assert all(key.startswith(prefix) for key in state)
    return {key[len(prefix) :]: value for key, value in state.items()}


@pytest.fixture(scope="session")
def families(tiny_dit_files, tmp_path_factory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("loaders")
    dit_folder = Path(tiny_dit_files["sharded"])
    dit_snapshot = root / "models--lllyasviel--FramePackI2V_HY" / "snapshots" / "0123abc"
    shutil.copytree(dit_folder, dit_snapshot)
    (dit_snapshot / "diffusion_pytorch_model.safetensors.index.json").unlink()  # shards found by name alone

    vae_root = root / "vae"
    vae_official = write_official_pt(vae_root / "official")
    vae_community = write_diffusers_safetensors(vae_root / "community")
    vae_layouts = {
        "official .pt": vae_official,
        "official .pt with vae. prefix": write_official_pt(vae_root / "prefixed", vae_prefix=True),
        "official vae/ folder": write_official_pt(vae_root / "hunyuan-video-t2v-720p" / "vae").parent,
        "community safetensors": vae_community,
        "community snapshot": write_snapshot(vae_root / "snapshot"),
    }

    text = make_text_encoder_files(root / "text_encoders")
    image = make_image_encoder_files(root / "image_encoder")
    clip_vocab = clip_vocab_size(text.tokenizer2)
    return {
        "dit": Family(
            flag="--dit",
            expected="a FramePack DiT",
            load=load_packed_model,
            reader=dit_loader,
            weights=tiny_dit_state_dict,
            layouts={
                "sharded folder": dit_folder,
                "first shard": dit_folder / "diffusion_pytorch_model-00001-of-00003.safetensors",
                "hub snapshot without index": dit_snapshot,
                "Kijai single file": Path(tiny_dit_files["single"]),
            },
            files=(Path(tiny_dit_files["single"]),),
            shard_folder=dit_folder,
        ),
        "vae": Family(
            flag="--vae",
            expected="a HunyuanVideo VAE",
            load=lambda path: load_vae(path, dtype=torch.float32),
            reader=vae_module,
            weights=make_vae_state_dict,
            layouts=vae_layouts,
            files=(vae_community, vae_official),
        ),
        "llama": Family(
            flag="--text_encoder1",
            expected="text encoder 1 (LLaMA)",
            load=load_text_encoder1,
            reader=encoder_loader,
            weights=llama_state_dict,
            layouts={
                "Comfy-Org file": text.llama_comfy,
                "first shard": text.llama_shard,
                "snapshot root": text.snapshot,
                "snapshot text_encoder/": text.snapshot / "text_encoder",
            },
            files=(text.llama_comfy,),
            shard_folder=text.llama_shard.parent,
        ),
        "clip": Family(
            flag="--text_encoder2",
            expected="text encoder 2 (CLIP-L",
            load=load_text_encoder2,
            reader=encoder_loader,
            weights=lambda: without_prefix(clip_state_dict(clip_vocab), "text_model."),
            layouts={
                "Comfy-Org file": text.clip_comfy,
                "community text_encoder_2 file": text.clip_hf,
                "snapshot root": text.snapshot,
                "snapshot text_encoder_2/": text.snapshot / "text_encoder_2",
            },
            files=(text.clip_comfy,),
        ),
        "siglip": Family(
            flag="--image_encoder",
            expected="the SigLIP image encoder",
            load=load_image_encoder,
            reader=encoder_loader,
            weights=lambda: without_prefix(siglip_state_dict(), "vision_model."),
            layouts={
                "Comfy-Org file": image.comfy,
                "flux_redux_bfl file": image.redux_file,
                "flux_redux_bfl snapshot": image.snapshot,
                "snapshot image_encoder/": image.snapshot / "image_encoder",
            },
            files=(image.comfy,),
        ),
    }


@pytest.fixture
def no_tensor_loading(monkeypatch, families):
    """Fail the test if a refused file gets as far as reading tensor data."""

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the file was checked")

    for family in families.values():
        monkeypatch.setattr(family.reader, "load_state_dict", refuse)


def refusal(family: Family, path: Path) -> str:
    with pytest.raises(WeightFileError) as err:
        family.load(path)
    message = str(err.value)
    assert family.flag in message, message
    return message


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layout_loads_the_factory_weights(families, name):
    family = families[name]
    expected = family.weights()
    for layout, path in family.layouts.items():
        state = family.load(path).state_dict()
        assert state.keys() == expected.keys(), layout
        for key, value in expected.items():
            assert state[key].dtype == value.dtype, (layout, key)
            assert torch.equal(state[key], value), (layout, key)


@pytest.mark.parametrize(("name", "other"), [(a, b) for a in FAMILIES for b in FAMILIES if a != b])
def test_another_familys_checkpoint_is_refused(families, no_tensor_loading, name, other):
    family, wrong = families[name], families[other].files[0]
    message = refusal(family, wrong)
    assert str(wrong) in message
    assert f"expected {family.expected}" in message
    assert f"use it with {families[other].flag}" in message


@pytest.mark.parametrize("name", FAMILIES)
def test_truncated_file_is_refused(families, no_tensor_loading, name, tmp_path):
    for source in families[name].files:
        path = tmp_path / source.name
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        message = refusal(families[name], path)
        assert str(path) in message
        if path.suffix == ".safetensors":
            assert "truncated" in message


@pytest.mark.parametrize("name", FAMILIES)
def test_missing_file_and_empty_folder_are_refused(families, name, tmp_path):
    missing = tmp_path / "nowhere" / families[name].files[0].name
    assert f"{missing}: no such file or folder" in refusal(families[name], missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}" in refusal(families[name], empty)


@pytest.mark.parametrize("name", SHARDED)
def test_missing_shard_is_refused(families, no_tensor_loading, name, tmp_path):
    family = families[name]
    folder = Path(shutil.copytree(family.shard_folder, tmp_path / "shards"))
    shards = sorted(folder.glob("*-of-*.safetensors"))
    shards[1].unlink()
    message = refusal(family, folder)  # the index json names the shard
    assert "missing" in message and shards[1].name in message
    for index in folder.glob("*.index.json"):
        index.unlink()
    message = refusal(family, shards[0])  # the shard family is completed from the first shard's name
    assert "missing" in message and shards[1].name in message
