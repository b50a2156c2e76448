"""Reading --extend_video inputs: latents (4-D, 5-D, ours or musubi-tuner's), mp4 files, and the errors naming them."""

import numpy as np
import pytest
import torch

from pipelines.extend_input import ExtendVideoError, read_extend_source
from pipelines.latent_file import save_latent
from utils.safetensors_utils import save_safetensors
from utils.video_io import save_video

H, W = 32, 48


def latent_file(tmp_path, shape, name="in.safetensors"):
    path = str(tmp_path / name)
    latent = torch.randn(*shape)
    save_safetensors({"latent": latent}, path)
    return path, latent


@pytest.mark.parametrize("shape", [(16, 5, 4, 6), (1, 16, 5, 4, 6)])
def test_latent_inputs_4d_and_5d_load_unchanged(tmp_path, shape):
    path, latent = latent_file(tmp_path, shape)
    source = read_extend_source(path, H, W, 30)
    assert source.latent.shape == (1, 16, 5, 4, 6) and source.latent_frames == 5
    assert torch.equal(source.latent.reshape(latent.shape), latent)


def test_torch_saved_latent_loads(tmp_path):
    path = str(tmp_path / "in.pt")
    latent = torch.randn(16, 3, 4, 6)
    torch.save(latent, path)
    assert torch.equal(read_extend_source(path, H, W, 30).latent[0], latent)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((8, 5, 4, 6), r"expected a \(16, T, h, w\) latent, got \(8, 5, 4, 6\)"),
        ((16, 5, 8, 8), "latent of 8x8 is for a 64x64 video, --video_size is 32 48"),
        ((16, 1, 4, 6), "1 latent frame"),
    ],
)
def test_bad_latents_are_refused_naming_the_file(tmp_path, shape, message):
    path, _ = latent_file(tmp_path, shape)
    with pytest.raises(ExtendVideoError, match=message) as info:
        read_extend_source(path, H, W, 30)
    assert f"--extend_video {path}" in str(info.value)


def test_garbage_files_are_refused_naming_the_file(tmp_path):
    for name in ("broken.safetensors", "broken.mp4"):
        path = tmp_path / name
        path.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ExtendVideoError) as info:
            read_extend_source(str(path), H, W, 30)
        assert f"--extend_video {path}" in str(info.value)
    with pytest.raises(ExtendVideoError, match="file not found"):
        read_extend_source(str(tmp_path / "missing.mp4"), H, W, 30)


def video(tmp_path, count, height=40, width=60):
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i, :, : 4 * (i + 1)] = 255  # a bar that grows: frames tell apart
    return save_video(frames, str(tmp_path / f"v{count}.mp4"), 30)


def test_video_keeps_its_last_4k_plus_1_frames_resized_to_the_video_size(tmp_path):
    source = read_extend_source(video(tmp_path, 11), H, W, 30)
    assert source.frames.shape == (9, H, W, 3) and source.latent_frames == 3
    bright = [int((f[H // 2, :, 0] > 127).sum()) for f in source.frames]
    # frame i of the file has a bar 4(i+1) px wide, 0.8x after the resize; frames 0 and 1 were dropped
    assert all(abs(b - 3.2 * (j + 3)) <= 2 for j, b in enumerate(bright)), bright


def test_too_short_video_is_refused(tmp_path):
    path = video(tmp_path, 4)
    with pytest.raises(ExtendVideoError, match=r"4 frame\(s\); extending needs at least 5") as info:
        read_extend_source(path, H, W, 30)
    assert path in str(info.value)


def test_latent_saved_by_this_tool_round_trips(tmp_path):
    latent = torch.randn(1, 16, 4, 4, 6)
    path = save_latent(latent, str(tmp_path / "ours.safetensors"), {"seeds": "1"})
    assert torch.equal(read_extend_source(path, H, W, 30).latent, latent)
