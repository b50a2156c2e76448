"""Checks of what a training run was given that read files but load no model: the DiT and LoRA headers, the
`--resume` folder, the output folders, the optimizer and scheduler flags. They run before the dataset, the
accelerator or any model is set up, so a mistake costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch

from networks.lora import DEFAULT_NETWORK_DIM, DOWN_KEY, LORA_PREFIX, UP_KEY
from networks.lora_convert import load_lora_file
from training.args import DEFAULT_NETWORK_MODULE, base_weight_multipliers
from training.tracking import check_trackers
from utils.cli import UsageError, UserError, check_output_folder, log_level, one_line
from utils.safetensors_utils import read_header

logger = logging.getLogger(__name__)

STATE_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")  # the network in an accelerate state folder
STATE_REQUIRED_FILES = ("optimizer.bin", "scheduler.bin")


class TrainingInputError(UserError, ValueError):
    """A file given to the trainer that cannot be what its flag says."""


@dataclass(frozen=True)
class LoraModuleShape:
    """What a LoRA file says of one module: its rank and the Linear widths it was made for."""

    rank: int
    in_features: int
    out_features: int | None  # None when the file holds no lora_up weight of the module


def lora_module_shapes(path: str, flag: str) -> dict[str, LoraModuleShape]:
    """LoRA module name -> its shape, from the header alone where the file is a safetensors file. Refuses anything
    without `lora_unet_*.lora_down.weight` tensors."""
    if path.endswith(".safetensors"):
        shapes = {key: info.shape for key, info in read_header(path, flag)[0].items()}
    else:
        shapes = {key: tuple(tensor.shape) for key, tensor in load_lora_file(path, flag)[0].items()}
    modules = {}
    for key, shape in shapes.items():
        if key.startswith(LORA_PREFIX) and key.endswith(f".{DOWN_KEY}") and len(shape) == 2:
            name = key.rsplit(".", 2)[0]
            up = shapes.get(f"{name}.{UP_KEY}")
            modules[name] = LoraModuleShape(shape[0], shape[1], up[0] if up is not None and len(up) == 2 else None)
    if not modules:
        example = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise TrainingInputError(
            f"{flag} {path}: not a LoRA of this network (no {LORA_PREFIX}_*.{DOWN_KEY} tensors; it holds {example}). "
            "A diffusers/PEFT LoRA can be converted with convert_lora.py --target default"
        )
    return modules


def ranks_of(modules: dict[str, LoraModuleShape]) -> dict[str, int]:
    return {name: shape.rank for name, shape in modules.items()}


def _rank_summary(ranks: dict[str, int]) -> str:
    values = sorted(set(ranks.values()))
    return str(values[0]) if len(values) == 1 else "/".join(map(str, values))


def check_ranks(flag: str, path: str, ranks: dict[str, int], expected: int | dict[str, int], against: str) -> None:
    """The ranks of a file must be what the network is built with (one rank, or the ranks of another file)."""
    if isinstance(expected, int):
        wrong = {name: rank for name, rank in ranks.items() if rank != expected}
        want = str(expected)
    else:
        wrong = {name: rank for name, rank in ranks.items() if name in expected and rank != expected[name]}
        want = _rank_summary({name: expected[name] for name in wrong}) if wrong else ""
    if wrong:
        raise TrainingInputError(
            f"{flag} {path}: not a training state of this network: rank {_rank_summary(wrong)} vs {want} ({against})"
        )


def check_modules_fit(
    flag: str, path: str, modules: dict[str, LoraModuleShape], network_module: str, skeleton: torch.nn.Module
) -> None:
    """With the FramePack network, every module of the file must name a Linear of the DiT given as --dit, with that
    Linear's input and output widths (`skeleton`: that DiT on the meta device, so no weight loads)."""
    if network_module != DEFAULT_NETWORK_MODULE:
        return
    from networks.lora_framepack import target_linears

    linears = target_linears(skeleton)
    unknown = sorted(name for name in modules if name not in linears)
    if unknown:
        raise TrainingInputError(
            f"{flag} {path}: not a LoRA of this network: {len(unknown)} module(s) not in the DiT of --dit, "
            f"e.g. {unknown[0]}"
        )
    for name, shape in modules.items():
        linear = linears[name]
        widths = (shape.in_features, shape.out_features or linear.out_features)
        if widths != (linear.in_features, linear.out_features):
            raise TrainingInputError(
                f"{flag} {path}: not a LoRA of this DiT: {name} maps {widths[0]} -> {widths[1]} features, the DiT's "
                f"Linear {linear.in_features} -> {linear.out_features} (a LoRA of another model size)"
            )


