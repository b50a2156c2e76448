"""Typed settings of one generation and of the models it loads, built once from the flags.

The pipeline functions take these frozen dataclasses, never the command-line namespace, so a setting cannot change
under a running generation and every caller (the command line, a prompt-file line, sampling during training) says
exactly what it sets. A field has the name of its flag; adding a flag that generation reads means adding a field
here with the flag's default (the parser takes its defaults from these classes) and reading it from the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from frame_pack.magcache import DEFAULT_K, DEFAULT_RETENTION_RATIO, DEFAULT_THRESHOLD


def _frozen(value: Any) -> Any:
    """Lists from argparse become tuples, so settings are hashable and cannot be edited in place."""
    return tuple(value) if isinstance(value, list) else value


_LINE_ONLY = ("lora_weight", "lora_multiplier")


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate and how to save it (the flags of `fpack_generate_video.py` that are not about models)."""

    prompt: str | None = None
    negative_prompt: str | None = None
    custom_system_prompt: str | None = None
    video_size: tuple[int, int] = (256, 256)  # (height, width) in pixels
    video_seconds: float = 5.0
    video_sections: int | None = None
    fps: int = 30
    infer_steps: int = 25
    seed: int | None = None
    latent_window_size: int = 9
    embedded_cfg_scale: float = 10.0
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    sample_solver: str = "unipc"
    image_path: str | None = None
    end_image_path: str | None = None
    latent_paddings: str | None = None
    one_frame_inference: str | None = None
    control_image_path: tuple[str, ...] | None = None
    control_image_mask_path: tuple[str, ...] | None = None
    f1: bool = False
    teacache_thresh: float | None = None
    magcache_mag_ratios: str | None = None  # comma-separated, "0" = the default ratios; None = MagCache off
    magcache_retention_ratio: float = DEFAULT_RETENTION_RATIO
    magcache_threshold: float = DEFAULT_THRESHOLD
    magcache_k: int = DEFAULT_K
    magcache_calibration: bool = False
    bulk_decode: bool = False
    save_path: str | None = None
    output_type: str = "video"
    no_metadata: bool = False
    prompt_blend_sections: int = 0  # sections over which text embeddings move to the next prompt (0: switch at once)
    extend_video: str | None = None  # mp4 or saved latent to continue
    extend_context_frames: int | None = None  # None: the model's default (frame_pack.extend)
    seeds: tuple[int, ...] | None = None  # one generation per seed
    n_seeds: int | None = None  # seeds seed, seed+1, ... (random ones without a seed)
    one_frame_auto_resize: bool = False
    preview: str | None = None  # "mp4" or "png"
    # The LoRAs of this generation (a prompt line's --lw / --lm); None: those merged at load (ModelSettings).
    lora_weight: tuple[str, ...] | None = None
    lora_multiplier: tuple[float, ...] | float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerationSettings:
        """Every field from the flag of the same name (the namespace must have them all), except the LoRA fields:
        on the command line the LoRAs are the models' (ModelSettings); only a prompt line sets them here."""
        return cls(
            **{f.name: _frozen(getattr(args, f.name)) for f in dataclasses.fields(cls) if f.name not in _LINE_ONLY}
        )

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with some fields changed (lists are frozen to tuples)."""
        return dataclasses.replace(self, **{k: _frozen(v) for k, v in changes.items()})

    @property
    def height(self) -> int:
        return self.video_size[0]

    @property
    def width(self) -> int:
        return self.video_size[1]

    @property
    def one_frame(self) -> bool:
        return bool(self.one_frame_inference)


def lora_multipliers(lora_weight, lora_multiplier) -> tuple[float, ...]:
    """One multiplier per LoRA file: a single value applies to all (musubi-tuner crashed on its default)."""
    count = len(lora_weight or ())
    mults = [lora_multiplier] if isinstance(lora_multiplier, (int, float)) else list(lora_multiplier or [1.0])
    return tuple(mults * count if len(mults) == 1 else mults)


@dataclass(frozen=True)
class ModelSettings:
    """Which model files to load and how (precision, attention, block swap, LoRAs merged into the DiT)."""

    dit: str | None = None
    vae: str | None = None
    text_encoder1: str | None = None
    text_encoder2: str | None = None
    image_encoder: str | None = None
    tokenizer1: str | None = None
    tokenizer2: str | None = None
    fp8: bool = False
    fp8_scaled: bool = False
    fp8_llm: bool = False
    attn_mode: str = "torch"
    blocks_to_swap: int = 0
    use_pinned_memory_for_block_swap: bool = False
    vae_dtype: str | None = None  # float16 / bfloat16 / float32; None: float16 on CUDA, float32 on the CPU
    vae_chunk_size: int | None = None
    vae_spatial_tile_sample_min_size: int | None = None
    lora_weight: tuple[str, ...] = ()
    lora_multiplier: tuple[float, ...] = ()  # one per LoRA file
    include_patterns: tuple[str, ...] | None = None
    exclude_patterns: tuple[str, ...] | None = None
    lycoris: bool = False
    save_merged_model: str | None = None
    rope_scaling_factor: float = 0.5
    rope_scaling_timestep_threshold: int | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "default"
    compile_dynamic: str | None = None
    compile_fullgraph: bool = False
    compile_cache_size_limit: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelSettings:
        """Fields from the flags of the same name; flags a script does not have (the caching scripts have no
        --dit, training has no --lora_weight) keep their defaults."""
        values = {f.name: _frozen(getattr(args, f.name, f.default)) for f in dataclasses.fields(cls)}
        values["lora_weight"] = values["lora_weight"] or ()
        values["lora_multiplier"] = lora_multipliers(values["lora_weight"], getattr(args, "lora_multiplier", 1.0))
        return cls(**values)
