"""Step caches and --compile on one FramePack section: block evaluations, wall time and deviation from uncached.

Variants, all in this process on the same random-weight DiT and inputs: uncached; TeaCache at upstream's 0.15;
MagCache with the default ratios (musubi's defaults); MagCache calibrated on this model and steps, then applied at
the default threshold/K; and uncached with the blocks compiled (its first, compiling call is timed separately).
Each line: block evaluations per video, wall time and its ratio to uncached, the final latent's relative error and
PSNR, and the same for the frames a (tiny, random) VAE decodes from it.

Random weights make the deviation figures a mechanical check that the cache does what it claims, not a measure
of video quality.

    OMP_NUM_THREADS=2 python bench/bench_step_cache.py                     # mid model (1024 wide, 8+16 blocks)
    python bench/bench_step_cache.py --device cuda --height 640 --width_px 640 --full
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from common import add_section_size_flags  # noqa: E402
from section import block_count, make_section, psnr, relative_error, sample  # noqa: E402

from frame_pack.compile import CompileSettings, check_compile_available, compile_blocks  # noqa: E402
from frame_pack.magcache import format_ratios  # noqa: E402
from frame_pack.step_cache import StepCacheSettings  # noqa: E402
from tests.factory.dit import full_dit_config, mid_dit_config, random_dit  # noqa: E402
from tests.factory.vae import make_tiny_vae  # noqa: E402


def decode(vae, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latent.to(vae.device, next(vae.parameters()).dtype)).float().clamp(-1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=8, help="attention heads of 128 (mid model: 8 = 1024 wide)")
    p.add_argument("--double", type=int, default=8, help="double-stream blocks (mid: 8)")
    p.add_argument("--single", type=int, default=16, help="single-stream blocks (mid: 16)")
    p.add_argument("--full", action="store_true", help="the real 3072-wide 20+40-block DiT instead")
    add_section_size_flags(p, height=64, width=64)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--image_tokens", type=int, default=64, help="SigLIP tokens (the real encoder gives 729)")
    p.add_argument("--f1", action="store_true", help="an F1 section instead of an inverted one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="DiT weights and activations")
    p.add_argument(
        "--compile_steps",
        type=int,
        default=25,
        help="steps timed with the compiled blocks (wall scaled to --steps when fewer; 0 = no compile variant)",
    )
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = (
        full_dit_config()
        if args.full
        else mid_dit_config(num_attention_heads=args.heads, num_layers=args.double, num_single_layers=args.single)
    )
    dtype = getattr(torch, args.dtype)
    dit = random_dit(config, dtype=dtype, device=device)
    section = make_section(config, args.height, args.width_px, args.lws, args.text_tokens, args.image_tokens,
                           f1=args.f1, device=device, dtype=dtype)  # fmt: skip
    vae = make_tiny_vae().to(device)
    blocks, steps = block_count(dit), args.steps
    tokens = section.tokens
    print(
        f"step caches: DiT {config.inner_dim} wide, {config.num_layers}+{config.num_single_layers} blocks, random "
        f"{args.dtype} weights; {'F1' if args.f1 else 'inverted'} section {args.height}x{args.width_px}, "
        f"lws {args.lws}, {steps} steps; tokens per call: {tokens['noisy']} noisy + {tokens['clean']} clean + "
        f"{tokens['text']} text; device {device}, {torch.get_num_threads()} threads"
    )
    print("random weights: the deviations are a mechanical check of the caches, not a statement about video quality")

    sample(dit, section, 2)  # warm-up: allocator, kernels
    # The calibration run computes every step and gives the uncached latent bit for bit: it is the baseline.
    calibration = StepCacheSettings(magcache_calibration=True).build(steps)
    base, base_s = sample(dit, section, steps, calibration)
    ratios = calibration.calibration_ratios()
    base_pixels = decode(vae, base)
    rows = [("uncached", steps * blocks, base_s, base, base_pixels)]

    def run(name: str, settings: StepCacheSettings):
        cache = settings.build(steps)
        latent, seconds = sample(dit, section, steps, cache)
        rows.append((name, cache.blocks_run * blocks, seconds, latent, decode(vae, latent)))

    run("TeaCache 0.15", StepCacheSettings(teacache_threshold=0.15))
    run("MagCache defaults", StepCacheSettings(magcache_ratios=()))
    run("MagCache calibrated", StepCacheSettings(magcache_ratios=ratios))

    compile_note = ""
    if args.compile_steps:
        settings = CompileSettings()
        check_compile_available(settings, device)
        compile_blocks(dit, settings)
        start = time.perf_counter()
        sample(dit, section, 2)
        n = args.compile_steps
        compile_note = f"compiling (first two compiled calls): {time.perf_counter() - start:.1f} s"
        _, seconds = sample(dit, section, n)
        compiled_s = seconds * steps / n
        compile_note += f"; compiled: {seconds / n:.3f} s/step vs eager {base_s / steps:.3f} s/step over {n} steps"
        latent = None
        if n == steps:
            latent, compiled_s = sample(dit, section, steps)
        rows.append(("compiled, uncached", steps * blocks, compiled_s, latent, None))

    print(f"  {'variant':22s} {'block evals':>11s} {'wall':>9s} {'ratio':>7s}   latent rel / PSNR    frames rel / PSNR")
    for name, evals, seconds, latent, pixels in rows:
        deviation = "(not sampled to the end)"
        if latent is not None:
            pixels = decode(vae, latent) if pixels is None else pixels
            latent_psnr = psnr(latent, base, peak=base.abs().max().item() * 2)
            deviation = (
                f"{relative_error(latent, base):.4f} / {latent_psnr:5.1f} dB   "
                f"{relative_error(pixels, base_pixels):.4f} / {psnr(pixels, base_pixels):5.1f} dB"
            )
        print(f"  {name:22s} {evals:11d} {seconds:8.2f}s {base_s / seconds:6.2f}x   {deviation}")
    print(f"  ratio = uncached wall / variant wall; block evals = steps that ran the blocks x {blocks} blocks")
    if compile_note:
        print(f"  {compile_note}")
    print("  uncached = the calibration run (it computes every step; its latent is the uncached one bit for bit)")
    print(f"  calibrated ratios: {format_ratios(ratios)}")


if __name__ == "__main__":
    main()
