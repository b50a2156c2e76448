"""Command-line flags of fpack_generate_video.py and the inline grammar of prompt files / interactive lines.

Flag names, types and defaults are musubi-tuner's. Validation happens here, before any model is loaded, and every
message names the flag at fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable

from frame_pack.attention import ATTN_MODES
from frame_pack.block_swap import MAX_BLOCKS_TO_SWAP_INFERENCE
from frame_pack.extend import F1_CONTEXT_FRAMES, ORIGINAL_CONTEXT_FRAMES, resolve_context_frames
from frame_pack.sampling import MAX_INFER_STEPS, SAMPLE_SOLVERS, validate_sample_solver
from frame_pack.sections import total_sections, video_latent_frames
from frame_pack.timed_prompts import TimedPromptError, is_timed_prompt, section_prompts
from hunyuan_model.frame_math import LATENT_CHANNELS, latent_size, pixel_frames
from hunyuan_model.latent_preview import PREVIEW_FORMATS
from pipelines.extend_input import check_extend_video
from pipelines.flags import (
    add_blocks_to_swap_flag,
    add_compile_args,
    add_device_flag,
    add_f1_flag,
    add_fp8_llm_flag,
    add_model_path,
    add_pinned_block_swap_flag,
    add_section_flags,
    add_step_cache_args,
    add_tokenizer_flags,
    add_vae_dtype_flag,
    add_vae_memory_flags,
    check_latent_window_size,
    check_vae_memory_flags,
    compile_settings,
    step_cache_settings,
)
from pipelines.prompt_line import LineOption, PromptLineError, parse_line_options
from pipelines.settings import GenerationSettings, ModelSettings
from utils.cli import ArgumentParser, HelpFormatter, UsageError, add_debug_flag, check_positive
from utils.device import check_device, system_memory_bytes

OUTPUT_TYPES = ("video", "images", "latent", "both", "latent_images")

logger = logging.getLogger(__name__)

# The parser takes its defaults from the settings classes, so the flags and the settings built without them agree.
GEN, MODEL = GenerationSettings(), ModelSettings()


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="fpack_generate_video.py",
        description="FramePack image-to-video generation (original inverted anti-drifting, or F1 with --f1).",
        formatter_class=HelpFormatter,
        epilog=(
            "Prompt files (--from_file) and --interactive lines take inline options that override the flags:\n"
            "  --w width  --h height  --f video_seconds  --d seed  --s infer_steps  --g/--l guidance_scale\n"
            "  --i image_path  --im image mask (accepted, unused as in musubi-tuner)  --n negative_prompt\n"
            "  --vs video_sections  --ei end_image_path  --ci control image (repeatable)\n"
            "  --cim control image mask (repeatable)  --of one_frame_inference options  --ev extend_video\n"
            "  --lw a.safetensors,b.safetensors LoRAs for this line (none: no LoRA)  --lm 0.8,1.0 their multipliers\n"
            "  --n_seeds K  render K seeds (from --d, else random)\n"
            "A line without --lw/--lm uses the command-line LoRAs; switching merges and unmerges only the modules "
            "involved (the DiT is not reloaded).\n"
            "  --mcrr magcache_retention_ratio  --mct magcache_threshold  --mck magcache_k\n"
            "  --tct teacache_thresh"
        ),
    )
    models = p.add_argument_group("models")
    add_model_path(models, "--dit", note="required unless --latent_path")
    add_model_path(models, "--vae", note="required unless --output_type latent")
    for flag in ("--text_encoder1", "--text_encoder2", "--image_encoder"):
        add_model_path(models, flag, note="required unless --latent_path")
    add_tokenizer_flags(models)
    add_f1_flag(models)

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora_weight", type=str, nargs="*", default=None, help="LoRA files, merged in order")
    lora.add_argument(
        "--lora_multiplier", type=float, nargs="*", default=1.0, help="one multiplier per LoRA, or one for all"
    )
    lora.add_argument(
        "--include_patterns", type=str, nargs="*", default=None, help="per LoRA: regex of module keys to keep"
    )
    lora.add_argument(
        "--exclude_patterns", type=str, nargs="*", default=None, help="per LoRA: regex of module keys to drop"
    )
    lora.add_argument("--lycoris", action="store_true", help="merge LoRAs through LyCORIS (lycoris-lora package)")
    lora.add_argument(
        "--save_merged_model",
        type=str,
        default=None,
        help="save the DiT with LoRAs merged to this path and stop (needs --lora_weight)",
    )

    gen = p.add_argument_group("generation")
    gen.add_argument(
        "--prompt",
        type=str,
        default=None,
        help='prompt; per-section prompts as "0:text;;;-1:text" (indices, negatives, ranges S-E), or by time as '
        '"[0s: text] [2s: text] [3.5s-5s: text]": section k starts at k*4*latent_window_size/fps seconds (1.2 s at '
        "9 and 30 fps) in the finished video, whatever the generation order; [Ts: ...] applies to the sections "
        "starting at or after T and before the next token, [As-Bs: ...] to those starting in [A, B); text outside "
        "the brackets covers the sections no token covers; times compare at the nearest frame",
    )
    gen.add_argument(
        "--prompt_blend_sections",
        type=int,
        default=GEN.prompt_blend_sections,
        help="at each prompt change, move the text embeddings linearly to the new prompt over N sections "
        "(weights 1/N .. 1; FramePack-Studio's blend_sections); 0 or 1 switches at once",
    )
    gen.add_argument(
        "--negative_prompt", type=str, default=None, help="negative prompt (used when guidance_scale != 1)"
    )
    gen.add_argument("--custom_system_prompt", type=str, default=None, help="replace LLaMA's default system prompt")
    gen.add_argument(
        "--video_size",
        type=int,
        nargs=2,
        default=list(GEN.video_size),
        metavar=("HEIGHT", "WIDTH"),
        help="video height and width in pixels (multiples of 16)",
    )
    gen.add_argument(
        "--video_seconds",
        type=float,
        default=GEN.video_seconds,
        help="video length in seconds (the finished video must fit in this machine's memory)",
    )
    gen.add_argument("--video_sections", type=int, default=None, help="number of sections (overrides --video_seconds)")
    gen.add_argument("--fps", type=int, default=GEN.fps, help="frames per second of the output video")
    gen.add_argument(
        "--infer_steps", type=int, default=GEN.infer_steps, help=f"sampling steps per section (1 .. {MAX_INFER_STEPS})"
    )
    gen.add_argument("--seed", type=int, default=None, help="seed (random and printed when omitted)")
    gen.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        metavar="S1,S2,...",
        help="render every prompt once per seed, e.g. 1,2,3 (a line's --d or --n_seeds takes precedence)",
    )
    gen.add_argument(
        "--n_seeds",
        type=int,
        default=None,
        help=f"render K seeds per prompt: --seed, --seed+1, ... (random seeds without --seed); K <= {MAX_N_SEEDS:,}",
    )
    add_section_flags(gen)
    gen.add_argument(
        "--embedded_cfg_scale", type=float, default=GEN.embedded_cfg_scale, help="distilled guidance scale"
    )
    gen.add_argument(
        "--guidance_scale",
        type=float,
        default=GEN.guidance_scale,
        help="real CFG scale; 1.0 runs one model call per step and ignores the negative prompt",
    )
    gen.add_argument(
        "--guidance_rescale", type=float, default=GEN.guidance_rescale, help="CFG rescale factor (0 = off)"
    )
    gen.add_argument(
        "--sample_solver",
        type=str,
        default=GEN.sample_solver,
        choices=SAMPLE_SOLVERS,
        help="sampler; only unipc is implemented (as in musubi-tuner)",
    )
    gen.add_argument(
        "--image_path", type=str, default=None, help='start image; per-section start images as "0:a.png;;;2:b.png"'
    )
    gen.add_argument("--end_image_path", type=str, default=None, help="end image (ignored with --f1)")
    gen.add_argument(
        "--latent_paddings",
        type=str,
        default=None,
        help="comma-separated latent paddings per section, e.g. 0,0,0,0: integers 0 .. max(3, sections - 1); more "
        "values than sections: the first ones are used, with a warning (ignored with --f1)",
    )
    gen.add_argument(
        "--one_frame_inference",
        type=str,
        default=None,
        help="one-frame mode options: no_2x,no_4x,no_post,target_index=N,control_index=A;B,default (indices 0 .. "
        "1000; any other option is an error)",
    )
    gen.add_argument(
        "--one_frame_auto_resize",
        action="store_true",
        help="one-frame mode: choose the output size from the first control image's aspect ratio, keeping about "
        "the area of --video_size, sides multiples of 16",
    )
    gen.add_argument("--control_image_path", type=str, nargs="*", default=None, help="control images (one-frame)")
    gen.add_argument(
        "--control_image_mask_path", type=str, nargs="*", default=None, help="masks for the control images (one-frame)"
    )
    gen.add_argument(
        "--rope_scaling_factor", type=float, default=MODEL.rope_scaling_factor, help="RoPE H/W position scale"
    )
    gen.add_argument(
        "--rope_scaling_timestep_threshold",
        type=int,
        default=None,
        help="apply RoPE scaling while the timestep is at or above this value (off when omitted)",
    )

    ext = p.add_argument_group("extending a video")
    ext.add_argument(
        "--extend_video",
        type=str,
        default=GEN.extend_video,
        help="continue this video: an mp4 (resized and centre-cropped to --video_size, VAE-encoded; its last 1+4k "
        "frames) or a latent saved by this tool or musubi-tuner. The output is the input followed by the new "
        "frames; --video_seconds/--video_sections, section prompts and images count the new part; --image_path is "
        "optional (SigLIP conditioning, default: the input's first frame); --end_image_path targets the last new "
        "section (original model). Seed rule: the extension skips one noise draw of --seed per whole section the "
        "input holds, so with --f1 two one-section extensions equal one two-section extension",
    )
    ext.add_argument(
        "--extend_context_frames",
        type=int,
        default=GEN.extend_context_frames,
        help=f"input latent frames that feed the context. F1: the last N frames stay visible to the 4x/2x/1x clean "
        f"latents ({F1_CONTEXT_FRAMES[0]}..{F1_CONTEXT_FRAMES[1]}, default {F1_CONTEXT_FRAMES[2]}: all F1 sees). "
        f"Original model: FramePack-Studio's num_cleaned_frames ({ORIGINAL_CONTEXT_FRAMES[0]}.."
        f"{ORIGINAL_CONTEXT_FRAMES[1]}, default {ORIGINAL_CONTEXT_FRAMES[2]}). None = the model's default",
    )

    mem = p.add_argument_group("memory and speed")
    mem.add_argument("--fp8", action="store_true", help="store the DiT block weights in fp8")
    mem.add_argument("--fp8_scaled", action="store_true", help="fp8 with a per-tensor scale (better quality)")
    add_fp8_llm_flag(mem)
    add_device_flag(mem)
    mem.add_argument(
        "--attn_mode",
        type=str,
        default=MODEL.attn_mode,
        choices=[m for m in ATTN_MODES if m != "flash3"],
        help="attention backend",
    )
    add_vae_memory_flags(mem)
    add_blocks_to_swap_flag(mem, MODEL.blocks_to_swap, MAX_BLOCKS_TO_SWAP_INFERENCE)
    add_compile_args(mem)
    add_step_cache_args(p.add_argument_group("step caches (skip the DiT blocks on some steps)"))
    add_pinned_block_swap_flag(mem)
    add_vae_dtype_flag(mem)

    out = p.add_argument_group("output")
    out.add_argument("--save_path", type=str, default=None, help="output folder (required)")
    out.add_argument("--output_type", type=str, default=GEN.output_type, choices=OUTPUT_TYPES, help="what to save")
    out.add_argument("--no_metadata", action="store_true", help="do not store settings in saved latents and videos")
    out.add_argument(
        "--latent_path", type=str, nargs="*", default=None, help="decode these saved latent files instead of generating"
    )
    out.add_argument(
        "--preview",
        type=str,
        nargs="?",
        const="mp4",
        default=None,
        choices=PREVIEW_FORMATS,
        help="after each section write <name>_preview.mp4 (or .png: a strip of frames) next to the output: the "
        "video so far, mapped from latents to RGB without the VAE, one pixel per 8x8 and one frame per 4 frames",
    )

    modes = p.add_argument_group("batch and interactive")
    modes.add_argument("--from_file", type=str, default=None, help="prompt file: one prompt per line")
    modes.add_argument("--interactive", action="store_true", help="read prompts from standard input")
    modes.add_argument(
        "--skip_done",
        action="store_true",
        help="skip prompts (and seeds) whose outputs are already in --save_path, recognized by their recorded "
        "settings, so an interrupted --from_file queue continues where it stopped",
    )
    modes.add_argument(
        "--from_metadata",
        type=str,
        default=None,
        metavar="FILE",
        help="re-run the generation recorded in one of our outputs (mp4, PNG or latent): its settings, seed and "
        "model paths; flags given alongside override them",
    )
    modes.add_argument(
        "--show_metadata",
        type=str,
        default=None,
        metavar="FILE",
        help="print the generation recorded in one of our outputs as a command line and exit",
    )
    add_debug_flag(p)
    return p


def parse_seeds(text: str) -> list[int]:
    """`1,2,3` -> [1, 2, 3] (argparse type of --seeds)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def validate_args(args: argparse.Namespace) -> None:
    """Check flag combinations and values before anything is loaded; raises ValueError naming the flag."""
    if args.save_path is None:
        raise ValueError("--save_path is required")
    if args.from_file and args.interactive:
        raise ValueError("--from_file and --interactive cannot be used together")
    if args.from_metadata and (args.from_file or args.interactive or args.latent_path):
        raise ValueError("--from_metadata re-runs one generation: not with --from_file, --interactive or --latent_path")
    if args.skip_done and args.no_metadata:
        raise ValueError("--skip_done recognizes finished outputs by their metadata: not with --no_metadata")
    if args.seeds and args.n_seeds:
        raise ValueError("give --seeds or --n_seeds, not both")
    check_positive("--n_seeds", args.n_seeds)
    decode_only = bool(args.latent_path)
    if not decode_only:
        if not (args.prompt or args.from_file or args.interactive):
            raise ValueError("give --prompt, --from_file or --interactive (or --latent_path to decode)")
        for flag in ("dit", "text_encoder1", "text_encoder2", "image_encoder"):
            if getattr(args, flag) is None:
                raise ValueError(f"--{flag} is required for generation")
        if args.prompt and not args.from_file and not args.interactive and not (args.image_path or args.extend_video):
            raise ValueError("--image_path is required: FramePack generates video from a start image")
    if args.vae is None and not (args.output_type == "latent" and not decode_only):
        raise ValueError(f"--vae is required (for encoding images and for --output_type {args.output_type})")
    try:
        validate_sample_solver(args.sample_solver)
    except ValueError as e:
        raise ValueError(f"--sample_solver: {e}") from None
    check_video_size(args.video_size[0], args.video_size[1], "--video_size")
    check_positive("--infer_steps", args.infer_steps)
    check_positive("--latent_window_size", args.latent_window_size)
    check_positive("--fps", args.fps)
    check_positive("--video_seconds", args.video_seconds)
    check_positive("--video_sections", args.video_sections)
    check_positive("--blocks_to_swap", args.blocks_to_swap, allow_zero=True)
    check_vae_memory_flags(args)
    if args.blocks_to_swap > MAX_BLOCKS_TO_SWAP_INFERENCE:
        raise ValueError(f"--blocks_to_swap {args.blocks_to_swap}: at most {MAX_BLOCKS_TO_SWAP_INFERENCE}")
    check_one_frame_options(args.one_frame_inference, "--one_frame_inference")
    step_cache_settings(args)
    compile_settings(args)
    if args.save_merged_model and not args.lora_weight:
        raise ValueError("--save_merged_model needs --lora_weight (there is nothing to merge)")
    if args.lora_weight:
        mult = args.lora_multiplier
        mults = [mult] if isinstance(mult, float) else list(mult)
        if len(mults) not in (1, len(args.lora_weight)) and mults:
            raise ValueError(
                f"--lora_multiplier: give one value for all or one per LoRA ({len(args.lora_weight)}), got {len(mults)}"
            )
    check_positive("--prompt_blend_sections", args.prompt_blend_sections, allow_zero=True)
    for flag in ("image_path", "end_image_path", "from_file"):
        check_image_spec(getattr(args, flag), f"--{flag}")
    check_finite(vars(args))
    check_patterns(args)
    check_device(args.device)
    settings = GenerationSettings.from_args(args)
    check_run_values(settings)
    warn_unused_flags(args)
    check_prompt_times(settings, "--prompt")
    check_extension(settings, "--extend_video", lines_may_extend=bool(args.from_file or args.interactive))
    for flag in ("control_image_path", "control_image_mask_path", "latent_path", "lora_weight"):
        for value in getattr(args, flag) or []:
            if not os.path.exists(value):
                raise ValueError(f"--{flag} {value}: file not found")


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes


