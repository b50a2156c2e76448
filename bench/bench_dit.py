"""Time one DiT forward (a full FramePack section) and report peak memory, for a configurable model size.

Each configuration runs in a fresh subprocess so its peak memory is its own (CUDA: max_memory_allocated;
CPU: the process's peak resident set size). The first configuration is the baseline the others are compared with.

    python bench/bench_dit.py                          # tiny model, 256x256, bf16 vs fp8_scaled (vs block swap on CUDA)
    python bench/bench_dit.py --width 3072 --double 20 --single 40 --height 640 --width_px 640 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import common  # noqa: E402


def run_one(cfg: dict) -> dict:
    import torch

    from frame_pack.fp8 import apply_fp8
    from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked, PackedDiTConfig

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    config = PackedDiTConfig(
        num_attention_heads=cfg["width"] // 128,
        num_layers=cfg["double"],
        num_single_layers=cfg["single"],
        text_embed_dim=cfg["text_dim"],
        pooled_projection_dim=768,
        image_proj_dim=1152,
    )
    dtype = torch.bfloat16
    model = HunyuanVideoTransformer3DModelPacked(config).to(dtype).eval().requires_grad_(False)
    if cfg["fp8_scaled"]:
        apply_fp8(model, scaled=True)
    model.to(device)
    if cfg["blocks_to_swap"]:
        model.enable_block_swap(cfg["blocks_to_swap"], device, use_pinned_memory=cfg["pinned"])
        model.move_to_device_except_swap_blocks(device)
    h, w, lws, text = cfg["height"] // 8, cfg["width_px"] // 8, cfg["lws"], cfg["text_tokens"]
    kw = dict(
        hidden_states=torch.randn(1, 16, lws, h, w, dtype=dtype, device=device),
        timestep=torch.tensor([988.0], dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(1, 512, cfg["text_dim"], dtype=dtype, device=device),
        encoder_attention_mask=(torch.arange(512, device=device) < text)[None],
        pooled_projections=torch.randn(1, 768, dtype=dtype, device=device),
        guidance=torch.tensor([9984.0], dtype=dtype, device=device),
        latent_indices=torch.arange(1, lws + 1, device=device)[None],
        clean_latents=torch.randn(1, 16, 2, h, w, device=device),
        clean_latent_indices=torch.tensor([[0, lws + 1]], device=device),
        clean_latents_2x=torch.randn(1, 16, 2, h, w, device=device),
        clean_latent_2x_indices=torch.tensor([[lws + 2, lws + 3]], device=device),
        clean_latents_4x=torch.randn(1, 16, 16, h, w, device=device),
        clean_latent_4x_indices=torch.arange(lws + 4, lws + 20, device=device)[None],
        image_embeddings=torch.randn(1, 729, 1152, dtype=dtype, device=device),
    )
    if cfg["gradient_checkpointing"]:
        model.enable_gradient_checkpointing()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        with torch.no_grad():
            model(**kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = common.peak_mib(device.type == "cuda")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    return {"seconds": min(times), "peak_mib": peak, "weights_mib": weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_dit_size_flags(p, text_dim=4096)
    common.add_section_size_flags(p, height=256, width=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--blocks_to_swap",
        type=int,
        default=0,
        help="also run with this many blocks swapped (CUDA), by the worker thread and by pinned memory + side stream",
    )
    args = p.parse_args()

    base = {k: v for k, v in vars(args).items()}
    variants = [("bf16", {}), ("fp8_scaled", {"fp8_scaled": True})]
    if args.blocks_to_swap and args.device.startswith("cuda"):
        variants.append((f"block swap {args.blocks_to_swap}", {"blocks_to_swap": args.blocks_to_swap}))
        swap_pinned = {"blocks_to_swap": args.blocks_to_swap, "pinned": True}
        variants.append((f"block swap {args.blocks_to_swap} pinned", swap_pinned))
    configs = [
        (
            name,
            {
                **base,
                "fp8_scaled": False,
                "gradient_checkpointing": False,
                "blocks_to_swap": 0,
                "pinned": False,
                **extra,
            },
        )
        for name, extra in variants
    ]
    results = common.run_variants(__file__, configs)
    tokens = (args.height // 16) * (args.width_px // 16) * args.lws
    print(
        f"DiT forward: width {args.width}, {args.double}+{args.single} blocks, {args.height}x{args.width_px}, "
        f"{tokens} noisy tokens, device {args.device}"
    )
    common.print_ratios(
        results, [("seconds", "", " s"), ("peak_mib", "peak ", " MiB"), ("weights_mib", "weights ", " MiB")]
    )


if __name__ == "__main__":
    common.child_or_main(run_one, main)
