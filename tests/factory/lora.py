"""Tiny LoRA state dicts for the tiny DiT in every layout the merge reads, built from the naming rules alone.

Nothing here imports the project's LoRA code: the names, shapes and fused-projection layouts are written out from
musubi-tuner's LoRA naming (lora_unet_ + module path with dots as underscores), so the tests check the converter
against an independent statement of the formats.
"""

from __future__ import annotations

import torch

from frame_pack.hunyuan_video_packed import PackedDiTConfig


def _dims(config: PackedDiTConfig) -> tuple[int, int]:
    d = config.num_attention_heads * config.attention_head_dim
    return d, int(d * config.mlp_ratio)


def framepack_modules(config: PackedDiTConfig, include_norm: bool = False) -> dict[str, tuple[str, tuple[int, int]]]:
    """musubi name -> (module path, (out, in)) for every LoRA target Linear (AdaLN ones with include_norm)."""
    d, h = _dims(config)
    double = [
        ("attn.to_q", (d, d)),
        ("attn.to_k", (d, d)),
        ("attn.to_v", (d, d)),
        ("attn.add_q_proj", (d, d)),
        ("attn.add_k_proj", (d, d)),
        ("attn.add_v_proj", (d, d)),
        ("attn.to_out.0", (d, d)),
        ("attn.to_add_out", (d, d)),
        ("ff.net.0.proj", (h, d)),
        ("ff_context.net.0.proj", (h, d)),
        ("ff.net.2", (d, h)),
        ("ff_context.net.2", (d, h)),
    ]
    single = [("attn.to_q", (d, d)), ("attn.to_k", (d, d)), ("attn.to_v", (d, d)), ("proj_mlp", (h, d))]
    single.append(("proj_out", (d, d + h)))
    if include_norm:
        double += [("norm1.linear", (6 * d, d)), ("norm1_context.linear", (6 * d, d))]
        single += [("norm.linear", (3 * d, d))]
    modules = {}
    for block_list, count, children in (
        ("transformer_blocks", config.num_layers, double),
        ("single_transformer_blocks", config.num_single_layers, single),
    ):
        for i in range(count):
            for child, shape in children:
                path = f"{block_list}.{i}.{child}"
                modules["lora_unet_" + path.replace(".", "_")] = (path, shape)
    return modules


def random_lora(shapes: dict[str, tuple[int, int]], rank=4, alpha=2.0, seed=0, dtype=torch.bfloat16) -> dict:
    """musubi-style tensors `<name>.lora_down.weight` (rank, in), `.lora_up.weight` (out, rank), `.alpha`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_features, in_features) in shapes.items():
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_features, generator=g) * 0.1).to(dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_features, rank, generator=g) * 0.1).to(dtype)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha).to(dtype)
    return sd


def framepack_lora(config: PackedDiTConfig, include_norm=False, **kwargs) -> dict:
    """A musubi FramePack LoRA for every target module of the tiny DiT."""
    return random_lora({n: s for n, (_, s) in framepack_modules(config, include_norm).items()}, **kwargs)


def to_peft(musubi_sd: dict, config: PackedDiTConfig, prefix="transformer", alpha_keys=False) -> dict:
    """The same LoRA with diffusers/PEFT keys `<prefix>.<module path>.lora_A/lora_B.weight` (+ `.alpha`)."""
    paths = {n: p for n, (p, _) in framepack_modules(config, include_norm=True).items()}
    out = {}
    for key, t in musubi_sd.items():
        name, _, kind = key.partition(".")
        kind = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}[kind]
        if kind != "alpha" or alpha_keys:
            out[f"{prefix}.{paths[name]}.{kind}"] = t
    return out


# HunyuanVideo LoRA modules per block: name -> fused FramePack targets with their row counts (d = width, h = MLP).
def _hunyuan_blocks(d: int, h: int):
    return {
        "double_blocks": (
            "transformer_blocks",
            {
                "img_attn_qkv": (d, [("attn_to_q", d), ("attn_to_k", d), ("attn_to_v", d)]),
                "txt_attn_qkv": (d, [("attn_add_q_proj", d), ("attn_add_k_proj", d), ("attn_add_v_proj", d)]),
                "img_attn_proj": (d, [("attn_to_out_0", d)]),
                "txt_attn_proj": (d, [("attn_to_add_out", d)]),
                "img_mlp_fc1": (d, [("ff_net_0_proj", h)]),
                "img_mlp_fc2": (h, [("ff_net_2", d)]),
                "txt_mlp_fc1": (d, [("ff_context_net_0_proj", h)]),
                "txt_mlp_fc2": (h, [("ff_context_net_2", d)]),
                "img_mod_linear": (d, [("norm1_linear", 6 * d)]),
                "txt_mod_linear": (d, [("norm1_context_linear", 6 * d)]),
            },
        ),
        "single_blocks": (
            "single_transformer_blocks",
            {
                "linear1": (d, [("attn_to_q", d), ("attn_to_k", d), ("attn_to_v", d), ("proj_mlp", h)]),
                "linear2": (d + h, [("proj_out", d)]),
                "modulation_linear": (d, [("norm_linear", 3 * d)]),
            },
        ),
    }


def hunyuan_lora(config: PackedDiTConfig, rank=4, alpha=2.0, seed=0, dtype=torch.bfloat16) -> tuple[dict, dict]:
    """(musubi HunyuanVideo LoRA with fused QKV / QKV+MLP up weights, its hand-split musubi FramePack equivalent)."""
    d, h = _dims(config)
    shapes, expected_parts = {}, {}
    for hv_list, (fp_list, children) in _hunyuan_blocks(d, h).items():
        count = config.num_layers if hv_list == "double_blocks" else config.num_single_layers
        for i in range(count):
            for child, (in_features, targets) in children.items():
                name = f"lora_unet_{hv_list}_{i}_{child}"
                shapes[name] = (sum(rows for _, rows in targets), in_features)
                expected_parts[name] = [(f"lora_unet_{fp_list}_{i}_{t}", rows) for t, rows in targets]
    hv = random_lora(shapes, rank, alpha, seed, dtype)
    expected = {}
    for name, targets in expected_parts.items():
        start = 0
        for target, rows in targets:
            expected[f"{target}.lora_down.weight"] = hv[f"{name}.lora_down.weight"]
            expected[f"{target}.lora_up.weight"] = hv[f"{name}.lora_up.weight"][start : start + rows]
            if alpha is not None:
                expected[f"{target}.alpha"] = hv[f"{name}.alpha"]
            start += rows
    return hv, expected


def hunyuan_to_diffusion_pipe(hv_sd: dict, prefix="diffusion_model") -> dict:
    """diffusion-pipe layout: `<prefix>.double_blocks.0.img_attn_qkv.lora_A.weight`, no alphas."""
    out = {}
    for key, t in hv_sd.items():
        name, _, kind = key.partition(".")
        if kind == "alpha":
            continue
        hv_list = "double_blocks" if "_double_blocks_" in name else "single_blocks"
        index, child = name.split(f"{hv_list}_", 1)[1].split("_", 1)
        kind = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[kind]
        out[f"{prefix}.{hv_list}.{index}.{child}.{kind}"] = t
    return out
