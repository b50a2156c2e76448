"""Loading the packed DiT from every public layout, with the config read from the checkpoint itself.

Accepted for `--dit`: lllyasviel's three-shard folder (index json used when present), a path to its first shard,
a Hugging Face snapshot folder, and Kijai's single bf16 file; FramePack-F1 the same way. The model is built on the
meta device and the file tensors are assigned as they are (file dtype kept), so no second copy is ever held.

With fp8 or a per-weight transform (a LoRA merge), the checkpoint streams instead: each tensor is read from the
memory-mapped file, transformed, quantized when it is an fp8 target, and written into its final place before the
next one is read, so the process never holds the bf16 model beside its fp8 copy. An fp8 target is even read, merged
and quantized a few rows at a time (its file pages handed back as each block is done), so beyond the fp8 model the
process holds one block, not one whole tensor.
`save_merged_dit` streams the same way from one checkpoint to another.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch
from tqdm.auto import tqdm

from frame_pack.fp8 import (
    FP8_DTYPE,
    ChunkSource,
    Fp8Settings,
    block_rows,
    fp8_target_modules,
    install_fp8_weight,
    quantize_chunks,
)
from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked, PackedDiTConfig
from utils.checkpoint_kinds import state_dict_mismatch, wrong_file_message
from utils.safetensors_utils import (
    SAFETENSORS_DTYPES,
    WeightFileError,
    data_order,
    load_state_dict,
    read_config_json,
    read_headers,
    release_mapped_pages,
    resolve_weight_files,
    stream_tensors,
    write_safetensors_streaming,
)

logger = logging.getLogger(__name__)

# Keys without which a file cannot be a FramePack packed DiT.
REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "clean_x_embedder.proj.weight",
    "image_projection.up.weight",
    "context_embedder.proj_in.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.norm_q.weight",
    "proj_out.weight",
)


def read_dit_config(path: str, flag: str = "--dit") -> tuple[list[str], PackedDiTConfig]:
    """Validate a DiT checkpoint from its headers alone and return (files, config). Cheap: reads no tensor data."""
    files = resolve_weight_files(path, flag, subfolder="transformer")
    infos = read_headers(files, flag)
    missing = [k for k in REQUIRED_KEYS if k not in infos]
    if missing:
        raise WeightFileError(
            wrong_file_message(flag, path, "a FramePack DiT (keys like x_embedder.proj.weight)", infos)
        )
    shapes = {k: v.shape for k, v in infos.items()}
    config = PackedDiTConfig.from_shapes(shapes, read_config_json(os.path.dirname(files[0]), flag))

    with torch.device("meta"):
        expected = HunyuanVideoTransformer3DModelPacked(config).state_dict()
    problem = state_dict_mismatch({k: tuple(v.shape) for k, v in expected.items()}, shapes)
    if problem:
        raise WeightFileError(f"{flag} {path}: not a complete FramePack DiT: {problem}")
    return files, config


class WeightTransform(Protocol):
    """A change to each weight made while it streams in, row by row (e.g. `networks.lora_merge.LoraMergePlan`)."""

    def merge_weight(self, key: str, weight: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """The tensor to keep for state-dict `key`, given the whole tensor or its rows from `first_row` on; each
        row of the result depends only on the same row of the input."""

    def done(self, key: str) -> None:
        """`key` is loaded: what the transform kept for it may go."""


def dit_skeleton(path: str, flag: str = "--dit") -> HunyuanVideoTransformer3DModelPacked:
    """The checkpoint's model on the meta device (shapes, no data): what a LoRA merge is planned against."""
    _, config = read_dit_config(path, flag)
    with torch.device("meta"):
        return HunyuanVideoTransformer3DModelPacked(config)


