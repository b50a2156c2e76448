"""Generic LoRA network: low-rank adapters on the Linear layers inside chosen block classes of a model.

A `LoRAModule` does not replace the Linear it adapts; it takes over that Linear's `forward` and adds
`up(down(x)) * multiplier * alpha/rank`. The modules live in the `LoRANetwork`, not in the model, so the model's own
state dict never changes. Architecture files (`networks/lora_framepack.py`) choose the target block classes, the
name prefix and the default exclusions; everything else (math, file format, optimizer groups, merging) is here.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from frame_pack.fp8 import block_rows
from utils.safetensors_utils import save_safetensors
from utils.temporary_files import temporary_path

logger = logging.getLogger(__name__)

LORA_PREFIX = "lora_unet"  # every musubi DiT LoRA name starts with it
DOWN_KEY = "lora_down.weight"
UP_KEY = "lora_up.weight"
ALPHA_KEY = "alpha"


def lora_name_for(prefix: str, module_path: str) -> str:
    """`lora_unet` + `transformer_blocks.0.attn.to_q` -> `lora_unet_transformer_blocks_0_attn_to_q`."""
    return f"{prefix}.{module_path}".replace(".", "_")


def find_target_linears(
    root: nn.Module, target_classes: Iterable[str], child_order: Mapping[str, Sequence[str]] | None = None
) -> list[tuple[str, nn.Linear]]:
    """(path, Linear) for every Linear inside a module whose class name is in `target_classes`, in creation order.

    Blocks are visited in `named_modules` order. Inside a block the Linears follow `child_order[block class]` (the
    reference model's registration order, which decides the seeded initialisation order); Linears the order does
    not list come after, in this model's order. Classes are compared by name, as musubi-tuner does.
    """
    targets = set(target_classes)
    found = []
    for block_path, block in root.named_modules():
        cls = block.__class__.__name__
        if cls not in targets:
            continue
        children = [(name, m) for name, m in block.named_modules() if m.__class__.__name__ == "Linear"]
        order = list((child_order or {}).get(cls, ()))
        children.sort(key=lambda c: order.index(c[0]) if c[0] in order else len(order))
        for child_path, module in children:
            found.append((f"{block_path}.{child_path}" if block_path else child_path, module))
    return found


def _compile_patterns(patterns: Sequence[str] | None, what: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns or ():
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"network_args {what}_patterns: {pattern!r} is not a valid regex ({e})") from None
    return compiled


def _alpha_value(alpha) -> float | int | None:
    if isinstance(alpha, torch.Tensor):
        return alpha.detach().float().item()
    return alpha


def check_lora_shapes(weight_shape: Sequence[int], down: torch.Tensor, up: torch.Tensor) -> None:
    """Refuse a down/up pair that cannot be added to a Linear weight of `weight_shape` (out, in)."""
    out_features, in_features = weight_shape
    if down.shape[1] != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a Linear of "
            f"{in_features} -> {out_features} (a LoRA for a different model size?)"
        )


@torch.no_grad()
def merged_weight(
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    multiplier: float,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """W + multiplier * (up @ down) * scale, computed in float32 on `device` (default: W's device).

    The one merge formula of the project. The sum is rounded to `dtype` (default W's dtype) and returned in W's
    dtype on `device`. Each row depends only on its own rows of W and up, so it is computed in blocks of
    `block_rows` rows, in place in the block's float32 product (float addition commutes, and upcasting W to float32
    is exact): the temporaries are one block. The streaming loader merges the same blocks one at a time, which
    gives the same bits.
    """
    if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise RuntimeError("LoRA weights must be merged before fp8 quantization of the DiT")
    check_lora_shapes(weight.shape, down, up)
    device = weight.device if device is None else torch.device(device)
    down = down.to(device, torch.float32)
    result = torch.empty(weight.shape, dtype=weight.dtype, device=device)
    rows = block_rows(weight.shape)
    for start in range(0, weight.shape[0], rows):
        block = up[start : start + rows].to(device, torch.float32) @ down
        block.mul_(multiplier).mul_(scale).add_(weight[start : start + rows].to(device))
        result[start : start + rows] = block.to(dtype or weight.dtype).to(weight.dtype)
    return result


@torch.no_grad()
def merge_into_linear(
    linear: nn.Linear,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    multiplier: float,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """`merged_weight` copied into the Linear's existing weight, which keeps its dtype, device and storage."""
    if hasattr(linear, "scale_weight"):
        raise RuntimeError("LoRA weights must be merged before fp8 quantization of the DiT")
    linear.weight.copy_(merged_weight(linear.weight, down, up, scale, multiplier, dtype, device))


class LoRAModule(nn.Module):
    """Training adapter for one Linear: `lora_down` (rank, in), `lora_up` (out, rank), `alpha` buffer."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Linear,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha=1,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        # Construction order matters for seeded runs: both Linears draw their default init, then down is redrawn.
        self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
        self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        alpha = _alpha_value(alpha)
        alpha = lora_dim if alpha is None or alpha == 0 else alpha
        self.scale = alpha / lora_dim
        self.register_buffer("alpha", torch.tensor(alpha))  # float32, or int64 for an int alpha

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.org_module_ref = [org_module]  # a list, so the Linear is not registered as a child
        self.org_forward = None

    @property
    def org_module(self) -> nn.Linear:
        return self.org_module_ref[0]

    def apply_to(self):
        """Route the Linear's forward through this module."""
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def _lora_out(self, lx: torch.Tensor, scale: float, like: torch.Tensor) -> torch.Tensor:
        return (self.lora_up(lx) * self.multiplier * scale).to(like.dtype)

    def forward(self, x):
        org = self.org_forward(x)
        if self.module_dropout is not None and self.training:
            if torch.rand(1) < self.module_dropout:
                return org

        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)

        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)  # one keep-mask per sample, shared across the sequence
            lx = lx * mask
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))  # as if the rank shrank
        return org + self._lora_out(lx, scale, org)


