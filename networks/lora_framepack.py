"""`--network_module networks.lora_framepack`: LoRA on the FramePack DiT's double- and single-stream blocks.

Targets every Linear inside the blocks except, by default, the AdaLN modulation Linears (`norm1.linear`,
`norm1_context.linear`, single-block `norm.linear`): the pattern `.*(norm).*` is always appended to the user's
`exclude_patterns`. Names follow musubi-tuner exactly: `lora_unet_` + module path with `.` -> `_`, e.g.
`lora_unet_transformer_blocks_0_attn_to_q`, `lora_unet_single_transformer_blocks_3_proj_mlp`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from networks import lora
from networks.lora import LORA_PREFIX

# The block classes of our model; musubi-tuner calls them HunyuanVideoTransformerBlock and
# HunyuanVideoSingleTransformerBlock (same modules, same paths).
FRAMEPACK_TARGET_REPLACE_MODULES = ["DoubleStreamBlock", "SingleStreamBlock"]
DEFAULT_EXCLUDE_PATTERN = r".*(norm).*"

# Every Linear of each target block, in musubi-tuner's model's registration order: this order decides the order in
# which LoRA modules are created, hence which random draws initialise which module in a seeded run.
BLOCK_LINEARS = {
    "DoubleStreamBlock": (
        "norm1.linear",
        "norm1_context.linear",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.add_q_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ),
    "SingleStreamBlock": ("attn.to_q", "attn.to_k", "attn.to_v", "norm.linear", "proj_mlp", "proj_out"),
}
# Where the blocks sit in the DiT: module list name -> block class.
BLOCK_LISTS = {"transformer_blocks": "DoubleStreamBlock", "single_transformer_blocks": "SingleStreamBlock"}

_NAME = re.compile(rf"^{LORA_PREFIX}_(?P<list>{'|'.join(BLOCK_LISTS)})_(?P<index>\d+)_(?P<child>.+)$")


def module_path(lora_name: str) -> str | None:
    """`lora_unet_transformer_blocks_0_attn_to_out_0` -> `transformer_blocks.0.attn.to_out.0` (None if unknown)."""
    m = _NAME.match(lora_name)
    if m is None:
        return None
    children = {c.replace(".", "_"): c for c in BLOCK_LINEARS[BLOCK_LISTS[m["list"]]]}
    child = children.get(m["child"])
    return None if child is None else f"{m['list']}.{m['index']}.{child}"


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """LoRA name -> Linear for every Linear inside the target blocks (norm ones included), in creation order."""
    found = lora.find_target_linears(model, FRAMEPACK_TARGET_REPLACE_MODULES, BLOCK_LINEARS)
    return {lora.lora_name_for(LORA_PREFIX, path): linear for path, linear in found}


def create_arch_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoders: list[nn.Module] | None,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs,
) -> lora.LoRANetwork:
    """The training network (`fpack_train_network.py` passes `--network_args` as string kwargs)."""
    exclude_patterns = lora.parse_pattern_list(kwargs.get("exclude_patterns"), "exclude_patterns") or []
    kwargs["exclude_patterns"] = [*exclude_patterns, DEFAULT_EXCLUDE_PATTERN]
    return lora.create_network(
        FRAMEPACK_TARGET_REPLACE_MODULES,
        LORA_PREFIX,
        multiplier,
        network_dim,
        network_alpha,
        vae,
        text_encoders,
        unet,
        neuron_dropout=neuron_dropout,
        child_order=BLOCK_LINEARS,
        **kwargs,
    )


def create_arch_network_from_weights(
    multiplier: float,
    weights_sd: Mapping[str, torch.Tensor],
    text_encoders: list[nn.Module] | None = None,
    unet: nn.Module | None = None,
    for_inference: bool = False,
    **kwargs,
) -> lora.LoRANetwork:
    """A network shaped like a saved file (musubi FramePack keys): its modules, ranks and alphas."""
    return lora.create_network_from_weights(
        FRAMEPACK_TARGET_REPLACE_MODULES,
        multiplier,
        weights_sd,
        text_encoders,
        unet,
        for_inference,
        prefix=LORA_PREFIX,
        child_order=BLOCK_LINEARS,
        **kwargs,
    )


create_network_from_weights = create_arch_network_from_weights
