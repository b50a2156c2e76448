"""Flags that several scripts share (generation, the two caching scripts, training), each defined once with one
help text. A script adds the ones it takes to its own argument group; `note` appends what is specific to that
script (when the flag is required, what it is used for there)."""

from __future__ import annotations

from hunyuan_model.frame_math import SPATIAL_COMPRESSION
from hunyuan_model.tokenizers import DEFAULT_TOKENIZER_REPO
from hunyuan_model.vae import DEFAULT_TILE_SAMPLE_SIZE
from pipelines.settings import GenerationSettings

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
        help=_help("latent frames generated per section", note),
    )
    group.add_argument(
        "--bulk_decode", action="store_true", help="decode all latent frames in one VAE call (faster, more memory)"
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
