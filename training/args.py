"""Command-line flags of fpack_train_network.py, the `--config_file` merge and the checks made before any work.

Flag names and defaults are musubi-tuner's (musubi-tuner's common trainer flags plus the FramePack ones). Where a
default or a check differs on purpose (a defect of musubi-tuner fixed), the flag's help says so.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re

from frame_pack.block_swap import MAX_BLOCKS_TO_SWAP_TRAINING
from hunyuan_model.latent_preview import PREVIEW_FORMATS
from pipelines.flags import (
    add_blocks_to_swap_flag,
    add_compile_args,
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
from training.timesteps import DEFAULT_VALIDATION_TIMESTEPS, TIMESTEP_SAMPLING_MODES, WEIGHTING_SCHEMES
from utils.cli import ArgumentParser, HelpFormatter, UsageError, add_debug_flag, check_finite, check_positive
from utils.toml_file import read_toml

logger = logging.getLogger(__name__)

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LOG_WITH = ("tensorboard", "wandb", "all")
DYNAMO_BACKENDS = (
    "NO", "EAGER", "AOT_EAGER", "INDUCTOR", "AOT_TS_NVFUSER", "NVPRIMS_NVFUSER", "CUDAGRAPHS", "OFI", "FX2TRT",
    "ONNXRT", "TENSORRT", "AOT_TORCHXLA_TRACE_ONCE", "TORCHXLA_TRACE_ONCE", "IPEX", "TVM", "HPU_BACKEND",
)  # fmt: skip
DYNAMO_MODES = ("default", "reduce-overhead", "max-autotune")
# Attention flags in musubi-tuner's priority order, with the attention mode each selects.
ATTENTION_FLAGS = {
    "sdpa": "torch",
    "flash_attn": "flash",
    "sage_attn": "sageattn",
    "xformers": "xformers",
    "flash3": "flash3",
}
DIT_DTYPE = "bfloat16"  # fixed for FramePack training
SAMPLE_SOLVER = "unipc"  # sampling during training always uses UniPC
DEFAULT_NETWORK_MODULE = "networks.lora_framepack"
# Config-file keys that name no flag but are accepted (musubi-tuner stores them on the namespace).
_INTERNAL_KEYS = {"dit_dtype", "sample_solver", "fp8_scaled_hunyuan"}


def int_or_float(value: str) -> int | float:
    """`--lr_warmup_steps` / `--lr_decay_steps`: `NN%` or a float < 1 is a ratio of the total steps, an integer a
    step count. A float literal with an integral value >= 1 (e.g. `10.0`) is refused, as in musubi-tuner."""
    text = str(value).strip()
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a percentage like 10%") from None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer, a ratio or a percentage") from None
    if number >= 1 and number.is_integer():
        raise argparse.ArgumentTypeError(f"{value!r}: write an integer step count ({int(number)}) or a ratio below 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="fpack_train_network.py",
        description="FramePack LoRA training from cached latents and text encoder outputs.",
        formatter_class=HelpFormatter,
        epilog=(
            "Launch: accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 fpack_train_network.py\n"
            "  --dit ... --dataset_config dataset.toml --sdpa --network_module networks.lora_framepack\n"
            "  --network_dim 32 --optimizer_type AdamW --learning_rate 2e-4 --output_dir out --output_name name\n"
            "Plain `python fpack_train_network.py ...` runs one process. Several GPUs: accelerate launch --multi_gpu\n"
            "--num_processes N. Several CPU processes (gloo): torchrun --standalone --nproc_per_node N."
        ),
    )

    g = p.add_argument_group("general, data and attention")
    g.add_argument(
        "--config_file",
        type=str,
        default=None,
        help="TOML file with training options (tables are flattened); command-line flags override it",
    )
    g.add_argument("--dataset_config", type=str, default=None, help="dataset config TOML/JSON (required)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention")
    g.add_argument("--flash_attn", action="store_true", help="FlashAttention 2 (CUDA, flash-attn package)")
    g.add_argument("--sage_attn", action="store_true", help="SageAttention: not supported for training (refused)")
    g.add_argument("--xformers", action="store_true", help="xformers attention (CUDA, xformers package)")
    g.add_argument("--flash3", action="store_true", help="FlashAttention 3 (CUDA, flash_attn_interface package)")
    g.add_argument("--split_attn", action="store_true", help="attention one sample at a time (batch size > 1)")
    g.add_argument("--max_train_steps", type=int, default=1600, help="training steps")
    g.add_argument("--max_train_epochs", type=int, default=None, help="training epochs (overrides --max_train_steps)")
    g.add_argument(
        "--max_data_loader_n_workers",
        type=int,
        default=8,
        help="DataLoader worker processes (at most the CPU count; 0 loads in the main process)",
    )
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep DataLoader workers alive")
    g.add_argument("--seed", type=int, default=None, help="random seed (random when omitted; recorded as ss_seed)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute DiT activations in backward")
    g.add_argument(
        "--gradient_checkpointing_cpu_offload",
        action="store_true",
        help="with --gradient_checkpointing: keep the checkpointed blocks' inputs in CPU memory until backward "
        "(less GPU memory, same gradients, some transfer time)",
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=MIXED_PRECISIONS,
        help="accelerate autocast precision (bf16 recommended; the DiT itself is bf16)",
    )

    g = p.add_argument_group("validation")
    g.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help="hold out this fraction of each training dataset's items (whole images or video crops, a fixed draw) "
        "as validation data; adds to any [[validation_datasets]] of the dataset config",
    )
    g.add_argument("--validate_every_n_steps", type=int, default=None, help="compute the validation loss every N steps")
    g.add_argument(
        "--validate_every_n_epochs", type=int, default=None, help="compute the validation loss every N epochs"
    )
    g.add_argument(
        "--validation_timesteps",
        type=int,
        nargs="+",
        default=list(DEFAULT_VALIDATION_TIMESTEPS),
        help="timesteps (1..1000; noise level t/1000) at which every validation item is scored, with fixed noise "
        "per item; the validation loss is the mean over them",
    )

    g = p.add_argument_group("logging")
    g.add_argument(
        "--logging_dir",
        type=str,
        default=None,
        help="log to <logging_dir>/<log_prefix><YYYYmmddHHMMSS> (loss, lr and step time per step)",
    )
    g.add_argument(
        "--log_with",
        type=str,
        default=None,
        choices=LOG_WITH,
        help="tracker; None: tensorboard when --logging_dir is set (a JSON-lines file when tensorboard "
        "is not installed)",
    )
    g.add_argument("--log_prefix", type=str, default=None, help="prefix of the logging sub-directory")
    g.add_argument("--log_tracker_name", type=str, default=None, help="tracker project name (None: network_train)")
    g.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    g.add_argument("--log_tracker_config", type=str, default=None, help="TOML file of tracker init kwargs")
    g.add_argument("--wandb_api_key", type=str, default=None, help="log in to wandb with this key first")
    g.add_argument("--log_config", action="store_true", help="log the (sanitized) arguments as tracker config")

    g = p.add_argument_group("distributed and compile")
    g.add_argument("--ddp_timeout", type=int, default=None, help="process-group timeout in minutes")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    g.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph")
    g.add_argument(
        "--dynamo_backend",
        type=str,
        default="NO",
        choices=DYNAMO_BACKENDS,
        help="torch.compile backend through accelerate",
    )
    g.add_argument("--dynamo_mode", type=str, default=None, choices=DYNAMO_MODES, help="torch.compile mode")
    g.add_argument("--dynamo_fullgraph", action="store_true", help="torch.compile fullgraph")
    g.add_argument("--dynamo_dynamic", action="store_true", help="torch.compile dynamic shapes")
    add_compile_args(g)

    g = p.add_argument_group("sampling during training")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="sample every N steps")
    g.add_argument("--sample_at_first", action="store_true", help="sample before the first step")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, help="sample every N epochs")
    g.add_argument(
        "--sample_prompts",
        type=str,
        default=None,
        help="prompt file (.txt, .toml or .json); lines take --w --h --f --d --s --g --l --n --i --ci --of",
    )
    g.add_argument(
        "--sample_preview",
        type=str,
        nargs="?",
        const="mp4",
        default=None,
        choices=PREVIEW_FORMATS,
        help="while a sample is generated, write <sample>_preview.mp4 (or .png) after each section: latents mapped "
        "to RGB without the VAE (not in musubi)",
    )
    add_step_cache_args(g)

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument(
        "--optimizer_type",
        type=str,
        default="",
        help="AdamW, AdamW8bit (bitsandbytes), Adafactor, a torch.optim class, or module.Class; "
        "empty: AdamW (musubi-tuner fails on the empty default)",
    )
    g.add_argument(
        "--optimizer_args",
        type=str,
        default=None,
        nargs="*",
        help='optimizer kwargs as key=value (Python literals), e.g. "weight_decay=0.01" "betas=(0.9,0.99)"',
    )
    g.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    g.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
        "inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant, adafactor",
    )
    g.add_argument(
        "--lr_warmup_steps",
        type=int_or_float,
        default=0,
        help="warmup steps; a float < 1 or NN%% is a ratio of the total steps",
    )
    g.add_argument(
        "--lr_decay_steps",
        type=int_or_float,
        default=0,
        help="decay steps (warmup_stable_decay); a float < 1 or NN%% is a ratio of the total steps",
    )
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1, help="power of polynomial decay")
    g.add_argument("--lr_scheduler_timescale", type=int, default=None, help="timescale of inverse_sqrt")
    g.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="minimum lr ratio of cosine_with_min_lr and warmup_stable_decay",
    )
    g.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="",
        help="custom scheduler class: a torch.optim.lr_scheduler name or module.Class",
    )
    g.add_argument(
        "--lr_scheduler_args",
        type=str,
        default=None,
        nargs="*",
        help="custom scheduler kwargs as key=value (Python literals)",
    )

    g = p.add_argument_group("model precision and memory")
    g.add_argument("--fp8_base", action="store_true", help="store the DiT block Linear weights in fp8")
    g.add_argument("--fp8_scaled", action="store_true", help="fp8 with a per-tensor scale (needs --fp8_base)")
    add_fp8_llm_flag(g, note="sample prompts only")
    add_blocks_to_swap_flag(g, None, MAX_BLOCKS_TO_SWAP_TRAINING)
    add_pinned_block_swap_flag(g)
    g.add_argument("--img_in_txt_in_offloading", action="store_true", help="accepted; unused by FramePack")

    g = p.add_argument_group("flow matching and timesteps")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="distilled guidance value fed to the DiT while training (x1000)",
    )
    g.add_argument(
        "--timestep_sampling",
        type=str,
        default="sigma",
        choices=TIMESTEP_SAMPLING_MODES,
        help="timestep distribution; flux_shift, logsnr and qinglong are the later musubi-tuner modes",
    )
    g.add_argument("--discrete_flow_shift", type=float, default=1.0, help="shift of --timestep_sampling shift")
    g.add_argument("--sigmoid_scale", type=float, default=1.0, help="scale of the normal draw of sigmoid-type modes")
    g.add_argument(
        "--weighting_scheme",
        type=str,
        default="none",
        choices=WEIGHTING_SCHEMES,
        help="loss weighting (sigma_sqrt, cosmap) or timestep density of the sigma mode",
    )
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean of logit_normal (and of logsnr)")
    g.add_argument("--logit_std", type=float, default=1.0, help="std of logit_normal (and of logsnr)")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode weighting scheme")
    g.add_argument("--min_timestep", type=int, default=None, help="lowest timestep, 0-999 (None: 0)")
    g.add_argument("--max_timestep", type=int, default=None, help="highest timestep, 1-1000 (None: 1000)")
    g.add_argument(
        "--show_timesteps",
        type=str,
        default=None,
        choices=("image", "console"),
        help="show the sampled timestep distribution and loss weighting, then exit",
    )

    g = p.add_argument_group("network")
    g.add_argument("--no_metadata", action="store_true", help="save only the minimal metadata")
    g.add_argument("--network_weights", type=str, default=None, help="LoRA weights to start from")
    g.add_argument("--network_module", type=str, default=None, help=f"network module (None: {DEFAULT_NETWORK_MODULE})")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (None: 4)")
    g.add_argument("--network_alpha", type=float, default=1, help="LoRA alpha (scale = alpha / rank)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down output")
    g.add_argument(
        "--network_args",
        type=str,
        default=None,
        nargs="*",
        help="network options as key=value: exclude_patterns, include_patterns, rank_dropout, "
        "module_dropout, loraplus_lr_ratio, verbose",
    )
    g.add_argument("--training_comment", type=str, default=None, help="comment stored in the metadata")
    g.add_argument(
        "--dim_from_weights",
        action="store_true",
        help="take ranks and alphas from --network_weights (broken in musubi-tuner)",
    )
    g.add_argument("--scale_weight_norms", type=float, default=None, help="max-norm regularisation of each module")
    g.add_argument(
        "--base_weights", type=str, default=None, nargs="*", help="LoRA files merged into the DiT before training"
    )
    g.add_argument(
        "--base_weights_multiplier",
        type=float,
        default=None,
        nargs="*",
        help="multiplier per --base_weights file (missing: 1.0)",
    )

    g = p.add_argument_group("saving, resume and metadata")
    g.add_argument("--output_dir", type=str, default=None, help="output folder (required)")
    g.add_argument(
        "--output_name",
        type=str,
        default=None,
        help="base name of the saved files (None: the dataset config's file name; musubi-tuner fails)",
    )
    g.add_argument(
        "--resume",
        type=str,
        default=None,
        help="state folder saved with --save_state; training continues at its epoch and step",
    )
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save a LoRA every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save a LoRA every N steps")
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    g.add_argument("--save_last_n_steps", type=int, default=None, help="keep step saves of the last N steps")
    g.add_argument("--save_last_n_steps_state", type=int, default=None, help="keep step states of the last N steps")
    g.add_argument("--save_state", action="store_true", help="save the training state with every LoRA save")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save the state at the end of training")
    g.add_argument(
        "--save_diffusers_lora",
        action="store_true",
        help="also write <name>.diffusers.safetensors next to every saved LoRA: diffusers/PEFT keys with alpha/rank "
        "folded into float32 factors, the file diffusers, Kijai's ComfyUI-FramePackWrapper and FramePack-Studio "
        "load at the right strength (same as convert_lora.py --target other; default: off)",
    )
    g.add_argument("--metadata_title", type=str, default=None, help="modelspec.title (None: the output name)")
    g.add_argument("--metadata_author", type=str, default=None, help="modelspec.author")
    g.add_argument("--metadata_description", type=str, default=None, help="modelspec.description")
    g.add_argument("--metadata_license", type=str, default=None, help="modelspec.license")
    g.add_argument("--metadata_tags", type=str, default=None, help="modelspec.tags (comma-separated)")
    g.add_argument("--huggingface_repo_id", type=str, default=None, help="upload saves to this Hub repo")
    g.add_argument("--huggingface_repo_type", type=str, default=None, help="Hub repo type")
    g.add_argument("--huggingface_path_in_repo", type=str, default=None, help="folder in the Hub repo")
    g.add_argument("--huggingface_token", type=str, default=None, help="Hub token")
    g.add_argument("--huggingface_repo_visibility", type=str, default=None, help="public, else private")
    g.add_argument("--save_state_to_huggingface", action="store_true", help="upload state folders too")
    g.add_argument(
        "--resume_from_huggingface",
        action="store_true",
        help="--resume is {repo_id}/{path_in_repo}[:{revision}[:{repo_type}]] on the Hub",
    )
    g.add_argument("--async_upload", action="store_true", help="upload in the background (not the final save)")

    g = p.add_argument_group("models")
    add_model_path(g, "--dit", note="required")
    add_model_path(g, "--vae", note="for sampling")
    add_vae_dtype_flag(g, note="sampling during training")
    for flag in ("--text_encoder1", "--text_encoder2", "--image_encoder"):
        add_model_path(g, flag, note="required with --sample_prompts")
    add_tokenizer_flags(g)
    add_vae_memory_flags(g)
    add_section_flags(g, note="of the samples; match the caches")
    add_f1_flag(g, note="of the samples")
    g.add_argument("--one_frame", action="store_true", help="samples use one-frame inference (prompt --of options)")
    add_debug_flag(p)
    return p


def read_config_file(path: str, parser: argparse.ArgumentParser) -> tuple[str, dict]:
    """(path without .toml, flattened values). Nested tables are flattened; unknown keys are warned about."""
    base = path[:-5] if path.endswith(".toml") else path
    file = base + ".toml"
    if not os.path.isfile(file):
        raise UsageError(f"--config_file {file}: file not found")
    config = read_toml(file, "--config_file")
    values: dict = {}

    def flatten(table: dict) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                flatten(value)
            else:
                values[key] = value

    flatten(config)
    actions = {a.dest: a for a in parser._actions}
    known = set(actions) | _INTERNAL_KEYS
    for key in sorted(set(values) - known):
        logger.warning(f"--config_file {file}: unknown option {key!r} ignored")
    for key, value in values.items():
        if key in actions:
            problem = config_value_problem(actions[key], value)
            if problem:
                raise UsageError(f"--config_file {file}: {key} = {value!r}: expected {problem}")
    return base, {k: v for k, v in values.items() if k in known}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_value_problem(action: argparse.Action, value) -> str | None:
    """What a config-file value of a flag should have been, or None when it fits (argparse never converts
    defaults, so a config value of the wrong type would otherwise reach the trainer as it is)."""
    if action.nargs == 0:
        return None if isinstance(value, bool) else "true or false"
    if action.nargs in ("*", "+"):
        if not isinstance(value, list):
            return "an array"
        items = value
    else:
        items = [value]
    for item in items:
        if action.type is int and not (isinstance(item, int) and not isinstance(item, bool)):
            return "an integer"
        if action.type is float and not _is_number(item):
            return "a number"
        if action.type is int_or_float and not (_is_number(item) or isinstance(item, str)):
            return "a step count or a ratio"
        if action.type in (None, str) and not isinstance(item, str):
            return "a string"
        if action.choices is not None and item not in action.choices:
            return f"one of {', '.join(map(str, action.choices))}"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line, with `--config_file` values as defaults under it; then the FramePack fixed settings."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_file:
        base, values = read_config_file(args.config_file, parser)
        logger.info(f"loaded training options from {base}.toml")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
        args.config_file = base
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def base_weight_multipliers(args: argparse.Namespace) -> list[float]:
    """One multiplier per --base_weights file: --base_weights_multiplier in order, 1.0 for the files after it."""
    given = args.base_weights_multiplier or []
    return [given[i] if i < len(given) else 1.0 for i in range(len(args.base_weights or []))]


def attention_mode(args: argparse.Namespace) -> str:
    for flag, mode in ATTENTION_FLAGS.items():
        if getattr(args, flag):
            return mode
    raise ValueError("choose an attention implementation: --sdpa, --flash_attn, --xformers or --flash3")


def _non_negative(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        check_positive(f"--{name}", getattr(args, name), allow_zero=True)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        check_positive(f"--{name}", getattr(args, name))


def validate_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading anything; raises ValueError naming the flag. Also applies the
    FramePack fixed settings (DiT bf16, VAE fp16, UniPC sampling) and the default network module."""
    if args.show_timesteps is None:
        for flag in ("dataset_config", "dit"):
            if getattr(args, flag) is None:
                raise ValueError(f"--{flag} is required")
        if args.output_dir is None:
            raise ValueError("--output_dir is required (where the LoRA is saved)")
        if args.sage_attn:
            raise ValueError("--sage_attn is not supported for training; use --sdpa (or --flash_attn, --xformers)")
        attention_mode(args)
    if args.fp8_scaled and not args.fp8_base:
        raise ValueError("--fp8_scaled needs --fp8_base")
    args.dit_dtype, args.sample_solver = DIT_DTYPE, SAMPLE_SOLVER
    args.network_module = args.network_module or DEFAULT_NETWORK_MODULE
    if args.dim_from_weights and not args.network_weights:
        raise ValueError("--dim_from_weights needs --network_weights")
    _positive(
        args,
        "max_train_steps",
        "max_train_epochs",
        "gradient_accumulation_steps",
        "save_every_n_epochs",
        "save_every_n_steps",
        "sample_every_n_steps",
        "sample_every_n_epochs",
        "latent_window_size",
        "network_dim",
    )
    check_vae_memory_flags(args)
    _non_negative(
        args,
        "max_data_loader_n_workers",
        "blocks_to_swap",
        "save_last_n_epochs",
        "save_last_n_epochs_state",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "max_grad_norm",
    )
    _positive(args, "validate_every_n_steps", "validate_every_n_epochs")
    if not 0.0 <= args.validation_split < 1.0:
        raise ValueError(f"--validation_split must be in [0, 1), got {args.validation_split}")
    if any(not 1 <= t <= 1000 for t in args.validation_timesteps):
        raise ValueError(f"--validation_timesteps must be in 1..1000, got {args.validation_timesteps}")
    if args.gradient_checkpointing_cpu_offload and not args.gradient_checkpointing:
        raise ValueError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")
    step_cache_settings(args)
    compile_with = compile_settings(args)
    if compile_with is not None:
        import torch

        from frame_pack.compile import check_compile_available

        check_compile_available(compile_with, "cuda" if torch.cuda.is_available() else "cpu")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if (args.blocks_to_swap or 0) > MAX_BLOCKS_TO_SWAP_TRAINING:
        raise ValueError(f"--blocks_to_swap {args.blocks_to_swap}: at most {MAX_BLOCKS_TO_SWAP_TRAINING} in training")
    t_min, t_max = args.min_timestep or 0, 1000 if args.max_timestep is None else args.max_timestep
    if not 0 <= t_min < t_max <= 1000:
        raise ValueError(f"--min_timestep/--max_timestep must satisfy 0 <= min < max <= 1000, got {t_min}, {t_max}")
    if args.base_weights_multiplier and len(args.base_weights_multiplier) > len(args.base_weights or []):
        raise ValueError("--base_weights_multiplier has more values than --base_weights has files")
    for flag in ("dataset_config", "dit", "network_weights", "sample_prompts", "vae", "image_encoder"):
        value = getattr(args, flag)
        if value is not None and not os.path.exists(value):
            raise ValueError(f"--{flag} {value}: not found")
    for path in args.base_weights or []:
        if not os.path.exists(path):
            raise ValueError(f"--base_weights {path}: not found")
    if args.resume and not args.resume_from_huggingface and not os.path.isdir(args.resume):
        raise ValueError(f"--resume {args.resume}: no such state folder")
    if args.sample_prompts:
        for flag in ("vae", "text_encoder1", "text_encoder2", "image_encoder"):
            if getattr(args, flag) is None:
                raise ValueError(f"--sample_prompts needs --{flag}")
    for key in ("optimizer_args", "lr_scheduler_args", "network_args"):
        for item in getattr(args, key) or []:
            if "=" not in item:
                raise ValueError(f"--{key} {item!r}: expected key=value")
    if args.output_name is not None and (not args.output_name.strip() or os.sep in args.output_name):
        raise ValueError(
            f"--output_name {args.output_name!r}: give a file name without a folder (the folder is --output_dir)"
        )
    check_numbers(args)
    check_latent_window_size(args.latent_window_size)
    check_network_module(args.network_module)
    check_network_args(args.network_args, args.network_module)


