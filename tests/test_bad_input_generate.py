"""Bad input to fpack_generate_video.py: each mistake is one `error:` line (exit 2), early, with nothing written.

The first tests feed damaged weight files to the safetensors readers every loader goes through; the rest run the
real entry script as subprocesses on the tiny factory models.
"""

import json
import struct

import pytest
import torch

from pipelines.latent_file import load_latent, save_latent
from utils.safetensors_utils import (
    WeightFileError,
    load_safetensors,
    load_state_dict,
    read_header,
    resolve_weight_files,
    save_safetensors,
)


def packed(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


DAMAGED_SAFETENSORS = {
    "text file": (b"just some notes\nnot weights\n", "bad header length"),
    "empty file": (b"", "too short"),
    "header not JSON": (struct.pack("<Q", 4) + b"\xff\xfe{[", "not valid JSON"),
    "header a list": (packed([1, 2]), "not a JSON object"),
    "entry without shape": (packed({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4), "'w'"),
    "shape not a list": (packed({"w": {"dtype": "F32", "shape": 3, "data_offsets": [0, 4]}}, b"\0" * 4), "'w'"),
    "size disagrees with shape": (
        packed({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        "'w'",
    ),
    "bad metadata": (packed({"__metadata__": {"a": 1}}), "__metadata__"),
    "truncated data": (packed({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4), "truncated"),
}


@pytest.mark.parametrize("case", DAMAGED_SAFETENSORS)
def test_damaged_safetensors_are_refused_naming_the_flag_and_file(tmp_path, case):
    raw, reason = DAMAGED_SAFETENSORS[case]
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw)
    for read in (lambda: read_header(path, "--dit"), lambda: load_state_dict(str(path), flag="--dit"),
                 lambda: load_safetensors(path, "--dit")):  # fmt: skip
        with pytest.raises(WeightFileError) as err:
            read()
        assert str(err.value).startswith(f"--dit {path}: ") and reason in str(err.value)


def test_a_sound_file_still_loads_with_its_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.arange(6.0).reshape(2, 3)}, path, metadata={"k": "v"})
    infos, metadata = read_header(path)
    assert infos["w"].shape == (2, 3) and metadata == {"k": "v"}
    tensors, metadata = load_safetensors(path)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and metadata == {"k": "v"}


def test_a_corrupted_shard_index_is_refused_naming_it(tmp_path):
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "model-0000')
    with pytest.raises(WeightFileError, match=f"--vae {index}: unreadable shard index"):
        resolve_weight_files(tmp_path, "--vae")
    index.write_text('{"weight_map": ["model-00001-of-00001.safetensors"]}')
    with pytest.raises(WeightFileError, match="weight_map is not a map"):
        resolve_weight_files(tmp_path, "--vae")


@pytest.mark.parametrize("name, raw", [("notes.txt", b"hello\n"), ("latent.pt", b"PK\3\4 broken zip"),
                                       ("latent.safetensors", b"\x10\0\0\0\0\0\0\0{}")])  # fmt: skip
def test_a_file_that_is_not_a_latent_is_refused_as_such(tmp_path, name, raw):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(WeightFileError) as err:
        load_latent(str(path))
    assert str(err.value).startswith(f"--latent_path {path}: ")


def test_a_latent_without_the_latent_key_or_of_the_wrong_shape_is_refused(tmp_path):
    save_safetensors({"other": torch.zeros(16, 1, 2, 2)}, tmp_path / "a.safetensors")
    with pytest.raises(WeightFileError, match="no tensor named 'latent'"):
        load_latent(str(tmp_path / "a.safetensors"))
    save_latent(torch.zeros(8, 1, 2, 2), str(tmp_path / "b.safetensors"), None)
    with pytest.raises(WeightFileError, match=r"expected a \(16, T, h, w\) latent, got \(8, 1, 2, 2\)"):
        load_latent(str(tmp_path / "b.safetensors"))
    save_latent(torch.ones(16, 1, 2, 2), str(tmp_path / "c.safetensors"), {"k": "v"})
    latent, meta = load_latent(str(tmp_path / "c.safetensors"))
    assert torch.equal(latent, torch.ones(16, 1, 2, 2)) and meta == {"k": "v"}
