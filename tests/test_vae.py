"""HunyuanVideo causal 3D VAE: layout, shapes, causality, memory options, load settings, incomplete files.

Tolerances: chunked convolution is exact (compared with atol 1e-6). Tiling is checked two ways: bit-for-bit
against a plain implementation of musubi-tuner's assembly (all tiles kept, blended in place, cropped,
concatenated), and against an untiled pass, where a 64 px tile on a 96 px input must keep cosine similarity
≥ 0.95 and mean |difference| ≤ 0.35 × mean |output| (measured on the tiny VAE: about 0.98 / 0.16 for encode and
0.97 / 0.25 for decode).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import hunyuan_model.vae as vae_module
from hunyuan_model.vae import (
    SCALING_FACTOR,
    AutoencoderKLCausal3D,
    VAEConfig,
    decode_latents,
    encode_pixels,
    load_vae,
)
from hunyuan_model.vae_blocks import CausalConv3d, CausalSelfAttention
from tests.factory.vae import (
    make_tiny_vae,
    make_vae_state_dict,
    write_diffusers_safetensors,
    write_official_pt,
    write_snapshot,
)
from utils.safetensors_utils import WeightFileError, save_safetensors


def pixels(frames: int, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKLCausal3D:
    return make_tiny_vae()


def encode_and_decode(vae, x, latents, tile: int | None = None, chunk: int | None = None):
    """(encode_moments(x), decode(latents)) with spatial tiling and conv chunking set for this call only."""
    vae.set_spatial_tiling(tile)
    vae.set_chunk_size(chunk)
    try:
        return vae.encode_moments(x), vae.decode(latents)
    finally:
        vae.set_spatial_tiling(None)
        vae.set_chunk_size(None)


# --- architecture -------------------------------------------------------------------------------------------------


def test_full_size_layout_matches_the_real_checkpoint():
    with torch.device("meta"):
        state = AutoencoderKLCausal3D().state_dict()
    assert len(state) == 248
    assert sum(t.numel() for t in state.values()) == 246_478_803
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["encoder.conv_in.conv.weight"] == (128, 3, 3, 3, 3)
    assert shapes["encoder.conv_out.conv.weight"] == (32, 512, 3, 3, 3)
    assert shapes["quant_conv.weight"] == (32, 32, 1, 1, 1)
    assert shapes["post_quant_conv.weight"] == (16, 16, 1, 1, 1)
    assert shapes["decoder.conv_in.conv.weight"] == (512, 16, 3, 3, 3)
    assert shapes["decoder.up_blocks.3.resnets.2.conv2.conv.weight"] == (128, 128, 3, 3, 3)
    assert shapes["decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight"] == (256, 512, 1, 1, 1)
    assert shapes["encoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)
    assert "encoder.down_blocks.3.downsamplers.0.conv.conv.weight" not in shapes
    assert "decoder.up_blocks.3.upsamplers.0.conv.conv.weight" not in shapes
    assert VAEConfig().strides() == [(1, 2, 2), (2, 2, 2), (2, 2, 2), None]


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_shapes(vae, frames):
    latents = encode_pixels(vae, pixels(frames, 64, 48), gen())
    assert latents.shape == (1, 16, 1 + (frames - 1) // 4, 8, 6)
    assert latents.dtype == torch.float32
    out = decode_latents(vae, latents)
    assert out.shape == (1, 3, frames, 64, 48)
    assert torch.isfinite(out).all() and out.abs().max() < 10


def test_encode_samples_the_posterior_and_scales(vae):
    x = pixels(5, 32, 32)
    mean, logvar = vae.encode_moments(x).chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=gen(7))
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * SCALING_FACTOR
    torch.testing.assert_close(vae.encode(x, gen(7)), expected)
    latents = vae.encode(x, gen(7))
    torch.testing.assert_close(vae.decode(latents), vae.decoder(vae.post_quant_conv(latents / SCALING_FACTOR)))


def test_encode_is_deterministic_for_a_seeded_generator(vae):
    x = pixels(5, 32, 32)
    a, b, c = vae.encode(x, gen(3)), vae.encode(x, gen(3)), vae.encode(x, gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().mean() < 0.1 * a.abs().mean()  # the factory posterior is narrow, like a trained VAE's
    assert vae.encode(x).shape == a.shape  # unseeded global RNG, as musubi-tuner


def test_causal_conv_reads_no_later_frames():
    torch.manual_seed(0)
    conv = CausalConv3d(4, 4, 3)
    x = torch.randn(1, 4, 6, 8, 8)
    changed = x.clone()
    changed[:, :, 3:] = torch.randn(1, 4, 3, 8, 8)
    assert torch.equal(conv(x)[:, :, :3], conv(changed)[:, :, :3])
    assert not torch.equal(conv(x)[:, :, 3:], conv(changed)[:, :, 3:])


def test_attention_is_frame_causal_masked_attention():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 32, 1e-6)
    x = torch.randn(2, 32, 3, 4, 5)
    tokens = attn.group_norm(x).flatten(2).transpose(1, 2)
    frame = torch.arange(3).repeat_interleave(20)
    mask = frame[None, :] <= frame[:, None]  # query row sees key column of its own or an earlier frame
    out = F.scaled_dot_product_attention(attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens), attn_mask=mask)
    expected = x + attn.to_out[0](out).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_fp16_runs_close_to_fp32(vae):
    half = make_tiny_vae(dtype=torch.float16)  # fp16 convolutions are slow on CPU: keep this small
    x = pixels(1, 32, 32)
    latents = half.encode(x, gen())
    assert latents.dtype == torch.float16
    torch.testing.assert_close(latents.float(), vae.encode(x, gen()), atol=1e-2, rtol=0)
    torch.testing.assert_close(half.decode(latents).float(), vae.decode(latents.float()), atol=3e-2, rtol=0)


# --- memory options -----------------------------------------------------------------------------------------------


def reference_chunks(width: int, chunk: int, kernel: int, stride: int) -> list[tuple[int, int]]:
    """musubi-tuner's chunk partition, written as its index loop over the padded input (then mapped to outputs)."""
    p = kernel // 2
    padded = width + 2 * p
    chunk -= chunk % stride
    bounds, i = [], 0
    while i < padded - p:
        start, end = i - p, min(i + chunk + p, padded)
        if i == 0:
            start, end = 0, end + p
        if padded - end < chunk // 2:
            end = padded
        bounds.append((start // stride, start // stride + (end - start - kernel) // stride + 1))
        i = end - p
    return bounds


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("chunk", [4, 7, 8, 16])
def test_chunk_partition_is_the_reference_one(kernel, stride, chunk):
    conv = CausalConv3d(1, 1, kernel, stride=(1, stride, stride))
    conv.chunk_size = chunk
    for width in (6, 12, 13, 24, 40, 41):
        if width >= 1.5 * chunk:
            assert conv.chunk_bounds(width) == reference_chunks(width, chunk, kernel, stride), width


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_conv_equals_unchunked(vae, chunk):
    x = pixels(5, 32, 48)
    latents = vae.encode(x, gen())
    moments, decoded = encode_and_decode(vae, x, latents)
    chunked_moments, chunked_decoded = encode_and_decode(vae, x, latents, chunk=chunk)
    torch.testing.assert_close(chunked_moments, moments, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked_decoded, decoded, atol=1e-6, rtol=0)


def reference_tiled(x, run, in_tile: int, out_tile: int) -> torch.Tensor:
    """musubi-tuner's assembly: every tile kept, blended in place with the tile above then the left, cropped, cat."""
    stride, blend = int(in_tile * 0.75), int(out_tile * 0.25)
    keep = out_tile - blend

    def blend_v(a, b):
        e = min(a.shape[-2], b.shape[-2], blend)
        for y in range(e):
            b[..., y, :] = a[..., -e + y, :] * (1 - y / e) + b[..., y, :] * (y / e)

    def blend_h(a, b):
        e = min(a.shape[-1], b.shape[-1], blend)
        for i in range(e):
            b[..., i] = a[..., -e + i] * (1 - i / e) + b[..., i] * (i / e)

    h, w = x.shape[-2:]
    rows = [[run(x[..., i : i + in_tile, j : j + in_tile]) for j in range(0, w, stride)] for i in range(0, h, stride)]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                blend_v(rows[i - 1][j], tile)
            if j > 0:
                blend_h(row[j - 1], tile)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


def test_tiling_follows_the_reference_assembly_exactly(vae):
    x = pixels(5, 40, 56)
    latents = vae.encode(x, gen())
    tiled_moments, tiled_decoded = encode_and_decode(vae, x, latents, tile=32)
    expected_moments = reference_tiled(x, lambda t: vae.quant_conv(vae.encoder(t)), 32, 4)
    expected_decoded = reference_tiled(latents / SCALING_FACTOR, lambda t: vae.decoder(vae.post_quant_conv(t)), 4, 32)
    assert tiled_moments.shape == (1, 32, 2, 5, 7) and tiled_decoded.shape == x.shape
    assert torch.equal(tiled_moments, expected_moments)
    assert torch.equal(tiled_decoded, expected_decoded)


def test_tiled_is_close_to_untiled(vae):
    x = pixels(1, 96, 96)
    latents = vae.encode(x, gen())
    full_moments, full_decoded = encode_and_decode(vae, x, latents)
    tiled_moments, tiled_decoded = encode_and_decode(vae, x, latents, tile=64)
    for tiled, full in ((tiled_moments[:, :16], full_moments[:, :16]), (tiled_decoded, full_decoded)):
        assert tiled.shape == full.shape
        assert F.cosine_similarity(tiled.flatten(), full.flatten(), dim=0) >= 0.95
        assert (tiled - full).abs().mean() <= 0.35 * full.abs().mean()


def test_tiling_only_starts_above_the_tile_size(vae):
    x = pixels(1, 64, 64)
    latents = vae.encode(x, gen())
    expected_moments, expected = encode_and_decode(vae, x, latents)
    tiled_moments, tiled = encode_and_decode(vae, x, latents, tile=64)
    assert torch.equal(tiled_moments, expected_moments)
    assert torch.equal(tiled, expected)


# --- loading ------------------------------------------------------------------------------------------------------


def test_default_load_is_fp16_frozen_and_always_tiled(tmp_path):
    model = load_vae(write_snapshot(tmp_path, seed=0))
    assert model.dtype == torch.float16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.tile_sample_min_size == 256 and model.tile_latent_min_size == 32  # FramePack: always tiled
    assert model.encoder.conv_in.chunk_size is None


def test_memory_options_are_applied_at_load(tmp_path):
    path = write_diffusers_safetensors(tmp_path, seed=0)
    model = load_vae(path, dtype=torch.float32, chunk_size=16, spatial_tile_sample_min_size=128)
    assert model.tile_sample_min_size == 128 and model.tile_latent_min_size == 16
    assert all(m.chunk_size == 16 for m in model.modules() if isinstance(m, CausalConv3d))


def test_config_is_read_from_shapes(tmp_path):
    overrides = {"block_out_channels": (32, 64, 64, 96), "layers_per_block": 2, "latent_channels": 8}
    path = write_official_pt(tmp_path, seed=2, **overrides)
    model = load_vae(path, dtype=torch.float32)
    assert model.config == VAEConfig(**overrides)
    latents = model.encode(pixels(5, 32, 32), gen())
    assert latents.shape == (1, 8, 2, 4, 4)
    assert model.decode(latents).shape == (1, 3, 5, 32, 32)


def test_config_json_is_honoured(tmp_path, caplog):
    root = write_snapshot(tmp_path, seed=0)
    config_path = root / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 0.5
    config["latent_channels"] = 4  # contradicts the weights: the weights win, with a warning
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        model = load_vae(root, dtype=torch.float32)
    assert model.config.scaling_factor == 0.5
    assert model.config.latent_channels == 16
    assert "latent_channels" in caplog.text


# --- wrong files --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_tensor_loading(monkeypatch):
    """Fail the test if a wrong file gets as far as loading tensors."""

    def refuse(*args, **kwargs):
        raise AssertionError("tensors were loaded before the file was checked")

    monkeypatch.setattr(vae_module, "load_state_dict", refuse)


def test_incomplete_vae_is_refused(tmp_path, no_tensor_loading):
    state = make_vae_state_dict()
    del state["decoder.mid_block.attentions.0.to_k.weight"]
    path = tmp_path / "vae.safetensors"
    save_safetensors(state, path)
    with pytest.raises(WeightFileError, match="--vae .*vae.safetensors.*missing keys.*to_k"):
        load_vae(path)


def test_bad_memory_options(vae):
    with pytest.raises(ValueError, match="--vae_spatial_tile_sample_min_size"):
        vae.set_spatial_tiling(8)
    with pytest.raises(ValueError, match="--vae_chunk_size"):
        vae.set_chunk_size(-1)