def command_line_flag(field: str) -> str:
    return f"--{field}"


def line_flag(field: str) -> str:
    """The inline option of a prompt line that sets `field` (the command-line flag when the line has none)."""
    return next((f"--{name}" for name, option in INLINE_OPTIONS.items() if option.field == field), f"--{field}")


def check_finite(values: dict[str, object], flag_of: Callable[[str], str] = command_line_flag) -> None:
    """Every float among `values` (name -> value or list of values) is finite: argparse and the prompt-line options
    take "nan" and "inf" as floats."""
    for name, value in values.items():
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise UsageError(f"{flag_of(name)} {number}: must be a finite number")


def check_patterns(args: argparse.Namespace) -> None:
    """--include_patterns / --exclude_patterns are regular expressions: each must compile."""
    for flag in ("include_patterns", "exclude_patterns"):
        for pattern in getattr(args, flag) or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(f"--{flag} {pattern!r}: not a valid regular expression ({e})") from None


def check_run_values(settings: GenerationSettings, flag_of: Callable[[str], str] = command_line_flag) -> None:
    """What needs the run's context: seeds in range, latent paddings against the section count, one-frame indices
    and masks against the control images given. `flag_of` names the flag (or line option) of a settings field."""
    check_finite({field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}, flag_of)
    check_seeds(settings, flag_of)
    check_counts(settings, flag_of)
    check_video_length(settings, flag_of)
    check_latent_paddings(settings, flag_of("latent_paddings"))
    check_control_images(settings, flag_of)


