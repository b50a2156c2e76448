"""The packed DiT: layouts, config from shapes, forward math against naive formulas, memory features."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from frame_pack import block_swap as bs
from frame_pack.attention import AttentionBackendError, attention, check_attn_mode
from frame_pack.dit_loader import load_packed_model, read_dit_config
from frame_pack.fp8 import FP8_DTYPE, apply_fp8, is_fp8_target, quantize_per_tensor
from frame_pack.hunyuan_video_packed import (
    HunyuanVideoTransformer3DModelPacked,
    PackedDiTConfig,
    RotaryPosEmbed3D,
    tokens_first,
    unpatchify,
)
from tests.factory import dims
from tests.factory.dit import tiny_dit_config, tiny_dit_state_dict, write_dit_sharded, write_dit_single
from utils.safetensors_utils import WeightFileError, save_safetensors

LWS = 9


def section_inputs(batch=1, text_lens=(20,), h=8, w=8, seed=0, dtype=torch.bfloat16, clean=True):
    """Model kwargs for one inverted anti-drifting section (padding 0): latent 1..9, clean [0,10], 2x, 4x."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    mask = torch.zeros(batch, 512, dtype=torch.bool)
    for i, n in enumerate(text_lens):
        mask[i, :n] = True
    llama = rnd(batch, 512, dims.LLAMA_HIDDEN) * mask[..., None]
    rep = lambda t: t.unsqueeze(0).expand(batch, -1)
    kw = dict(
        hidden_states=rnd(batch, 16, LWS, h, w).to(dtype),
        timestep=torch.full((batch,), 988.0, dtype=dtype),
        encoder_hidden_states=llama.to(dtype),
        encoder_attention_mask=mask,
        pooled_projections=rnd(batch, dims.CLIP_HIDDEN).to(dtype),
        guidance=torch.full((batch,), 9984.0, dtype=dtype),
        latent_indices=rep(torch.arange(1, 1 + LWS)),
        image_embeddings=rnd(batch, 729, dims.SIGLIP_HIDDEN).to(dtype),
    )
    if clean:
        kw.update(
            clean_latents=rnd(batch, 16, 2, h, w),
            clean_latent_indices=rep(torch.tensor([0, 10])),
            clean_latents_2x=rnd(batch, 16, 2, h, w),
            clean_latent_2x_indices=rep(torch.tensor([11, 12])),
            clean_latents_4x=rnd(batch, 16, 16, h, w),
            clean_latent_4x_indices=rep(torch.arange(13, 29)),
        )
    return kw


