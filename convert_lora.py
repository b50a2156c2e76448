"""Convert FramePack LoRA files between our (musubi) layout and the diffusers/PEFT layout.

  --target other    musubi `lora_unet_*` -> diffusers/PEFT `transformer.<module path>.lora_A/lora_B.weight`
                    (what diffusers' HunyuanVideo/FramePack pipelines and PEFT-key loaders read)
  --target default  diffusers/PEFT (or any layout the merge understands, e.g. HunyuanVideo LoRAs) -> musubi

Alphas: by default they travel in the `lora_adapter_metadata` header entry that diffusers reads, tensors are copied
unchanged and `other` then `default` gives back the original file exactly. `--fold_alpha` instead scales down and
up by sqrt(alpha/rank) and drops the alphas, for loaders that ignore that header (the product is kept, the tensors
change). See networks/lora_convert.py for the key layouts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from networks.lora_convert import (
    ADAPTER_METADATA_KEY,
    ALPHA_DTYPE_KEY,
    LoraFormatError,
    convert_to_framepack,
    load_lora_file,
    to_diffusers,
)
from utils.safetensors_utils import WeightFileError, save_safetensors

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="LoRA file to convert (.safetensors)")
    parser.add_argument("--output", required=True, help="where to write the converted LoRA (.safetensors)")
    parser.add_argument(
        "--target",
        required=True,
        choices=["default", "other"],
        help="'default': to our musubi lora_unet_* layout; 'other': to the diffusers/PEFT layout",
    )
    parser.add_argument(
        "--prefix",
        default="transformer",
        help="key prefix of the diffusers/PEFT layout written by --target other (default: transformer)",
    )
    parser.add_argument(
        "--fold_alpha",
        action="store_true",
        help="--target other: fold alpha/rank into the weights instead of storing the alphas in the header",
    )
    return parser.parse_args(argv)


def convert(input_path: str, output_path: str, target: str, prefix: str = "transformer", fold_alpha: bool = False):
    state_dict, metadata = load_lora_file(input_path)
    converted = convert_to_framepack(state_dict, metadata, source=input_path)
    if converted.unrecognized:
        logger.warning(
            f"{len(converted.unrecognized)} keys could not be converted and are left out: "
            + ", ".join(converted.unrecognized[:8])
        )
    kept = {k: v for k, v in metadata.items() if k not in (ADAPTER_METADATA_KEY, ALPHA_DTYPE_KEY)}
    if target == "other":
        tensors, extra = to_diffusers(converted.state_dict, prefix=prefix, fold_alpha=fold_alpha)
        save_safetensors(tensors, output_path, {**kept, **extra})
    else:
        save_safetensors(converted.state_dict, output_path, kept or None)
    logger.info(f"wrote {output_path}")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        convert(args.input, args.output, args.target, args.prefix, args.fold_alpha)
    except (LoraFormatError, WeightFileError) as e:
        logger.error(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