MAX_N_SEEDS = 1_000_000  # renders of one prompt; a larger count is a typo (the list of seeds is built up front)


def check_counts(settings: GenerationSettings, flag_of: Callable[[str], str] = command_line_flag) -> None:
    """Counts a typo could make huge, bounded by what a run can use."""
    check_latent_window_size(settings.latent_window_size, flag_of("latent_window_size"))
    if settings.infer_steps > MAX_INFER_STEPS:
        raise UsageError(
            f"{flag_of('infer_steps')} {settings.infer_steps}: at most {MAX_INFER_STEPS} (the model's timesteps)"
        )
    if settings.n_seeds is not None and settings.n_seeds > MAX_N_SEEDS:
        raise UsageError(f"{flag_of('n_seeds')} {settings.n_seeds}: at most {MAX_N_SEEDS:,} renders of one prompt")


DECODED_BYTES_PER_VALUE = 2  # the VAE decodes in a 16-bit dtype; the whole video is held before it is written


def check_video_length(settings: GenerationSettings, flag_of: Callable[[str], str] = command_line_flag) -> None:
    """The video asked for must fit in this machine's memory: decoded (3 values per pixel per frame) or, for
    --output_type latent, as latents. A typo such as --video_seconds 50000 is refused before anything is
    allocated, instead of sampling for days and running out of memory at the end. One-frame inference makes one
    frame, so only its size counts."""
    sections = total_sections(settings.video_seconds, settings.latent_window_size, settings.video_sections)
    latents = 1 if settings.one_frame else video_latent_frames(sections, settings.latent_window_size)
    height, width = settings.video_size
    if settings.output_type == "latent":
        h, w = latent_size(height, width)
        needed, held = latents * LATENT_CHANNELS * h * w * 4, "as float32 latents"
    else:
        needed, held = pixel_frames(latents) * 3 * height * width * DECODED_BYTES_PER_VALUE, "decoded"
    available = system_memory_bytes()
    if needed > available:
        if settings.one_frame:
            field, what = "video_size", f"one frame of {width}x{height} needs"
        else:
            field = "video_sections" if settings.video_sections is not None else "video_seconds"
            what = f"{sections} sections ({pixel_frames(latents)} frames of {width}x{height}) need"
        raise UsageError(
            f"{flag_of(field)}: {what} {needed / 2**30:.1f} GiB {held}, more than this machine's "
            f"{available / 2**30:.1f} GiB; give a shorter or smaller video"
        )


