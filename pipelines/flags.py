"""Flags that several scripts share (generation, the two caching scripts, training), each defined once with one
help text. A script adds the ones it takes to its own argument group; `note` appends what is specific to that
script (when the flag is required, what it is used for there).

The step caches (TeaCache, MagCache) and `--compile` also have a `*_settings` function that turns parsed flags (or
typed settings with fields of the same names) into the frozen settings the frame_pack modules take, raising
ValueError naming the flag at fault.
"""

from __future__ import annotations

from frame_pack.compile import COMPILE_DYNAMIC, COMPILE_MODES, CompileSettings
from frame_pack.magcache import DEFAULT_K, DEFAULT_RETENTION_RATIO, DEFAULT_THRESHOLD, parse_mag_ratios
from frame_pack.step_cache import StepCacheSettings
from frame_pack.teacache import DEFAULT_THRESHOLD as TEACACHE_DEFAULT_THRESHOLD
from hunyuan_model.frame_math import MAX_LATENT_WINDOW_SIZE, SPATIAL_COMPRESSION, pixel_frames
from hunyuan_model.tokenizers import DEFAULT_TOKENIZER_REPO
from hunyuan_model.vae import DEFAULT_TILE_SAMPLE_SIZE
from pipelines.settings import GenerationSettings
from utils.cli import UsageError, check_positive

MODEL_PATH_HELP = {
    "--dit": "FramePack DiT: first shard, shard folder, snapshot folder or single .safetensors file",
    "--vae": "HunyuanVideo VAE: single file or snapshot folder",
    "--text_encoder1": "LLaMA text encoder: Comfy single file, first HF shard or snapshot folder",
    "--text_encoder2": "CLIP-L text encoder: single file or snapshot folder",
    "--image_encoder": "SigLIP image encoder: single file or snapshot folder",
}


def _help(text: str, note: str | None) -> str:
    return f"{text} ({note})" if note else text


def add_model_path(group, flag: str, required: bool = False, note: str | None = None) -> None:
    """One of the model-file flags (`--dit`, `--vae`, `--text_encoder1`, `--text_encoder2`, `--image_encoder`)."""
    group.add_argument(flag, type=str, default=None, required=required, help=_help(MODEL_PATH_HELP[flag], note))


def add_tokenizer_flags(group) -> None:
    group.add_argument(
        "--tokenizer1",
        type=str,
        default=None,
        help="LLaMA tokenizer: a local folder (with tokenizer.json) or hub id (default: the snapshot's tokenizer/ "
        f"when --text_encoder1 is a snapshot folder, else {DEFAULT_TOKENIZER_REPO} subfolder tokenizer)",
    )
    group.add_argument(
        "--tokenizer2",
        type=str,
        default=None,
        help="CLIP tokenizer: a local folder (with vocab.json and merges.txt) or hub id (default: the snapshot's "
        f"tokenizer_2/ when --text_encoder2 is a snapshot folder, else {DEFAULT_TOKENIZER_REPO} subfolder "
        "tokenizer_2)",
    )


def add_fp8_llm_flag(group, note: str | None = None) -> None:
    group.add_argument(
        "--fp8_llm", action="store_true", help=_help("run the LLaMA text encoder with float8_e4m3fn weights", note)
    )


def add_vae_memory_flags(group) -> None:
    group.add_argument(
        "--vae_chunk_size",
        type=int,
        default=None,
        help="chunk size of the VAE's causal convolutions (saves memory; default: no chunking)",
    )
    group.add_argument(
        "--vae_spatial_tile_sample_min_size",
        type=int,
        default=None,
        help=f"VAE spatial tile size in pixels (default: {DEFAULT_TILE_SAMPLE_SIZE}, "
        f"{DEFAULT_TILE_SAMPLE_SIZE // SPATIAL_COMPRESSION} latent)",
    )


def check_vae_memory_flags(args) -> None:
    """--vae_chunk_size > 0; --vae_spatial_tile_sample_min_size at least a 2-latent tile (16 pixels)."""
    check_positive("--vae_chunk_size", args.vae_chunk_size)
    tile = args.vae_spatial_tile_sample_min_size
    if tile is not None and tile < 2 * SPATIAL_COMPRESSION:
        raise UsageError(f"--vae_spatial_tile_sample_min_size must be at least {2 * SPATIAL_COMPRESSION}, got {tile}")


def add_device_flag(group) -> None:
    group.add_argument(
        "--device", type=str, default=None, help="device for the models (default: cuda if available, else cpu)"
    )


def add_f1_flag(group, note: str | None = None) -> None:
    group.add_argument(
        "--f1",
        action="store_true",
        help=_help("FramePack-F1: sections forward in time (vanilla sampling) instead of inverted anti-drifting", note),
    )


def add_section_flags(group, note: str | None = None) -> None:
    """`--latent_window_size` and `--bulk_decode` (generation and sampling during training)."""
    group.add_argument(
        "--latent_window_size",
        type=int,
        default=GenerationSettings.latent_window_size,
        help=_help(f"latent frames generated per section (1 .. {MAX_LATENT_WINDOW_SIZE})", note),
    )
    group.add_argument(
        "--bulk_decode", action="store_true", help="decode all latent frames in one VAE call (faster, more memory)"
    )


def check_latent_window_size(value: int, flag: str = "--latent_window_size") -> None:
    """1 .. MAX_LATENT_WINDOW_SIZE latent frames per section."""
    if not 1 <= value <= MAX_LATENT_WINDOW_SIZE:
        raise UsageError(
            f"{flag} {value}: from 1 to {MAX_LATENT_WINDOW_SIZE} (a section of at most "
            f"{pixel_frames(MAX_LATENT_WINDOW_SIZE)} frames)"
        )


def add_blocks_to_swap_flag(group, default: int | None, maximum: int) -> None:
    group.add_argument(
        "--blocks_to_swap",
        type=int,
        default=default,
        help=f"DiT blocks kept on the CPU and streamed to the device when needed (at most {maximum})",
    )


VAE_DTYPE_CHOICES = ("float16", "bfloat16", "float32")


def add_vae_dtype_flag(group, note: str | None = None) -> None:
    group.add_argument(
        "--vae_dtype",
        type=str,
        default=None,
        choices=VAE_DTYPE_CHOICES,
        help=_help(
            "VAE precision (default: float16 on CUDA as musubi-tuner, float32 on the CPU, where float16 3D "
            "convolutions are slow); float16 on the CPU reproduces GPU numerics",
            note,
        ),
    )


def add_pinned_block_swap_flag(group) -> None:
    group.add_argument(
        "--use_pinned_memory_for_block_swap",
        action="store_true",
        help="block swap from page-locked host memory with copies on a CUDA side stream, overlapping the compute "
        "(CUDA only; holds the swapped blocks in pinned RAM)",
    )


# --- step caches and torch.compile (generation and training) -----------------------------------------------------


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