def sample_slice(kw, i):
    return {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.fixture(scope="module")
def model(tiny_dit_files):
    return load_packed_model(tiny_dit_files["single"]).eval()


def fp32_model(config=None, seed=0):
    config = config or tiny_dit_config()
    with torch.device("meta"):
        m = HunyuanVideoTransformer3DModelPacked(config)
    m.load_state_dict(tiny_dit_state_dict(seed, config, dtype=torch.float32), assign=True)
    return m.eval()


# ---- layouts and config ---------------------------------------------------------------------------------------


def test_config_read_from_shapes_without_flags(tmp_path):
    config = tiny_dit_config(num_layers=3, num_single_layers=1, num_attention_heads=2, pooled_projection_dim=32)
    path = write_dit_single(tmp_path / "odd.safetensors", config=config)
    _, read = read_dit_config(path)
    assert read == config
    assert read.rope_axes_dim == (16, 56, 56) and read.rope_theta == 256.0


def test_config_json_in_snapshot_is_honoured(tmp_path):
    folder = write_dit_sharded(tmp_path / "snap")
    import json

    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["rope_theta"] = 512.0
    json.dump(cfg, open(cfg_path, "w"))
    assert read_dit_config(folder)[1].rope_theta == 512.0


def expected_full_keys():
    """The public checkpoint's key list, written out independently of the model code."""
    top = [
        "x_embedder.proj",
        "clean_x_embedder.proj",
        "clean_x_embedder.proj_2x",
        "clean_x_embedder.proj_4x",
        "image_projection.up",
        "image_projection.down",
        "context_embedder.proj_in",
        "norm_out.linear",
        "proj_out",
    ]
    for e in ("timestep_embedder", "guidance_embedder", "text_embedder"):
        top += [f"time_text_embed.{e}.linear_1", f"time_text_embed.{e}.linear_2"]
    for e in ("timestep_embedder", "text_embedder"):
        top += [f"context_embedder.time_text_embed.{e}.linear_1", f"context_embedder.time_text_embed.{e}.linear_2"]
    keys = {f"{m}.{p}" for m in top for p in ("weight", "bias")}
    refiner = ["norm1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "norm2", "ff.net.0.proj"]
    refiner += ["ff.net.2", "norm_out.linear"]
    for i in range(2):
        keys |= {
            f"context_embedder.token_refiner.refiner_blocks.{i}.{m}.{p}" for m in refiner for p in ("weight", "bias")
        }
    double = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj"]
    double += ["attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2"]
    double += ["ff_context.net.0.proj", "ff_context.net.2"]
    for i in range(20):
        keys |= {f"transformer_blocks.{i}.{m}.{p}" for m in double for p in ("weight", "bias")}
        keys |= {
            f"transformer_blocks.{i}.attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
        }
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "norm.linear", "proj_mlp", "proj_out"]
    for i in range(40):
        keys |= {f"single_transformer_blocks.{i}.{m}.{p}" for m in single for p in ("weight", "bias")}
        keys |= {f"single_transformer_blocks.{i}.attn.{n}.weight" for n in ("norm_q", "norm_k")}
    return keys


def test_full_size_model_on_meta_device_matches_the_public_checkpoint():
    with torch.device("meta"):
        full = HunyuanVideoTransformer3DModelPacked(PackedDiTConfig())
    state = full.state_dict()
    assert len(state) == 1274
    assert sum(v.numel() for v in state.values()) == 12_874_314_816
    assert set(state) == expected_full_keys()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["clean_x_embedder.proj_4x.weight"] == (3072, 16, 4, 8, 8)
    assert shapes["single_transformer_blocks.39.proj_out.weight"] == (3072, 15360)
    assert shapes["transformer_blocks.0.norm1.linear.weight"] == (18432, 3072)
    assert PackedDiTConfig.from_shapes(shapes) == PackedDiTConfig()
    assert sum(is_fp8_target(k) for k in state) == 440


# ---- wrong files -------------------------------------------------------------------------------------------------


def test_incomplete_and_non_safetensors_files_are_refused(tmp_path):
    partial = tmp_path / "partial.safetensors"
    state = tiny_dit_state_dict()
    del state["single_transformer_blocks.1.proj_out.weight"]
    save_safetensors(state, partial)
    with pytest.raises(WeightFileError, match=r"1 missing keys.*single_transformer_blocks.1.proj_out.weight"):
        load_packed_model(str(partial))

    not_st = tmp_path / "notes.safetensors"
    not_st.write_text("hello, this is not a checkpoint at all")
    with pytest.raises(WeightFileError, match="notes.safetensors"):
        load_packed_model(str(not_st))


# ---- forward math --------------------------------------------------------------------------------------------


def test_section_forward_shape_with_all_clean_groups(model):
    kw = section_inputs()
    with torch.no_grad():
        out = model(**kw)
    assert out.shape == (1, 16, LWS, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # each clean group changes the result
    for group in ("clean_latents", "clean_latents_2x", "clean_latents_4x"):
        kw2 = dict(kw)
        kw2[group] = kw[group] + 1.0
        with torch.no_grad():
            assert not torch.allclose(model(**kw2), out)


def test_rope_table_matches_the_formula():
    rope = RotaryPosEmbed3D((16, 56, 56), 256.0)
    table = rope(torch.tensor([[3.0, 7.0]]), height=2, width=3)  # (1, 256, 2, 2, 3)
    assert table.shape == (1, 256, 2, 2, 3)
    t_idx, y, x = 1, 1, 2  # frame index 7
    for axis_start, dim, pos in ((0, 16, 7.0), (16, 56, float(y)), (72, 56, float(x))):
        for c in range(dim):
            angle = pos / 256.0 ** (2 * (c // 2) / dim)
            assert table[0, axis_start + c, t_idx, y, x].item() == pytest.approx(math.cos(angle), abs=1e-5)
            assert table[0, 128 + axis_start + c, t_idx, y, x].item() == pytest.approx(math.sin(angle), abs=1e-5)
    scaled = rope(torch.tensor([[3.0]]), height=2, width=3, hw_scale=0.5)
    # y position 1 at scale 0.5 gives the Y angles of position 0.5
    y_half = torch.cos(0.5 / 256.0 ** (2 * (torch.arange(56) // 2) / 56))
    assert torch.allclose(scaled[0, 16:72, 0, 1, 0], y_half, atol=1e-6)


def test_patch_embedding_token_order_and_unpatchify_round_trip():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 6, 4)
    conv = torch.nn.Conv3d(16, 64, kernel_size=(1, 2, 2), stride=(1, 2, 2), bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(16):
            for ph in range(2):
                for pw in range(2):
                    conv.weight[c * 4 + ph * 2 + pw, c, 0, ph, pw] = 1.0  # token channel = (c, ph, pw)
    tokens = tokens_first(conv(x))  # (B, T·H'·W', 64)
    assert tokens.shape == (2, 3 * 3 * 2, 64)
    assert torch.equal(tokens[0, 1 * 6 + 2 * 2 + 1, 5 * 4 + 1 * 2 + 0], x[0, 5, 1, 2 * 2 + 1, 1 * 2 + 0])
    assert torch.equal(unpatchify(tokens, (3, 3, 2), (1, 2, 2)), x)


def _ln(x):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)


def _rms(x, w):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope_naive(x, cos, sin):
    out = x.clone()
    out[..., 0::2] = x[..., 0::2] * cos[..., 0::2] - x[..., 1::2] * sin[..., 0::2]
    out[..., 1::2] = x[..., 1::2] * cos[..., 0::2] + x[..., 0::2] * sin[..., 0::2]
    return out


def _attn_naive(q, k, v):
    w = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", w, v)


def test_double_block_equals_naive_formulas():
    m = fp32_model()
    block = m.transformer_blocks[0]
    g = torch.Generator().manual_seed(1)
    img, txt, temb = (
        torch.randn(1, 12, 128, generator=g),
        torch.randn(1, 5, 128, generator=g),
        torch.randn(1, 128, generator=g),
    )
    rope = m.rope(torch.tensor([[0.0, 4.0, 5.0]]), 2, 2)
    rope_tok = tokens_first(rope)
    with torch.no_grad():
        got_img, got_txt = block(img, txt, temb, rope_tok, dict(mode="torch"))

        lin = lambda mod, x: x @ mod.weight.T + mod.bias
        cos, sin = rope_tok[..., :128].unsqueeze(2), rope_tok[..., 128:].unsqueeze(2)
        mods = lin(block.norm1.linear, F.silu(temb))[:, None].chunk(6, -1)
        cmods = lin(block.norm1_context.linear, F.silu(temb))[:, None].chunk(6, -1)
        a = block.attn
        xi = _ln(img) * (1 + mods[1]) + mods[0]
        xt = _ln(txt) * (1 + cmods[1]) + cmods[0]
        heads = lambda t: t.reshape(1, t.shape[1], 1, 128)
        q = _rope_naive(_rms(heads(lin(a.to_q, xi)), a.norm_q.weight), cos, sin)
        k = _rope_naive(_rms(heads(lin(a.to_k, xi)), a.norm_k.weight), cos, sin)
        v = heads(lin(a.to_v, xi))
        tq = _rms(heads(lin(a.add_q_proj, xt)), a.norm_added_q.weight)
        tk = _rms(heads(lin(a.add_k_proj, xt)), a.norm_added_k.weight)
        tv = heads(lin(a.add_v_proj, xt))
        o = _attn_naive(torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1)).flatten(2)
        img2 = img + lin(a.to_out[0], o[:, :12]) * mods[2]
        txt2 = txt + lin(a.to_add_out, o[:, 12:]) * cmods[2]
        gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        ff = lambda f, x: lin(f.net[2], gelu(lin(f.net[0].proj, x)))
        img3 = img2 + mods[5] * ff(block.ff, _ln(img2) * (1 + mods[4]) + mods[3])
        txt3 = txt2 + cmods[5] * ff(block.ff_context, _ln(txt2) * (1 + cmods[4]) + cmods[3])
    assert torch.allclose(got_img, img3, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got_txt, txt3, atol=1e-4, rtol=1e-4)


def test_timestep_embedding_is_cos_then_sin():
    from frame_pack.hunyuan_video_packed import timestep_sinusoids

    e = timestep_sinusoids(torch.tensor([988.0]))
    i = torch.arange(128, dtype=torch.float32)
    ang = 988.0 * torch.exp(-math.log(10000) * i / 128)
    assert torch.allclose(e[0, :128], torch.cos(ang), atol=1e-5)
    assert torch.allclose(e[0, 128:], torch.sin(ang), atol=1e-5)


def test_padded_text_with_mask_equals_the_cropped_text():
    """Batch 1: masked padding (refiner mask, masked mean, crop) equals feeding only the valid tokens."""
    model = fp32_model()
    kw = section_inputs(text_lens=(17,), dtype=torch.float32)
    short = dict(kw)
    short["encoder_hidden_states"] = kw["encoder_hidden_states"][:, :17]
    short["encoder_attention_mask"] = kw["encoder_attention_mask"][:, :17]
    with torch.no_grad():
        assert torch.allclose(model(**kw), model(**short), atol=1e-4)


@pytest.mark.parametrize("split", [True, False])
def test_batch_of_two_with_unequal_text_equals_each_sample_alone(split):
    m = fp32_model()
    m.split_attn = split
    kw = section_inputs(batch=2, text_lens=(9, 30), dtype=torch.float32)
    with torch.no_grad():
        both = m(**kw)
        alone = torch.cat([m(**sample_slice(kw, i)) for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-4)


def test_attention_backends_fail_clearly_when_missing():
    for mode in ("flash", "sageattn", "xformers", "flash3"):
        with pytest.raises(AttentionBackendError, match=f"--attn_mode {mode}"):
            check_attn_mode(mode)
    check_attn_mode("torch")
    q = torch.randn(1, 4, 1, 8)
    assert torch.allclose(attention(q, q, q, "sdpa"), _attn_naive(q, q, q), atol=1e-5)


def test_rope_scaling_applies_only_above_the_threshold():
    m = fp32_model()
    kw = section_inputs(dtype=torch.float32)
    with torch.no_grad():
        base = m(**kw)
        m.enable_rope_scaling(timestep_threshold=900, factor=0.5)
        above = m(**kw)
        kw_low = dict(kw, timestep=torch.tensor([800.0]))
        below = m(**kw_low)
        m.enable_rope_scaling(None, 0.5)
        below_base = m(**kw_low)
    assert not torch.allclose(above, base, atol=1e-3)
    assert torch.equal(below, below_base)


# ---- memory features ---------------------------------------------------------------------------------------------


class PoisoningSwapper(bs.StackSwapper):
    """Offloaded weights become NaN until swapped back, so a block that runs before its transfer shows up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.store, self.offloads = {}, 0

    def to_offload(self, block):
        for w in bs._weights(block):
            if id(w) not in self.store:
                self.store[id(w)] = w.data
                w.data = torch.full_like(w.data, float("nan"))
                self.offloads += 1

    def to_device(self, block):
        for w in bs._weights(block):
            if id(w) in self.store:
                w.data = self.store.pop(id(w))


def test_block_swap_forward_is_exact():
    config = tiny_dit_config(num_layers=4, num_single_layers=4)
    m = fp32_model(config)
    kw = section_inputs(dtype=torch.float32)
    with torch.no_grad():
        expected = m(**kw)
        swappers = [
            PoisoningSwapper(m.transformer_blocks, 3, "cpu", False),
            PoisoningSwapper(m.single_transformer_blocks, 3, "cpu", False),
        ]
        m.block_swap = bs.BlockSwap(swappers)
        got1 = m(**kw)
        got2 = m(**kw)
    assert torch.equal(got1, expected) and torch.equal(got2, expected)
    assert all(s.offloads > 3 for s in swappers)


def test_block_swap_backward_gives_the_same_gradients():
    config = tiny_dit_config(num_layers=4, num_single_layers=4)
    kw = section_inputs(dtype=torch.float32)
    grads = []
    for swap in (False, True):
        m = fp32_model(config)
        m.train()
        if swap:
            m.block_swap = bs.BlockSwap(
                [
                    PoisoningSwapper(m.transformer_blocks, 2, "cpu", True),
                    PoisoningSwapper(m.single_transformer_blocks, 2, "cpu", True),
                ]
            )
        m.x_embedder.proj.weight.requires_grad_(True)
        m(**kw).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        if swap:
            for s in m.block_swap.stacks:
                for i in list(s.pending):
                    s.wait_for(i)
            assert all(s.offloads > 0 for s in m.block_swap.stacks)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        # The hooks change only the order in which autograd sums temb's gradient over blocks: fp32 rounding.
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-8), n


def test_block_swap_limits_and_cpu_no_op(caplog):
    assert bs.split_blocks_to_swap(38) == (19, 39)
    assert bs.split_blocks_to_swap(36) == (18, 37)
    bs.check_blocks_to_swap(38, 20, 40, training=False)
    bs.check_blocks_to_swap(36, 20, 40, training=True)
    with pytest.raises(ValueError, match="--blocks_to_swap 39"):
        bs.check_blocks_to_swap(39, 20, 40, training=False)
    with pytest.raises(ValueError, match="--blocks_to_swap 37.*in training"):
        bs.check_blocks_to_swap(37, 20, 40, training=True)
    m = fp32_model()
    m.enable_block_swap(2, torch.device("cpu"))
    assert m.block_swap is None
    assert "no effect" in caplog.text


def test_gradient_checkpointing_gives_the_same_gradients():
    kw = section_inputs(dtype=torch.float32)
    grads = []
    for ckpt in (False, True):
        m = fp32_model()
        m.train()
        if ckpt:
            m.enable_gradient_checkpointing()
        m(**kw).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-6), n


def test_gradient_checkpointing_cpu_offload_gives_the_same_gradients(monkeypatch):
    """The offloading path (on the CPU its copies stay in place; the path and its recomputation run all the
    same) gives gradients equal to plain checkpointing, bit for bit."""
    from frame_pack import hunyuan_video_packed as H

    calls = []
    offload = H.checkpoint_with_cpu_offload
    monkeypatch.setattr(H, "checkpoint_with_cpu_offload", lambda fn, *a: calls.append(fn) or offload(fn, *a))
    kw = section_inputs(dtype=torch.float32)
    grads = []
    for cpu_offload in (False, True):
        m = fp32_model()
        m.train()
        m.enable_gradient_checkpointing(cpu_offload=cpu_offload)
        m(**kw).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert len(calls) >= len(m.transformer_blocks) + len(m.single_transformer_blocks)
    for n, g in grads[0].items():
        assert torch.equal(g, grads[1][n]), n


def test_fp8_quantizer_equals_the_e4m3_rounding_rule():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 64, generator=g) * 0.05).bfloat16()
    q, scale = quantize_per_tensor(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (1,) and scale.dtype == torch.bfloat16
    assert scale.item() == pytest.approx((w.abs().max() / 448).item(), rel=1e-2)
    y = (w / scale).float().clamp(-448, 448)
    e = torch.clamp(torch.floor(torch.log2(y.abs().clamp(min=1e-30)) + 7), min=1)
    step = torch.pow(2.0, e - 10)
    expected = torch.where(y == 0, y, torch.round(y / step) * step)
    assert torch.equal(q.float(), expected)


def test_fp8_scaled_model_is_close_and_stores_scales(tiny_dit_files):
    m = load_packed_model(tiny_dit_files["single"]).eval()
    kw = section_inputs()
    with torch.no_grad():
        ref = m(**kw)
        n = apply_fp8(m, scaled=True)
        got = m(**kw)
    per_double, per_single = 12, 5
    assert n == per_double * dims.DIT_DOUBLE_BLOCKS + per_single * dims.DIT_SINGLE_BLOCKS
    state = m.state_dict()
    scales = [k for k in state if k.endswith(".scale_weight")]
    assert len(scales) == n
    assert state["transformer_blocks.0.attn.to_q.weight"].dtype == FP8_DTYPE
    assert "transformer_blocks.0.attn.to_q.scale_weight" in state
    assert state["transformer_blocks.0.norm1.linear.weight"].dtype == torch.bfloat16
    assert state["single_transformer_blocks.0.proj_out.weight"].dtype == FP8_DTYPE
    assert state["proj_out.weight"].dtype != FP8_DTYPE
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.1, rel  # fp8 e4m3 keeps 3 mantissa bits: a few percent of relative error at most


def test_fp8_without_scale_runs(tiny_dit_files):
    m = load_packed_model(tiny_dit_files["single"]).eval()
    kw = section_inputs()
    with torch.no_grad():
        ref = m(**kw)
        apply_fp8(m, scaled=False)
        got = m(**kw)
    assert not any(k.endswith("scale_weight") for k in m.state_dict())
    assert (got - ref).norm() / ref.norm() < 0.15