class LoRAInfModule(LoRAModule):
    """Inference adapter: no dropout, an `enabled` switch, and merging into the adapted weight."""

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1, **kwargs):
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha)
        self.enabled = True

    def merge_to(self, sd: Mapping[str, torch.Tensor], dtype=None, device=None, non_blocking=False):
        """Merge this module's tensors from a file (`sd` keys without the module name) into the Linear."""
        merge_into_linear(self.org_module, sd[DOWN_KEY], sd[UP_KEY], self.scale, self.multiplier, dtype, device)

    def forward(self, x):
        org = self.org_forward(x)
        if not self.enabled:
            return org
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        return org + self._lora_out(lx, self.scale, org)


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as additional-networks indexers compute them.

    Both hash the file serialised with only the `ss_*` metadata (so later user metadata does not change them): the
    model hash is SHA-256 of everything after the header, the legacy hash the first 8 hex digits of SHA-256 of the
    0x10000 bytes at offset 0x100000.
    """
    data = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


class LoRANetwork(nn.Module):
    """LoRA modules for every target Linear of `unet` (text encoders are not supported, as in musubi-tuner)."""

    def __init__(
        self,
        target_replace_modules: Sequence[str],
        prefix: str,
        text_encoders,
        unet: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha=1,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        module_class: type[LoRAModule] = LoRAModule,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, object] | None = None,
        exclude_patterns: Sequence[str] | None = None,
        include_patterns: Sequence[str] | None = None,
        verbose: bool = False,
        child_order: Mapping[str, Sequence[str]] | None = None,
    ):
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.target_replace_modules = list(target_replace_modules)
        self.prefix = prefix
        self.loraplus_lr_ratio = None

        if modules_dim is not None:
            logger.info("create LoRA network from weights")
        else:
            logger.info(f"create LoRA network. base dim (rank): {lora_dim}, alpha: {alpha}")
            logger.info(
                f"neuron dropout: p={dropout}, rank dropout: p={rank_dropout}, module dropout: p={module_dropout}"
            )

        excludes = _compile_patterns(exclude_patterns, "exclude")
        includes = _compile_patterns(include_patterns, "include")

        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        for path, linear in find_target_linears(unet, self.target_replace_modules, child_order):
            excluded = any(p.match(path) for p in excludes)
            if excluded and not any(p.match(path) for p in includes):
                if verbose:
                    logger.info(f"exclude: {path}")
                continue
            name = lora_name_for(prefix, path)
            if modules_dim is not None:
                if name not in modules_dim:
                    continue
                dim, module_alpha = modules_dim[name], (modules_alpha or {}).get(name)
            else:
                dim, module_alpha = lora_dim, alpha
            if not dim:
                continue
            if name in self._modules:
                raise ValueError(f"duplicated LoRA name: {name}")
            lora = module_class(
                name,
                linear,
                multiplier,
                dim,
                module_alpha,
                dropout=dropout,
                rank_dropout=rank_dropout,
                module_dropout=module_dropout,
            )
            self.unet_loras.append(lora)
            self.add_module(name, lora)

        logger.info(f"create LoRA for U-Net/DiT: {len(self.unet_loras)} modules.")
        if verbose:
            for lora in self.unet_loras:
                logger.info(f"\t{lora.lora_name:50} {lora.lora_dim}, {lora.alpha.item()}")

    # ---- trainer hooks ------------------------------------------------------------------------------------------
    def prepare_network(self, args):
        pass

    def set_multiplier(self, multiplier: float):
        self.multiplier = multiplier
        for lora in self.unet_loras:
            lora.multiplier = multiplier

    def set_enabled(self, is_enabled: bool):
        for lora in self.unet_loras:
            lora.enabled = is_enabled

    def apply_to(self, text_encoders, unet, apply_text_encoder: bool = True, apply_unet: bool = True):
        if not apply_unet:
            self.unet_loras = []
        logger.info(f"enable LoRA for U-Net: {len(self.unet_loras)} modules")
        for lora in self.unet_loras:
            lora.apply_to()

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self):
        pass  # the adapters are tiny; the DiT's own checkpointing covers them

    def prepare_grad_etc(self, unet):
        self.requires_grad_(True)

    def on_epoch_start(self, unet):
        self.train()

    def on_step_start(self):
        pass

    def get_trainable_params(self):
        return self.parameters()

    # ---- optimizer ----------------------------------------------------------------------------------------------
    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        logger.info(f"LoRA+ UNet LR Ratio: {loraplus_lr_ratio}")

    def prepare_optimizer_params(self, unet_lr: float | None = 1e-4, **kwargs) -> tuple[list[dict], list[str]]:
        """Param groups and their log names: `unet`, plus `unet plus` (lora_up at lr × ratio) with LoRA+."""
        self.requires_grad_(True)
        ratio = self.loraplus_lr_ratio
        groups: dict[str, list[nn.Parameter]] = {"": [], "plus": []}
        for lora in self.unet_loras:
            for name, param in lora.named_parameters():
                groups["plus" if ratio is not None and "lora_up" in name else ""].append(param)

        params, descriptions = [], []
        for kind, group in groups.items():
            if not group:
                continue
            lr = None if unet_lr is None else (unet_lr * ratio if kind == "plus" else unet_lr)
            if not lr:
                logger.info("NO LR skipping!")
                continue
            params.append({"params": group, "lr": lr})
            descriptions.append("unet" + (f" {kind}" if kind else ""))
        return params, descriptions

    # ---- files --------------------------------------------------------------------------------------------------
    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None):
        """Save `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (cast to `dtype` on CPU), atomically.

        `.safetensors` files get the metadata plus the `sshs_*` hashes; other names are written with torch.save.
        """
        state_dict = {k: v.detach().clone().to("cpu") for k, v in self.state_dict().items()}
        if dtype is not None:
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        if os.path.splitext(file)[1] == ".safetensors":
            metadata = dict(metadata or {})
            metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(state_dict, metadata)
            save_safetensors(state_dict, file, metadata)
        else:
            tmp = temporary_path(file)
            torch.save(state_dict, tmp)
            os.replace(tmp, file)

    def load_weights(self, file: str):
        """Load a saved LoRA non-strictly (shapes must match). The runtime scale follows the loaded alpha."""
        if os.path.splitext(file)[1] == ".safetensors":
            weights_sd = safetensors.torch.load_file(file)
        else:
            weights_sd = torch.load(file, map_location="cpu", weights_only=True)
        info = self.load_state_dict(weights_sd, False)
        for lora in self.unet_loras:
            alpha = weights_sd.get(f"{lora.lora_name}.{ALPHA_KEY}")
            if alpha is not None:
                # musubi-tuner keeps the creation-time scale here (its FIXME); the file's alpha is what it trained.
                lora.alpha = alpha.detach().float().to(lora.alpha.device)
                lora.scale = lora.alpha.item() / lora.lora_dim
        return info

    # ---- regularisation and merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """Scale each module so ||up @ down * scale||_F <= max_norm_value; returns (scaled, mean norm, max norm)."""
        keys_scaled, norms = 0, []
        for lora in self.unet_loras:
            down = lora.lora_down.weight.to(device)
            up = lora.lora_up.weight.to(device)
            updown = (up @ down) * (lora.alpha.to(device) / down.shape[0])
            norm = updown.norm().clamp(min=max_norm_value / 2)
            desired = torch.clamp(norm, max=max_norm_value)
            ratio = desired.cpu() / norm.cpu()
            if ratio != 1:
                keys_scaled += 1
                sqrt_ratio = ratio**0.5
                lora.lora_up.weight.mul_(sqrt_ratio.to(lora.lora_up.weight))
                lora.lora_down.weight.mul_(sqrt_ratio.to(lora.lora_down.weight))
            norms.append((updown.norm() * ratio.to(updown.device)).item())
        return keys_scaled, sum(norms) / len(norms), max(norms)

    def merge_to(self, text_encoders, unet, weights_sd, dtype=None, device=None, non_blocking=False):
        """Merge a file's tensors into the adapted weights; modules without tensors in the file are skipped."""
        for lora in self.unet_loras:
            start = f"{lora.lora_name}."
            sd = {k[len(start) :]: v for k, v in weights_sd.items() if k.startswith(start)}
            if not sd:
                logger.info(f"no weight for {lora.lora_name}")
                continue
            lora.merge_to(sd, dtype, device)
        logger.info("weights are merged")


def parse_pattern_list(value, key: str) -> list[str] | None:
    """network_args list values arrive as Python-literal strings (`['a', 'b']`) or, from a config file, as lists."""
    if value is None:
        return None
    if isinstance(value, str):
        value = ast.literal_eval(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"network_args {key} must be a list of regex strings, got {value!r}")
    return list(value)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


DEFAULT_NETWORK_DIM = 4  # the rank of a training network made without --network_dim

# The --network_args keys the training network reads (as musubi-tuner's LoRA does); conv_dim/conv_alpha are
# accepted and ignored, the DiT's target blocks having no convolutions.
NETWORK_ARG_KEYS = (
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "exclude_patterns",
    "include_patterns",
    "verbose",
    "loraplus_lr_ratio",
)


def create_network(
    target_replace_modules: Sequence[str],
    prefix: str,
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoders,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    child_order: Mapping[str, Sequence[str]] | None = None,
    **kwargs,
) -> LoRANetwork:
    """A training network from `--network_dim/--network_alpha/--network_dropout` and `--network_args` strings."""
    if kwargs.get("conv_dim") is not None:
        logger.info("conv_dim/conv_alpha given, but the DiT has no Conv2d inside the target blocks; ignored")
    network = LoRANetwork(
        target_replace_modules,
        prefix,
        text_encoders,
        unet,
        multiplier=multiplier,
        lora_dim=DEFAULT_NETWORK_DIM if network_dim is None else network_dim,
        alpha=1.0 if network_alpha is None else network_alpha,
        dropout=neuron_dropout,
        rank_dropout=_optional_float(kwargs.get("rank_dropout")),
        module_dropout=_optional_float(kwargs.get("module_dropout")),
        exclude_patterns=parse_pattern_list(kwargs.get("exclude_patterns"), "exclude_patterns"),
        include_patterns=parse_pattern_list(kwargs.get("include_patterns"), "include_patterns"),
        verbose=kwargs.get("verbose") in ("True", True),
        child_order=child_order,
    )
    loraplus_lr_ratio = _optional_float(kwargs.get("loraplus_lr_ratio"))
    if loraplus_lr_ratio is not None:
        network.set_loraplus_lr_ratio(loraplus_lr_ratio)
    return network


def ranks_and_alphas(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Per LoRA name (text before the first `.`): rank = lora_down rows, alpha = the `alpha` tensor."""
    dims, alphas = {}, {}
    for key, value in weights_sd.items():
        if "." not in key:
            continue
        name = key.split(".")[0]
        if ALPHA_KEY in key:
            alphas[name] = value
        elif "lora_down" in key:
            dims[name] = value.shape[0]
    missing = sorted(set(dims) - set(alphas))
    if missing:
        # musubi-tuner fails here; alpha = rank (scale 1) is what a file without alphas means everywhere else.
        logger.warning(f"{len(missing)} LoRA modules have no alpha; using alpha = rank for them (e.g. {missing[0]})")
    return dims, alphas


def create_network_from_weights(
    target_replace_modules: Sequence[str],
    multiplier: float,
    weights_sd: Mapping[str, torch.Tensor],
    text_encoders=None,
    unet: nn.Module | None = None,
    for_inference: bool = False,
    prefix: str = LORA_PREFIX,
    child_order: Mapping[str, Sequence[str]] | None = None,
    **kwargs,
) -> LoRANetwork:
    """A network with modules only for the names in `weights_sd`, each with the file's rank and alpha.

    Weights are not loaded here (they can be merged instead); no include/exclude patterns apply.
    """
    dims, alphas = ranks_and_alphas(weights_sd)
    return LoRANetwork(
        target_replace_modules,
        prefix,
        text_encoders,
        unet,
        multiplier=multiplier,
        modules_dim=dims,
        modules_alpha=alphas,
        module_class=LoRAInfModule if for_inference else LoRAModule,
        child_order=child_order,
    )