def warn_unused_flags(args: argparse.Namespace) -> None:
    """Flags of the command line the run will not use, said once at startup (musubi-tuner ignores them without a
    word). Prompt-file and interactive lines may still give the LoRAs a --lora_multiplier is for."""
    mode = "--f1" if args.f1 else "--one_frame_inference" if args.one_frame_inference else None
    if args.end_image_path and mode:
        logger.warning(f"--end_image_path is ignored with {mode}: only the original model's sections end on it")
    if args.latent_paddings is not None and mode:
        logger.warning(f"--latent_paddings is ignored with {mode}")
    lines_may_set = args.from_file or args.interactive
    if isinstance(args.lora_multiplier, list) and not args.lora_weight and not lines_may_set:
        logger.warning("--lora_multiplier is ignored: no --lora_weight is given")


def check_seeds(settings: GenerationSettings, flag_of: Callable[[str], str] = command_line_flag) -> None:
    low, high = SEED_RANGE
    given = [("seed", settings.seed)] if settings.seed is not None else []
    given += [("seeds", seed) for seed in settings.seeds or ()]
    for field, seed in given:
        if not low <= seed <= high:
            raise UsageError(f"{flag_of(field)} {seed}: a seed is an integer from {low} to {high}")
    if settings.seed is not None and settings.n_seeds and settings.seed + settings.n_seeds - 1 > high:
        raise UsageError(f"{flag_of('n_seeds')} {settings.n_seeds}: seeds from {settings.seed} pass {high}")


