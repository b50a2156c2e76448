"""GPU acceptance run: the full-size FramePack DiT and VAE with random weights, one command, a table and a JSON file.

On one H100/H200 (about 6-8 minutes): the real DiT (3072 wide, 20 double + 40 single blocks) built with random
bf16 weights directly on the GPU, one 640x640 section of 9 latent frames with the usual clean latents (start + 1x,
2x, 4x history), 729 SigLIP tokens and a ~100-token prompt. Measured, each in this process:

  * s/step and MFU with sdpa, and with flash-attn / SageAttention when importable (FLOPs counted analytically);
  * peak VRAM with --blocks_to_swap 0, 20 and 38;
  * wall speed-up of TeaCache (0.15) and MagCache (defaults) over 25 steps against uncached;
  * s/step with the blocks compiled (inductor) against eager;
  * s/step and peak VRAM with --fp8_scaled (a fresh model, quantized on the GPU);
  * VAE decode time of a 37-frame 640x640 clip (random full-size VAE, fp16) with and without spatial tiling.

Random weights: speed and memory are those of the real model; outputs mean nothing.

    python bench/gpu_check.py                       # on the GPU; writes gpu_check.json
    python bench/gpu_check.py --dry_run             # the same code at tiny sizes on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from common import peak_mib  # noqa: E402
from section import block_count, make_section, sample, synchronize  # noqa: E402

from frame_pack.compile import CompileSettings, check_compile_available, compile_blocks  # noqa: E402
from frame_pack.fp8 import apply_fp8  # noqa: E402
from frame_pack.sampling import flow_match_x0_model  # noqa: E402
from frame_pack.step_cache import StepCacheSettings  # noqa: E402
from tests.factory.dit import full_dit_config, random_dit, tiny_dit_config  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
FULL = dict(height=640, width=640, lws=9, text_tokens=100, image_tokens=729, steps=25, swaps=(0, 20, 38),
            vae_frames=37, vae_size=640, tile=256)  # fmt: skip
DRY = dict(height=64, width=64, lws=9, text_tokens=16, image_tokens=16, steps=4, swaps=(0, 2),
           vae_frames=9, vae_size=64, tile=32)  # fmt: skip
FLOP_FORMULA = "FLOPs/forward = L * (24 * D^2 * N + 4 * N^2 * D)   (L blocks, D width, N = image + text tokens)"


def forward_flops(config, tokens: dict[str, int]) -> float:
    """Multiply-adds x 2 of the transformer blocks (embedders, refiner and output layer are < 1% and left out).

    Per token and block both block types have 12·D² weights on the path (double: q, k, v, out + a 4x MLP per
    stream; single: q, k, v, a 4x MLP in and the (D + 4D) x D output), and attention is QKᵀ plus AV: 2·2·N²·D.
    """
    n = tokens["noisy"] + tokens["clean"] + tokens["text"]
    d = config.inner_dim
    layers = config.num_layers + config.num_single_layers
    return layers * (24 * d * d * n + 4 * n * n * d)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def seconds_per_step(dit, section, repeats: int) -> float:
    """Median wall time of one sampling step (one DiT call at sigma 1) after one warm-up call."""
    return step_times(dit, section, repeats)[1]


def step_times(dit, section, repeats: int) -> tuple[float, float]:
    """(warm-up call seconds, median seconds of `repeats` further calls)."""
    dtype = dit.x_embedder.proj.weight.dtype
    model_x0 = flow_match_x0_model(dit, section.positive, shared=section.shared, dtype=dtype)
    sigma = torch.ones(1, device=section.noise.device)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            synchronize(section.noise.device)
            start = time.perf_counter()
            model_x0(section.noise, sigma)
            synchronize(section.noise.device)
            times.append(time.perf_counter() - start)
    return times[0], sorted(times[1:])[(len(times) - 1) // 2]


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []
        self.data: dict = {}

    def add(self, key: str, label: str, value, text: str) -> None:
        self.data[key] = value
        self.rows.append((label, text, key))
        print(f"  {label:44s} {text}", flush=True)


def check_attention(dit, section, report: Report, flops: float, peak: float | None, repeats: int) -> None:
    from frame_pack.attention import AttentionBackendError, check_attn_mode

    for mode, label in (("torch", "sdpa"), ("flash", "flash-attn"), ("sageattn", "SageAttention")):
        try:
            check_attn_mode(mode)
        except AttentionBackendError as e:
            report.add(f"attn_{label}", f"s/step {label}", None, f"skipped ({e})")
            continue
        dit.attn_mode = mode
        s = seconds_per_step(dit, section, repeats)
        mfu = f", MFU {flops / s / (peak * 1e12):.1%}" if peak else ""
        report.add(f"attn_{label}", f"s/step {label}", {"seconds": s, "tflops": flops / s / 1e12},
                   f"{s:.3f} s ({flops / s / 1e12:.3g} TFLOP/s{mfu})")  # fmt: skip
    dit.attn_mode = "torch"


def check_caches(dit, section, report: Report, steps: int) -> None:
    blocks = block_count(dit)
    _, base = sample(dit, section, steps)
    report.add("steps_uncached", f"{steps} steps uncached", {"seconds": base, "block_evals": steps * blocks},
               f"{base:.2f} s, {steps * blocks} block evaluations")  # fmt: skip
    for key, label, settings in (
        ("teacache", "TeaCache 0.15", StepCacheSettings(teacache_threshold=0.15)),
        ("magcache", "MagCache defaults", StepCacheSettings(magcache_ratios=())),
    ):
        cache = settings.build(steps)
        _, s = sample(dit, section, steps, cache)
        evals = cache.blocks_run * blocks
        report.add(key, f"{steps} steps {label}", {"seconds": s, "speedup": base / s, "block_evals": evals},
                   f"{s:.2f} s, {base / s:.2f}x faster, {evals} block evaluations")  # fmt: skip


def check_block_swap(dit, section, report: Report, swaps, device: torch.device) -> None:
    for n in swaps:
        if n:
            dit.enable_block_swap(n, device)
            dit.move_to_device_except_swap_blocks(device)
        reset_peak(device)
        s = seconds_per_step(dit, section, 1)
        peak = peak_mib(device.type == "cuda")
        if dit.block_swap is not None:
            dit.block_swap.before_forward()
            for stack in dit.block_swap.stacks:
                stack.executor.shutdown(wait=True)
            dit.block_swap = None
            dit.to(device)
        report.add(f"swap_{n}", f"--blocks_to_swap {n}", {"peak_mib": peak, "seconds": s},
                   f"peak {peak / 1024:.1f} GiB, {s:.3f} s/step")  # fmt: skip


def check_compile(dit, section, report: Report, repeats: int, device: torch.device, backend: str) -> None:
    eager = seconds_per_step(dit, section, repeats)
    settings = CompileSettings(backend=backend)
    check_compile_available(settings, device)
    compile_blocks(dit, settings)
    compiling, s = step_times(dit, section, repeats)
    report.add("compile", f"--compile ({backend})", {"seconds": s, "eager_seconds": eager, "speedup": eager / s,
               "compile_seconds": compiling},
               f"{s:.3f} s/step vs {eager:.3f} eager ({eager / s:.2f}x), compiling {compiling:.0f} s")  # fmt: skip


def check_fp8(config, section, report: Report, repeats: int, device: torch.device) -> None:
    reset_peak(device)
    dit = random_dit(config, seed=1, device=device)
    apply_fp8(dit, scaled=True, device=device, keep_on_device=True)
    reset_peak(device)
    s = seconds_per_step(dit, section, repeats)
    peak = peak_mib(device.type == "cuda")
    weights = sum(t.numel() * t.element_size() for t in dit.state_dict().values()) / 2**20
    report.add("fp8_scaled", "--fp8_scaled", {"seconds": s, "peak_mib": peak, "weights_mib": weights},
               f"{s:.3f} s/step, peak {peak / 1024:.1f} GiB, weights {weights / 1024:.1f} GiB")  # fmt: skip


def check_vae(report: Report, sizes: dict, device: torch.device, dry_run: bool) -> None:
    from hunyuan_model.vae import AutoencoderKLCausal3D, VAEConfig, compute_dtype
    from tests.factory.vae import init_vae_weights_, tiny_vae_config

    config = tiny_vae_config() if dry_run else VAEConfig()
    with torch.device(device):
        vae = init_vae_weights_(AutoencoderKLCausal3D(config)).to(compute_dtype(device)).eval()
    latent_frames = (sizes["vae_frames"] - 1) // 4 + 1
    side = sizes["vae_size"] // 8
    latent = torch.randn(1, 16, latent_frames, side, side, device=device, dtype=compute_dtype(device))
    for tiled in (False, True):
        vae.set_spatial_tiling(sizes["tile"] if tiled else None)
        reset_peak(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            frames = vae.decode(latent)
        synchronize(device)
        s = time.perf_counter() - start
        peak = peak_mib(device.type == "cuda")
        name = "tiled" if tiled else "untiled"
        report.add(f"vae_{name}", f"VAE decode {sizes['vae_frames']}x{sizes['vae_size']}^2 {name}",
                   {"seconds": s, "peak_mib": peak, "frames": frames.shape[2]},
                   f"{s:.2f} s, peak {peak / 1024:.1f} GiB")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    p.add_argument("--out", default="gpu_check.json", help="JSON file with every figure")
    p.add_argument("--repeats", type=int, default=3, help="timed DiT calls per s/step figure (median)")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--skip", nargs="*", default=[], choices=["attention", "caches", "swap", "compile", "fp8", "vae"],
                   help="leave out these checks")  # fmt: skip
    args = p.parse_args(argv)

    if args.dry_run:
        device, sizes, config, backend = torch.device("cpu"), DRY, tiny_dit_config(), "eager"
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --dry_run on a machine without a GPU")
        device, sizes, config, backend = torch.device("cuda"), FULL, full_dit_config(), "inductor"
    start = time.perf_counter()
    report = Report()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}; random weights (speed and memory only)")
    dit = random_dit(config, device=device)
    section = make_section(config, sizes["height"], sizes["width"], sizes["lws"], sizes["text_tokens"],
                           sizes["image_tokens"], device=device)  # fmt: skip
    tokens = section.tokens
    flops = forward_flops(config, tokens)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"DiT {config.inner_dim} wide, {config.num_layers}+{config.num_single_layers} blocks; section "
          f"{sizes['height']}x{sizes['width']}, {sizes['lws']} latent frames; tokens {tokens}")  # fmt: skip
    print(f"{FLOP_FORMULA} = {flops / 1e12:.4g} TFLOP; peak bf16 {peak or 'unknown'} TFLOP/s")
    report.data.update(device=name, tokens=tokens, flops_per_forward=flops, peak_tflops=peak, sizes=sizes)

    if "attention" not in args.skip:
        check_attention(dit, section, report, flops, peak, args.repeats)
    if "caches" not in args.skip:
        check_caches(dit, section, report, sizes["steps"])
    if "swap" not in args.skip:
        check_block_swap(dit, section, report, sizes["swaps"], device)
    if "compile" not in args.skip:
        check_compile(dit, section, report, args.repeats, device, backend)
    del dit
    if "fp8" not in args.skip:
        check_fp8(config, section, report, args.repeats, device)
    if "vae" not in args.skip:
        check_vae(report, sizes, device, args.dry_run)
    report.data["wall_seconds"] = time.perf_counter() - start

    print("\n| check | result |\n|---|---|")
    for label, text, _ in report.rows:
        print(f"| {label} | {text} |")
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report.data, f, indent=2)
    os.replace(tmp, args.out)
    print(f"total {report.data['wall_seconds']:.0f} s; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