def load_packed_model(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_mode: str = "torch",
    split_attn: bool = False,
    flag: str = "--dit",
    weight_transform: WeightTransform | None = None,
    fp8: Fp8Settings | None = None,
) -> HunyuanVideoTransformer3DModelPacked:
    """Load a FramePack (or F1) DiT. `dtype` None keeps the file's dtype (bf16 for the public weights).

    `weight_transform` is applied to each tensor (after the `dtype` cast) and `fp8` quantizes the target Linear
    weights, both while streaming; the result equals loading, then transforming, then `apply_fp8`, bit for bit.
    """
    files, config = read_dit_config(path, flag)
    logger.info(
        f"DiT from {path}: {config.num_layers} double + {config.num_single_layers} single blocks, "
        f"width {config.inner_dim} ({len(files)} file(s))"
    )
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModelPacked(config, attn_mode=attn_mode, split_attn=split_attn)
    if weight_transform is None and fp8 is None:
        state = load_state_dict(files, device=device, dtype=dtype)
    else:
        state = _stream_state_dict(model, files, torch.device(device), dtype, weight_transform, fp8, flag)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _stream_state_dict(model, files, device, dtype, transform, fp8, flag) -> dict[str, torch.Tensor]:
    """Read, transform and quantize tensor by tensor into destinations allocated up front.

    Allocating every kept tensor before reading any keeps the per-tensor temporaries (the float32 merge, the
    quantizer's chunks) from being allocated between kept tensors, where freeing them would leave holes the
    allocator cannot give back. fp8 targets of `model` (still on the meta device) are switched to fp8 Linears here,
    so the state dict returned holds their fp8 weight and scale.
    """
    targets = {f"{name}.weight": (name, module) for name, module in fp8_target_modules(model)} if fp8 else {}
    state = {}
    for key, info in read_headers(files, flag).items():
        stored = SAFETENSORS_DTYPES[info.dtype]
        kept = dtype if dtype is not None and stored.is_floating_point else stored
        state[key] = torch.empty(info.shape, dtype=FP8_DTYPE if key in targets else kept, device=device)
        if key in targets:
            name, module = targets[key]
            scale = torch.empty(1, dtype=kept, device=device) if fp8.scaled else None
            if scale is not None:
                state[f"{name}.scale_weight"] = scale
            install_fp8_weight(module, state[key].to("meta"), None if scale is None else scale.to("meta"))
    quantize_on = device if fp8 is None or fp8.device is None else torch.device(fp8.device)
    for key, tensor in tqdm(stream_tensors(files, flag), total=len(state), desc="DiT", unit="tensor", leave=False):
        if key in targets:
            kept = dtype or tensor.dtype
            blocks = _row_blocks(key, tensor, kept, quantize_on, transform)
            _, scale = quantize_chunks(blocks, tensor.shape, kept, quantize_on, fp8.scaled, out=state[key])
            if scale is not None:
                state[f"{targets[key][0]}.scale_weight"].copy_(scale)
        else:
            kept, start = state[key], 0
            for block in _row_blocks(key, tensor, kept.dtype, kept.device, transform)():
                kept.view(-1)[start : start + block.numel()].copy_(block)
                start += block.numel()
        if transform is not None:
            transform.done(key)
        del tensor
    if targets:
        logger.info(f"fp8{' scaled' if fp8.scaled else ''}: {len(targets)} Linear weights stored as {FP8_DTYPE}")
    return state


def _row_blocks(
    key: str, weight: torch.Tensor, dtype: torch.dtype, device: torch.device, transform: WeightTransform | None
) -> ChunkSource:
    """The values of `weight` (a view of the mapped file) cast to `dtype` on `device` and transformed, `block_rows`
    rows at a time, the file pages of each block handed back once it is used. The cast and the transform are
    row by row, so the blocks hold the bits of the whole tensor cast and transformed."""

    def blocks():
        if weight.ndim == 0:
            yield weight.to(device, dtype).reshape(-1)
            return
        rows = block_rows(weight.shape)
        for start in range(0, weight.shape[0], rows):
            stored = weight[start : start + rows]
            block = stored.to(device, dtype)
            if transform is not None:
                block = transform.merge_weight(key, block, start)
            yield block.reshape(-1)
            release_mapped_pages(stored)

    return blocks


def save_merged_dit(path: str, weight_transform: WeightTransform, out_path: str, flag: str = "--dit") -> None:
    """Stream the checkpoint at `path` through `weight_transform` into one safetensors file at `out_path`.

    The output is a single-file DiT that `load_packed_model` reads back; one tensor is in memory at a time.
    """
    files, _ = read_dit_config(path, flag)
    layout = [(key, SAFETENSORS_DTYPES[info.dtype], info.shape) for _, key, info in data_order(files, flag)]

    def merged():
        for key, tensor in stream_tensors(files, flag):
            yield key, weight_transform.merge_weight(key, tensor).to("cpu")
            weight_transform.done(key)

    logger.info(f"saving merged DiT to {out_path}")
    write_safetensors_streaming(
        out_path, layout, tqdm(merged(), total=len(layout), desc="merged DiT", leave=False), metadata={"format": "pt"}
    )