def check_latent_paddings(settings: GenerationSettings, flag: str = "--latent_paddings") -> None:
    """Paddings are integers from 0 to max(3, sections - 1) (the default list's largest is 3; a larger one only
    widens the blank gap before the section). More values than sections: the first ones are used, with a warning,
    as in musubi-tuner. Ignored in F1 mode."""
    if settings.latent_paddings is None or settings.f1 or settings.one_frame:
        return
    from frame_pack.sections import parse_latent_paddings

    try:
        paddings = parse_latent_paddings(settings.latent_paddings)
    except ValueError as e:
        message = str(e)
        raise UsageError(message if message.startswith(flag) else f"{flag}: {message}") from None
    sections = total_sections(settings.video_seconds, settings.latent_window_size, settings.video_sections)
    limit = max(3, sections - 1)
    for value in paddings:
        if value > limit:
            raise UsageError(f"{flag}: padding {value} is too large for {sections} section(s) (at most {limit})")
    if len(paddings) > sections:
        logger.warning(
            f"{flag}: {len(paddings)} values for {sections} section(s); using the first {sections} "
            f"({','.join(map(str, paddings[:sections]))}), ignoring the rest"
        )


def check_control_images(settings: GenerationSettings, flag_of: Callable[[str], str] = command_line_flag) -> None:
    """Masks pair with control images one to one; one-frame indices address the clean latents the run has."""
    from frame_pack.sections import one_frame_clean_count, parse_one_frame_options

    controls, masks = settings.control_image_path or (), settings.control_image_mask_path or ()
    mask_flag, control_flag = flag_of("control_image_mask_path"), flag_of("control_image_path")
    if masks and not controls:
        raise UsageError(f"{mask_flag}: masks given without control images ({control_flag})")
    if len(masks) > len(controls):
        raise UsageError(f"{mask_flag}: {len(masks)} masks for {len(controls)} control image(s) ({control_flag})")
    if not settings.one_frame:
        return
    flag = flag_of("one_frame_inference")
    options = parse_one_frame_options(settings.one_frame_inference)
    if options.target_index is not None and options.target_index < 0:
        raise UsageError(f"{flag}: target_index={options.target_index} must be >= 0")
    if any(index < 0 for index in options.control_indices):
        raise UsageError(f"{flag}: control_index values must be >= 0")
    slots = one_frame_clean_count(len(controls), options)
    if len(options.control_indices) > slots:
        post = "" if options.no_post else " + the post latent"
        raise UsageError(
            f"{flag}: control_index gives {len(options.control_indices)} indices for {slots} clean latent(s) "
            f"({len(controls)} control image(s) from {control_flag}{post})"
        )