def check_resume_folder(
    folder: str, expected: int | dict[str, int], against: str, network_module: str, skeleton: torch.nn.Module
) -> None:
    """A `--save_state` folder: the network weights, the optimizer and the scheduler are all there, and the
    network has the ranks this run builds."""
    present = set(os.listdir(folder))
    model = next((name for name in STATE_MODEL_FILES if name in present), None)
    missing = [name for name in STATE_REQUIRED_FILES if name not in present]
    if model is None:
        what = "an empty folder" if not present else f"it holds {', '.join(sorted(present)[:4])}"
        raise TrainingInputError(
            f"--resume {folder}: not a training state folder (no {STATE_MODEL_FILES[0]}; {what}); give a "
            "<name>-state folder written with --save_state"
        )
    if missing:
        raise TrainingInputError(f"--resume {folder}: incomplete training state, {', '.join(missing)} missing")
    modules = lora_module_shapes(os.path.join(folder, model), "--resume")
    check_modules_fit("--resume", folder, modules, network_module, skeleton)
    check_ranks("--resume", folder, ranks_of(modules), expected, against)


def check_training_files(args: argparse.Namespace) -> None:
    """Every file check that needs no model; raises a UserError naming the flag and the file."""
    from frame_pack.dit_loader import dit_skeleton, read_dit_config

    read_dit_config(args.dit, "--dit")
    resuming = args.resume and not args.resume_from_huggingface
    skeleton = dit_skeleton(args.dit) if args.base_weights or args.network_weights or resuming else None
    if args.base_weights:
        from networks.lora_merge import check_loras_fit

        check_loras_fit(skeleton, "--base_weights", args.base_weights, base_weight_multipliers(args))
    expected: int | dict[str, int] = DEFAULT_NETWORK_DIM if args.network_dim is None else args.network_dim
    against = f"--network_dim {expected}"
    if args.network_weights:
        modules = lora_module_shapes(args.network_weights, "--network_weights")
        check_modules_fit("--network_weights", args.network_weights, modules, args.network_module, skeleton)
        ranks = ranks_of(modules)
        if args.dim_from_weights:
            expected, against = ranks, f"the ranks of --network_weights {args.network_weights}"
        else:
            check_ranks("--network_weights", args.network_weights, ranks, expected, f"{against}; or --dim_from_weights")
    if resuming:
        check_resume_folder(args.resume, expected, against, args.network_module, skeleton)
    if args.sample_prompts:
        from training.sample_prompts import check_sample_prompts

        check_sample_prompts(args)
    check_output_folder("--output_dir", args.output_dir)
    if args.logging_dir:
        check_output_folder("--logging_dir", args.logging_dir)
    check_trackers(args, args.logging_dir)
    check_optimizer_flags(args)


def check_optimizer_flags(args: argparse.Namespace) -> None:
    """Build the optimizer and the scheduler once over a stand-in parameter: an unknown name, a missing package or
    a bad keyword fails now, not after the DiT loaded. Draws no random numbers."""
    from training.optim import create_lr_scheduler, create_optimizer

    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        with log_level(logging.getLogger("training.optim"), logging.ERROR):
            info = create_optimizer(args, [{"params": [probe], "lr": args.learning_rate}])
            create_lr_scheduler(args, info, 1)
    except UserError:
        raise
    except (TypeError, ValueError, ImportError) as e:  # the optimizer's or scheduler's own check of its kwargs
        flags = "--optimizer_type/--optimizer_args/--lr_scheduler/--lr_scheduler_args"
        raise UsageError(f"{flags}: {one_line(e)}") from None
