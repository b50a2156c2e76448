"""Flags of the step caches (TeaCache, MagCache) and of `--compile`, shared by generation and training.

Each `add_*` function adds its flags to a parser or argument group; `*_settings` turns parsed flags (or typed
settings with fields of the same names) into the frozen settings the frame_pack modules take, raising ValueError
naming the flag at fault.
"""

from __future__ import annotations

from frame_pack.compile import COMPILE_DYNAMIC, COMPILE_MODES, CompileSettings
from frame_pack.magcache import DEFAULT_K, DEFAULT_RETENTION_RATIO, DEFAULT_THRESHOLD, parse_mag_ratios
from frame_pack.step_cache import StepCacheSettings
from frame_pack.teacache import DEFAULT_THRESHOLD as TEACACHE_DEFAULT_THRESHOLD


def add_step_cache_args(group) -> None:
    group.add_argument(
        "--teacache_thresh",
        type=float,
        default=None,
        help=f"enable TeaCache with this threshold (upstream FramePack uses {TEACACHE_DEFAULT_THRESHOLD}): skips the "
        "DiT blocks on steps whose input barely changed; faster, slightly different output (not in musubi)",
    )
    group.add_argument(
        "--magcache_mag_ratios",
        type=str,
        default=None,
        help="enable MagCache with these residual norm ratios, one per step, comma-separated (from "
        "--magcache_calibration); 0 = the default ratios for 50 steps; other lengths are resampled to "
        "--infer_steps (default: off)",
    )
    group.add_argument(
        "--magcache_retention_ratio",
        type=float,
        default=DEFAULT_RETENTION_RATIO,
        help="MagCache: this fraction of the first steps always computes",
    )
    group.add_argument(
        "--magcache_threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="MagCache: largest accumulated error of reusing the cached residual",
    )
    group.add_argument("--magcache_k", type=int, default=DEFAULT_K, help="MagCache: most steps skipped in a row")
    group.add_argument(
        "--magcache_calibration",
        action="store_true",
        help="run every step, measure this model's ratios for --infer_steps, print them and save them next to "
        "the outputs (pass them back with --magcache_mag_ratios)",
    )


def step_cache_settings(args) -> StepCacheSettings:
    ratios = None
    if args.magcache_mag_ratios is not None:
        ratios = parse_mag_ratios(args.magcache_mag_ratios)
    settings = StepCacheSettings(
        teacache_threshold=args.teacache_thresh,
        magcache_ratios=ratios,
        magcache_calibration=args.magcache_calibration,
        magcache_retention_ratio=args.magcache_retention_ratio,
        magcache_threshold=args.magcache_threshold,
        magcache_k=args.magcache_k,
    )
    settings.validate()
    return settings


def add_compile_args(group) -> None:
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each DiT transformer block (inductor needs Triton on CUDA, a C++ compiler on the CPU); "
        "the first step is slow",
    )
    group.add_argument("--compile_backend", type=str, default="inductor", help="torch.compile backend")
    group.add_argument("--compile_mode", type=str, default="default", choices=COMPILE_MODES, help="torch.compile mode")
    group.add_argument(
        "--compile_dynamic",
        type=str,
        default=None,
        choices=list(COMPILE_DYNAMIC),
        help="dynamic shapes (default: auto, torch.compile decides)",
    )
    group.add_argument("--compile_fullgraph", action="store_true", help="torch.compile fullgraph mode")
    group.add_argument(
        "--compile_cache_size_limit",
        type=int,
        default=None,
        help="torch._dynamo.config.cache_size_limit (default: PyTorch's)",
    )


def compile_settings(args) -> CompileSettings | None:
    """None without --compile."""
    if not args.compile:
        return None
    settings = CompileSettings(
        backend=args.compile_backend,
        mode=args.compile_mode,
        dynamic=args.compile_dynamic,
        fullgraph=args.compile_fullgraph,
        cache_size_limit=args.compile_cache_size_limit,
    )
    settings.validate()
    return settings