def check_image_spec(value: str | None, flag: str) -> None:
    """Every file named by a path or a `SECTION:path;;;...` spec must exist."""
    if not value:
        return
    from frame_pack.sections import parse_section_spec

    paths = parse_section_spec(value).values() if ";;;" in value else [value]
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{flag} {path}: file not found")


def check_prompt_times(settings: GenerationSettings, flag: str) -> None:
    """A timed prompt must place every token on a section of this video (errors name the token)."""
    if not (settings.prompt and is_timed_prompt(settings.prompt)):
        return
    lws = settings.latent_window_size
    sections = 1 if settings.one_frame else total_sections(settings.video_seconds, lws, settings.video_sections)
    try:
        section_prompts(settings.prompt, sections, lws, settings.fps)
    except TimedPromptError as e:
        raise ValueError(f"{flag}: {e}") from None


def check_extension(settings: GenerationSettings, flag: str, lines_may_extend: bool = False) -> None:
    """--extend_video: the file is readable and fits --video_size; the context size fits the model.
    ``lines_may_extend``: prompt-file / interactive lines may still give --ev, so --extend_context_frames alone is
    fine."""
    if not settings.extend_video:
        if settings.extend_context_frames is not None and not lines_may_extend:
            raise ValueError("--extend_context_frames needs --extend_video")
        return
    if settings.one_frame:
        raise ValueError(f"{flag} cannot be combined with --one_frame_inference")
    try:
        resolve_context_frames(settings.extend_context_frames, settings.f1)
    except ValueError as e:
        raise ValueError(f"--extend_context_frames: {e}") from None
    check_extend_video(settings.extend_video, settings.height, settings.width, flag)


