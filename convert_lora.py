"""Convert FramePack LoRA files between our (musubi) layout and the diffusers/PEFT layout, or inspect one.

  --target other      musubi `lora_unet_*` (or any layout the merge reads) -> diffusers/PEFT
  (alias: diffusers)  `transformer.<module path>.lora_A/lora_B.weight`: the file to give diffusers, Kijai's
                      ComfyUI-FramePackWrapper and FramePack-Studio.
  --target default    diffusers/PEFT (or HunyuanVideo, diffusion-pipe) -> musubi `lora_unet_*`, for our tools.
  --inspect FILE      print format, rank, alpha, effective scale, modules per block type, dtype, and whether the
                      file loads at the intended strength in diffusers, Kijai's wrapper and FramePack-Studio.

Alphas: by default `other` folds alpha/rank into the factors (sqrt(alpha/rank) on each, stored in float32) and
writes a header saying alpha = rank, so tools that read only the tensors and tools that read the header apply the
same weights. `--no_fold_alpha` copies the tensors and keeps the alphas only in the `lora_adapter_metadata` header
(right in diffusers, too strong by rank/alpha elsewhere). `default` on a folded export of ours divides the alphas
back out, restoring the original tensors (exactly for bf16 files, to float32 rounding otherwise).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from networks.lora_convert import (
    OUR_HEADER_KEYS,
    convert_to_framepack,
    export_lora_file,
    load_lora_file,
)
from networks.lora_inspect import format_report, inspect_lora_file
from utils.cli import ArgumentParser, HelpFormatter, add_debug_flag, check_output_file, entry_point
from utils.safetensors_utils import save_safetensors

logger = logging.getLogger(__name__)

TARGETS = {"default": "default", "other": "other", "diffusers": "other"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="convert_lora.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", default=None, help="LoRA file to convert (.safetensors); required unless --inspect")
    parser.add_argument(
        "--output", default=None, help="where to write the converted LoRA (.safetensors); required unless --inspect"
    )
    parser.add_argument(
        "--target",
        default=None,
        choices=sorted(TARGETS),
        help="'other' (alias 'diffusers'): to the diffusers/PEFT layout other tools read; 'default': to our musubi "
        "lora_unet_* layout. Required unless --inspect",
    )
    parser.add_argument(
        "--prefix",
        default="transformer",
        help="key prefix of the diffusers/PEFT layout written by --target other (default: transformer, the one "
        "diffusers loads)",
    )
    parser.add_argument(
        "--no_fold_alpha",
        action="store_true",
        help="--target other: keep the tensors as they are and store the alphas only in the lora_adapter_metadata "
        "header (default: off, alpha/rank is folded into the factors so every tool gets the same strength)",
    )
    parser.add_argument(
        "--fold_alpha",
        action="store_true",
        help="--target other: fold alpha/rank into the factors; this is the default, the flag is kept for old "
        "command lines",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="dtype of the written factors (default: float32 for a folded export; otherwise the input's dtype, and "
        "for --target default of a folded export of ours the dtype it was exported from)",
    )
    parser.add_argument(
        "--inspect", default=None, metavar="FILE", help="print what FILE holds and where it loads right; no conversion"
    )
    parser.add_argument(
        "--multiplier",
        type=float,
        default=1.0,
        help="--inspect: the multiplier to show the effective scale for (default: 1.0)",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.inspect is None:
        missing = [f"--{name}" for name in ("input", "output", "target") if getattr(args, name) is None]
        if missing:
            parser.error(f"{', '.join(missing)} required (or use --inspect FILE)")
    if args.fold_alpha and args.no_fold_alpha:
        parser.error("--fold_alpha and --no_fold_alpha contradict each other")
    for flag in ("inspect", "input"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{flag} {path}: {'is a folder, not a LoRA file' if os.path.isdir(path) else 'not found'}")
    if args.inspect is None:
        check_output_file("--output", args.output)
        if os.path.abspath(args.output) == os.path.abspath(args.input):
            parser.error(f"--output {args.output}: is the --input file; write the conversion to another file")
    return args


def convert(
    input_path: str,
    output_path: str,
    target: str,
    prefix: str = "transformer",
    fold_alpha: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    state_dict, metadata = load_lora_file(input_path, "--input")
    converted = convert_to_framepack(state_dict, metadata, source=f"--input {input_path}")
    if converted.unrecognized:
        logger.warning(
            f"{len(converted.unrecognized)} keys could not be converted and are left out: "
            + ", ".join(converted.unrecognized[:8])
        )
    if TARGETS[target] == "other":
        export_lora_file(converted.state_dict, metadata, output_path, prefix, fold_alpha, dtype)
    else:
        kept = {k: v for k, v in metadata.items() if k not in OUR_HEADER_KEYS}
        tensors = converted.state_dict
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        save_safetensors(tensors, output_path, kept or None)
    logger.info(f"wrote {output_path}")


@entry_point
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.inspect is not None:
        print(format_report(inspect_lora_file(args.inspect), args.multiplier))
    else:
        dtype = DTYPES[args.dtype] if args.dtype else None
        convert(args.input, args.output, args.target, args.prefix, not args.no_fold_alpha, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
