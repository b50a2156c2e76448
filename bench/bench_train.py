"""Time LoRA training steps of fpack_train_network.py and report peak memory, for a configurable model size.

Each variant runs the real trainer in a fresh subprocess on a random-weight DiT and a synthetic cached dataset of
the chosen size, so its peak memory is its own (CUDA: max_memory_allocated; CPU: peak resident set size). Step time
is the median of the logged `time/step_seconds` after the first (warm-up) step. The first variant is the baseline.

    python bench/bench_train.py                       # tiny model on the CPU: plain, checkpointing (also with
                                                      # activations offloaded to the CPU), fp8_scaled
    python bench/bench_train.py --width 3072 --double 20 --single 40 --text_dim 4096 --height 640 --width_px 640 \
        --blocks_to_swap 20                           # the full model on a GPU (adds a block-swap variant)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import common  # noqa: E402


def write_inputs(cfg: dict, folder: str) -> tuple[str, str]:
    """A random DiT checkpoint and a one-sample cached video dataset of the configured sizes; (dit, config)."""
    import torch
    from safetensors.torch import save_file

    from frame_pack.hunyuan_video_packed import PackedDiTConfig
    from tests.factory.datasets import write_config
    from tests.factory.dit import tiny_dit_state_dict

    config = PackedDiTConfig(
        num_attention_heads=cfg["width"] // 128,
        num_layers=cfg["double"],
        num_single_layers=cfg["single"],
        text_embed_dim=cfg["text_dim"],
        pooled_projection_dim=cfg["pooled_dim"],
        image_proj_dim=cfg["image_dim"],
    )
    dit = os.path.join(folder, "dit.safetensors")
    save_file(tiny_dit_state_dict(0, config), dit)

    cache = os.path.join(folder, "cache")
    os.makedirs(cache)
    lws, h, w = cfg["lws"], cfg["height"] // 8, cfg["width_px"] // 8
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g).half()

    mask = torch.arange(512) < cfg["text_tokens"]
    save_file(
        {
            "llama_vec_float16": randn(512, cfg["text_dim"]) * mask[:, None],
            "llama_attention_mask": mask,
            "clip_l_pooler_float16": randn(cfg["pooled_dim"]),
        },
        os.path.join(cache, "clip_fp_te.safetensors"),
    )
    suffix = f"{lws}x{h}x{w}_float16"
    frames = lws * 4 + 1
    for k in range(cfg["batch"]):
        save_file(
            {
                f"latents_{suffix}": randn(16, lws, h, w),
                f"latents_clean_{suffix}": randn(16, 2, h, w),
                f"latents_clean_2x_{suffix}": randn(16, 2, h, w),
                f"latents_clean_4x_{suffix}": randn(16, 16, h, w),
                "latent_indices_int64": torch.arange(1, 1 + lws),
                "clean_latent_indices_int64": torch.tensor([0, 1 + lws]),
                "clean_latent_2x_indices_int64": torch.tensor([2 + lws, 3 + lws]),
                "clean_latent_4x_indices_int64": torch.arange(4 + lws, 20 + lws),
                "image_embeddings_float16": randn(729, cfg["image_dim"]),
            },
            os.path.join(
                cache, f"clip_00000-{frames:03d}-{k:04d}_{cfg['width_px']:04d}x{cfg['height']:04d}_fp.safetensors"
            ),
        )
    dataset = {
        "video_directory": cache,
        "resolution": [cfg["width_px"], cfg["height"]],
        "batch_size": cfg["batch"],
        "target_frames": [frames],
    }
    return dit, str(write_config(os.path.join(folder, "dataset.toml"), [dataset]))


def run_one(cfg: dict) -> dict:
    import torch

    from training.trainer import main

    with tempfile.TemporaryDirectory() as folder:
        dit, dataset = write_inputs(cfg, folder)
        out = os.path.join(folder, "out")
        argv = [
            "--dit", dit, "--dataset_config", dataset, "--sdpa", "--mixed_precision", "bf16",
            "--max_train_steps", str(cfg["steps"]), "--max_data_loader_n_workers", "0", "--output_dir", out,
            "--network_dim", str(cfg["rank"]), "--learning_rate", "1e-4", "--seed", "0",
            "--logging_dir", os.path.join(out, "logs"), *cfg["extra"],
        ]  # fmt: skip
        if cfg["batch"] > 1:
            argv.append("--split_attn")
        main(argv)
        (log,) = glob.glob(os.path.join(out, "logs", "*", "metrics.jsonl"))
        times = [r["time/step_seconds"] for r in map(json.loads, open(log)) if "time/step_seconds" in r]
    peak = common.peak_mib(torch.cuda.is_available())
    return {"seconds": statistics.median(times[1:] or times), "peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_dit_size_flags(p, text_dim=512)
    p.add_argument("--pooled_dim", type=int, default=768, help="CLIP pooled width (full: 768)")
    p.add_argument("--image_dim", type=int, default=1152, help="SigLIP width (full: 1152)")
    common.add_section_size_flags(p, height=128, width=128)
    p.add_argument("--batch", type=int, default=1, help="batch size (batch > 1 adds --split_attn)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--steps", type=int, default=4, help="training steps per variant (the first is warm-up)")
    p.add_argument("--blocks_to_swap", type=int, default=0, help="also run with this many blocks swapped (CUDA)")
    p.add_argument("--device", default=None, help="cpu to hide GPUs (default: what accelerate picks)")
    args = p.parse_args()

    base = {k: v for k, v in vars(args).items() if k not in ("blocks_to_swap", "device")}
    variants = [
        ("bf16", []),
        ("grad checkpointing", ["--gradient_checkpointing"]),
        ("ckpt + cpu offload", ["--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"]),
        ("fp8_scaled", ["--fp8_base", "--fp8_scaled"]),
    ]
    if args.blocks_to_swap:
        variants.append((f"block swap {args.blocks_to_swap}", ["--blocks_to_swap", str(args.blocks_to_swap)]))
    env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    results = common.run_variants(__file__, [(name, {**base, "extra": extra}) for name, extra in variants], env)
    tokens = (args.height // 16) * (args.width_px // 16) * args.lws
    print(
        f"LoRA training step: width {args.width}, {args.double}+{args.single} blocks, {args.height}x{args.width_px}, "
        f"{tokens} noisy tokens, batch {args.batch}, rank {args.rank}"
    )
    common.print_ratios(results, [("seconds", "", " s/step"), ("peak_mib", "peak ", " MiB")])


if __name__ == "__main__":
    common.child_or_main(run_one, main)