def check_one_frame_options(value: str | None, flag: str) -> None:
    if value:
        from frame_pack.sections import parse_one_frame_options

        try:
            parse_one_frame_options(value)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None


def check_video_size(height: int, width: int, where: str) -> None:
    """Sizes must be multiples of 16: latents are /8 and the DiT patchifies them by 2."""
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % 16:
            hint = f" (nearest: {max(16, round(v / 16) * 16)})" if v > 0 else ""
            raise ValueError(f"{where}: {name} {v} is not a positive multiple of 16{hint}")


# ---- prompt lines ------------------------------------------------------------------------------------------------

# Inline options of prompt-file and interactive lines; `--w`/`--h` each set one side of `video_size`.
INLINE_OPTIONS = {
    "w": LineOption("video_size", int),
    "h": LineOption("video_size", int),
    "f": LineOption("video_seconds", float),
    "d": LineOption("seed", int),
    "s": LineOption("infer_steps", int),
    "g": LineOption("guidance_scale", float),
    "l": LineOption("guidance_scale", float),
    "i": LineOption("image_path"),
    "im": LineOption("image_mask_path"),
    "n": LineOption("negative_prompt"),
    "vs": LineOption("video_sections", int),
    "ei": LineOption("end_image_path"),
    "ci": LineOption("control_image_path", repeat=True),
    "cim": LineOption("control_image_mask_path", repeat=True),
    "of": LineOption("one_frame_inference"),
    "ev": LineOption("extend_video"),
    "lw": LineOption("lora_weight"),
    "lm": LineOption("lora_multiplier"),
    "n_seeds": LineOption("n_seeds", int),
    "mcrr": LineOption("magcache_retention_ratio", float),
    "mct": LineOption("magcache_threshold", float),
    "mck": LineOption("magcache_k", int),
    "tct": LineOption("teacache_thresh", float),
}
NO_LORA = "none"  # `--lw none`: this line without LoRAs