# (flag, lowest allowed value or None, first value above the range or None); every value must be finite
NUMBER_RANGES = (
    ("learning_rate", 0.0, None),
    ("max_grad_norm", 0.0, None),
    ("network_alpha", 0.0, None),
    ("network_dropout", 0.0, 1.0),
    ("scale_weight_norms", 0.0, None),
    ("guidance_scale", None, None),
    ("discrete_flow_shift", 0.0, None),
    ("sigmoid_scale", None, None),
    ("logit_mean", None, None),
    ("logit_std", 0.0, None),
    ("mode_scale", None, None),
    ("lr_scheduler_power", None, None),
    ("lr_scheduler_min_lr_ratio", 0.0, None),
    ("lr_warmup_steps", 0, None),
    ("lr_decay_steps", 0, None),
)


def check_numbers(args: argparse.Namespace) -> None:
    """Every number flag finite and in its range (a NaN learning rate or a negative alpha trains nothing useful)."""
    for name, minimum, below in NUMBER_RANGES:
        check_finite(f"--{name}", getattr(args, name), minimum, below)
    _positive(args, "discrete_flow_shift", "logit_std")
    for multiplier in args.base_weights_multiplier or []:
        check_finite("--base_weights_multiplier", multiplier)


def check_network_module(name: str) -> None:
    """--network_module must import and define create_network (or create_arch_network)."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UsageError(f"--network_module {name}: cannot import it ({e})") from None
    if not hasattr(module, "create_arch_network") and not hasattr(module, "create_network"):
        raise UsageError(f"--network_module {name}: defines neither create_arch_network nor create_network")


# --network_args keys whose values are checked here: fractions in [0, 1), a positive ratio, regex lists
NETWORK_ARG_FRACTIONS = ("rank_dropout", "module_dropout")
NETWORK_ARG_PATTERNS = ("exclude_patterns", "include_patterns")


def check_network_args(items: list[str] | None, network_module: str = DEFAULT_NETWORK_MODULE) -> None:
    """Values of the keys our LoRA reads; with our LoRA (networks.*) any other key is a typo and refused (another
    --network_module may take keys of its own)."""
    from networks.lora import NETWORK_ARG_KEYS, parse_pattern_list

    values = dict(item.partition("=")[::2] for item in items or [])
    if network_module.startswith("networks."):
        for key in values:
            if key not in NETWORK_ARG_KEYS:
                close = difflib.get_close_matches(key, NETWORK_ARG_KEYS, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise UsageError(
                    f"--network_args {key}={values[key]}: {network_module} takes no {key!r} ({hint}it takes "
                    f"{', '.join(NETWORK_ARG_KEYS)})"
                )
    for key in (*NETWORK_ARG_FRACTIONS, "loraplus_lr_ratio"):
        if key not in values:
            continue
        try:
            number = float(values[key])
        except ValueError:
            raise UsageError(f"--network_args {key}={values[key]}: not a number") from None
        if key == "loraplus_lr_ratio":
            check_finite(f"--network_args {key}", number, 0.0)
        else:
            check_finite(f"--network_args {key}", number, 0.0, 1.0)
    for key in NETWORK_ARG_PATTERNS:
        if key not in values:
            continue
        try:
            patterns = parse_pattern_list(values[key], key)
        except (ValueError, SyntaxError):
            raise UsageError(
                f"--network_args {key}={values[key]}: expected a list of regex strings, e.g. {key}=['.*attn.*']"
            ) from None
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(f"--network_args {key}: {pattern!r} is not a valid regex ({e})") from None