def parse_prompt_line(line: str) -> dict:
    """`prompt --w 832 --h 480 --d 42 ...` -> {'prompt': ..., option: value}. Unknown options are errors."""
    prompt, values = parse_line_options(line, INLINE_OPTIONS, strict=True)
    if not prompt:
        raise PromptLineError("empty prompt")
    return {"prompt": prompt, **values}


def apply_prompt_line(base: GenerationSettings, parsed: dict) -> GenerationSettings:
    """The base settings with the line's overrides applied, validated like the command line."""
    changes: dict = {"prompt": parsed["prompt"]}
    height, width = base.video_size
    for name, value in parsed.items():
        if name == "prompt":
            continue
        if name == "im":
            logger.warning("--im (image mask) is accepted but not used, as in musubi-tuner")
            continue
        if name == "w":
            width = value
        elif name == "h":
            height = value
        elif name == "lw":
            changes["lora_weight"] = () if value.strip().lower() == NO_LORA else tuple(p for p in value.split(",") if p)
        elif name == "lm":
            try:
                changes["lora_multiplier"] = tuple(float(m) for m in value.split(","))
            except ValueError:
                raise PromptLineError(f"--lm {value!r}: expected comma-separated numbers") from None
        else:
            changes[INLINE_OPTIONS[name].field] = value
    if "lw" in parsed and "lm" not in parsed:
        changes["lora_multiplier"] = 1.0  # a line's own LoRAs at full strength unless --lm says otherwise
    if "d" in parsed or "n_seeds" in parsed:
        changes["seeds"] = None  # the line's own seed choice replaces the command line's --seeds
    settings = base.replace(video_size=(height, width), **changes)
    check_video_size(height, width, "--w/--h")
    check_line_loras(settings, parsed)
    try:
        check_one_frame_options(settings.one_frame_inference, "--of")
        check_image_spec(settings.image_path, "--i")
        check_image_spec(settings.end_image_path, "--ei")
        for flag, paths in (("--ci", settings.control_image_path), ("--cim", settings.control_image_mask_path)):
            for path in paths or []:
                check_image_spec(path, flag)
        check_prompt_times(settings, "prompt")
        check_extension(settings, "--ev")
        check_run_values(settings, line_flag)
    except ValueError as e:
        raise PromptLineError(str(e)) from None
    try:
        step_cache_settings(settings)
    except ValueError as e:
        raise PromptLineError(str(e)) from None
    check_positive("--s", settings.infer_steps)
    check_positive("--f", settings.video_seconds)
    check_positive("--vs", settings.video_sections)
    check_positive("--n_seeds", settings.n_seeds)
    return settings


def check_line_loras(settings: GenerationSettings, parsed: dict) -> None:
    """A line's --lw / --lm: the files exist and the multiplier count fits."""
    if "lw" not in parsed and "lm" not in parsed:
        return
    for path in settings.lora_weight or ():
        if not os.path.exists(path):
            raise PromptLineError(f"--lw {path}: file not found")
    count = len(settings.lora_weight or ())
    mult = settings.lora_multiplier
    mults = [mult] if isinstance(mult, (int, float)) else list(mult or [1.0])
    if count and len(mults) not in (1, count):
        raise PromptLineError(f"--lm: give one multiplier for all or one per LoRA ({count}), got {len(mults)}")
