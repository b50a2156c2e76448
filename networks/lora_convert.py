"""LoRA file formats: detection, conversion to the musubi FramePack layout, and export to diffusers/PEFT.

The merge works on musubi FramePack keys (`lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`, `.lora_up
.weight`, `.alpha`). Every key of a file is classified on its own, so a file is understood even when its first key
is unusual or two layouts are mixed:

| format                       | key example                                                        |
|------------------------------|--------------------------------------------------------------------|
| musubi FramePack             | `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`        |
| musubi HunyuanVideo          | `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`          |
| diffusion-pipe HunyuanVideo  | `diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight`       |
| diffusers/PEFT FramePack     | `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`         |

`lora_A`/`lora_B` become `lora_down`/`lora_up`. Their alpha comes from a `.alpha` key (ComfyUI style), else from the
diffusers `lora_adapter_metadata` header entry, else alpha = rank (scale 1, as the reference assumes).
HunyuanVideo block names are renamed to FramePack's, and fused projections are split (`HUNYUAN_TO_FRAMEPACK`).

Export (`to_diffusers`) writes the diffusers/PEFT layout that diffusers' HunyuanVideo/FramePack LoRA loader reads:
`transformer.<module path>.lora_A.weight` / `.lora_B.weight` and no `.alpha` keys (diffusers rejects a file with a
key lacking "lora"). The alphas go into the `lora_adapter_metadata` header entry (`transformer.r`,
`transformer.lora_alpha`, per-module `rank_pattern`/`alpha_pattern`), which diffusers turns into the PEFT
LoraConfig, so the tensors stay untouched and the round trip is exact. Loaders that ignore that header apply scale
1; for them `fold_alpha=True` multiplies down and up by sqrt(alpha/rank) instead (what musubi's `convert_lora.py
--target other` does; the product is kept, the tensors are not bit-identical on the way back).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from networks.lora import ALPHA_KEY, DOWN_KEY, LORA_PREFIX, UP_KEY
from networks.lora_framepack import module_path
from utils.checkpoint_kinds import identify_checkpoint
from utils.safetensors_utils import load_state_dict, read_header

logger = logging.getLogger(__name__)

MUSUBI_FRAMEPACK = "musubi FramePack"
MUSUBI_HUNYUAN = "musubi HunyuanVideo"
DIFFUSION_PIPE_HUNYUAN = "diffusion-pipe HunyuanVideo"
DIFFUSERS_FRAMEPACK = "diffusers/PEFT FramePack"

PEFT_PREFIXES = ("diffusion_model", "transformer")
PEFT_KINDS = {"lora_A.weight": DOWN_KEY, "lora_B.weight": UP_KEY, ALPHA_KEY: ALPHA_KEY}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry holding the PEFT LoraConfig kwargs
ALPHA_DTYPE_KEY = "lora_alpha_dtype"  # ours: dtype of the alphas, so the import recreates them exactly
LYCORIS_MARKERS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_blocks", ".dora_scale", ".diff", ".diff_b")

_MUSUBI_KEY = re.compile(
    rf"^{LORA_PREFIX}_(?P<body>[^.]+)\.(?P<kind>{'|'.join(map(re.escape, (DOWN_KEY, UP_KEY, ALPHA_KEY)))})$"
)
_PEFT_KEY = re.compile(
    rf"^(?P<prefix>{'|'.join(PEFT_PREFIXES)})\.(?P<body>.+)\.(?P<kind>{'|'.join(map(re.escape, PEFT_KINDS))})$"
)
_HUNYUAN_BODY = re.compile(r"^(?P<list>double_blocks|single_blocks)_(?P<index>\d+)_(?P<child>.+)$")
# (key style, HunyuanVideo block names?) -> format
_FORMATS = {
    ("musubi", False): MUSUBI_FRAMEPACK,
    ("musubi", True): MUSUBI_HUNYUAN,
    ("peft", False): DIFFUSERS_FRAMEPACK,
    ("peft", True): DIFFUSION_PIPE_HUNYUAN,
}

# HunyuanVideo block -> FramePack block, and each HunyuanVideo Linear -> the FramePack Linear(s) it becomes, with the
# relative row counts of a fused up weight. Full size: QKV up 9216 = 3 x 3072 rows; single-block linear1 up
# 21504 = 3 x 3072 (q, k, v) + 12288 (MLP). Down weights and alphas are shared by all parts of a split.
HUNYUAN_TO_FRAMEPACK = {
    "double_blocks": (
        "transformer_blocks",
        {
            "img_mod_linear": (("norm1_linear", 1),),
            "img_attn_qkv": (("attn_to_q", 1), ("attn_to_k", 1), ("attn_to_v", 1)),
            "img_attn_proj": (("attn_to_out_0", 1),),
            "img_mlp_fc1": (("ff_net_0_proj", 1),),
            "img_mlp_fc2": (("ff_net_2", 1),),
            "txt_mod_linear": (("norm1_context_linear", 1),),
            "txt_attn_qkv": (("attn_add_q_proj", 1), ("attn_add_k_proj", 1), ("attn_add_v_proj", 1)),
            "txt_attn_proj": (("attn_to_add_out", 1),),
            "txt_mlp_fc1": (("ff_context_net_0_proj", 1),),
            "txt_mlp_fc2": (("ff_context_net_2", 1),),
        },
    ),
    "single_blocks": (
        "single_transformer_blocks",
        {
            "linear1": (("attn_to_q", 1), ("attn_to_k", 1), ("attn_to_v", 1), ("proj_mlp", 4)),
            "linear2": (("proj_out", 1),),
            "modulation_linear": (("norm_linear", 1),),
        },
    ),
}


class LoraFormatError(ValueError):
    """A LoRA file whose layout is not one this tool can merge."""


@dataclass
class ConvertedLora:
    """A state dict in musubi FramePack layout, with what was found on the way."""

    state_dict: dict[str, torch.Tensor]
    formats: dict[str, int] = field(default_factory=dict)  # format -> number of source keys
    unrecognized: list[str] = field(default_factory=list)  # source keys that could not be converted
    sources: dict[str, str] = field(default_factory=dict)  # converted key -> the file key it came from

    def source_keys(self, keys) -> list[str]:
        """The file keys behind some converted keys (each once; alphas added here have none)."""
        return list(dict.fromkeys(self.sources[k] for k in keys if k in self.sources))


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a `.safetensors` LoRA; other extensions are read with torch.load."""
    if os.path.splitext(str(path))[1] == ".safetensors":
        return load_state_dict(str(path)), read_header(path, "--lora_weight")[1]
    return torch.load(path, map_location="cpu", weights_only=True), {}


def _example_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _adapter_alphas(metadata: Mapping[str, str] | None) -> Callable[[str, str], float | None]:
    """Alpha lookup (PEFT prefix, module path) -> alpha from diffusers' `lora_adapter_metadata`, or None."""
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    config = json.loads(raw) if raw else {}

    def alpha(prefix: str, path: str) -> float | None:
        cfg = {k[len(prefix) + 1 :]: v for k, v in config.items() if k.startswith(f"{prefix}.")} or config
        if "lora_alpha" not in cfg:
            return None
        value = cfg["lora_alpha"]
        for pattern, v in (cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?({pattern})", path):  # PEFT's rule: the pattern matches a path suffix
                value = v
        return float(value)

    return alpha


def _split_hunyuan(name: str, parts: dict[str, torch.Tensor], target_rows) -> dict[str, dict[str, torch.Tensor]]:
    """One HunyuanVideo module -> FramePack modules (musubi names); a fused up weight is split by rows."""
    m = _HUNYUAN_BODY.match(name[len(LORA_PREFIX) + 1 :])
    block_list, children = HUNYUAN_TO_FRAMEPACK[m["list"]]
    targets = children.get(m["child"])
    if targets is None:
        return {}
    names = [f"{LORA_PREFIX}_{block_list}_{m['index']}_{child}" for child, _ in targets]
    if len(names) == 1:
        return {names[0]: parts}

    up = parts[UP_KEY]
    if target_rows is not None and all(n in target_rows for n in names):
        rows = [target_rows[n] for n in names]
        expected = str(sum(rows))
    else:
        unit = up.shape[0] // sum(share for _, share in targets)
        rows = [unit * share for _, share in targets]
        expected = f"a multiple of {sum(share for _, share in targets)}"
    if sum(rows) != up.shape[0]:
        raise LoraFormatError(
            f"HunyuanVideo LoRA module {name}: its up weight has {up.shape[0]} rows, but splitting it into "
            f"{', '.join(names)} needs {expected} (a LoRA for a different model size?)"
        )
    converted, start = {}, 0
    for target, n in zip(names, rows):
        converted[target] = {DOWN_KEY: parts[DOWN_KEY].clone(), UP_KEY: up[start : start + n].clone()}
        converted[target][ALPHA_KEY] = parts[ALPHA_KEY].clone()
        start += n
    return converted


def convert_to_framepack(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    target_rows: Mapping[str, int] | None = None,
    source: str = "LoRA",
) -> ConvertedLora:
    """Detect the layout of every key and return the musubi FramePack state dict.

    `target_rows` (musubi name -> output rows of the DiT Linear) decides how fused HunyuanVideo up weights are
    split; without it the FramePack proportions are used (q = k = v, MLP = 4 x q). Raises LoraFormatError when no
    key is a LoRA key this tool knows (listing a few) or when the file is a LyCORIS one.
    """
    if any(k.endswith(LYCORIS_MARKERS) for k in state_dict):
        raise LoraFormatError(f"{source}: this is a LyCORIS file (LoHa/LoKr/DoRA keys); merge it with --lycoris")
    adapter_alpha = _adapter_alphas(metadata)
    alpha_dtype = getattr(torch, (metadata or {}).get(ALPHA_DTYPE_KEY, ""), torch.float32)
    alpha_dtype = alpha_dtype if isinstance(alpha_dtype, torch.dtype) else torch.float32

    formats: Counter[str] = Counter()
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    origin: dict[str, dict[str, str]] = defaultdict(dict)  # musubi name -> kind -> file key
    peft_path: dict[str, tuple[str, str]] = {}  # musubi name -> (PEFT prefix, dotted module path)
    unrecognized = []
    for key, tensor in state_dict.items():
        if m := _MUSUBI_KEY.match(key):
            style, body, kind = "musubi", m["body"], m["kind"]
        elif m := _PEFT_KEY.match(key):
            style, body, kind = "peft", m["body"].replace(".", "_"), PEFT_KINDS[m["kind"]]
            peft_path[f"{LORA_PREFIX}_{body}"] = (m["prefix"], m["body"])
        else:
            unrecognized.append(key)
            continue
        formats[_FORMATS[style, _HUNYUAN_BODY.match(body) is not None]] += 1
        modules[f"{LORA_PREFIX}_{body}"][kind] = tensor
        origin[f"{LORA_PREFIX}_{body}"][kind] = key

    if not modules:
        what = identify_checkpoint(state_dict.keys())
        hint = f" It looks like {what}." if what and "LoRA" not in what else ""
        raise LoraFormatError(
            f"{source}: no key is in a LoRA layout this tool knows (musubi lora_unet_*, HunyuanVideo, diffusion-pipe, "
            f"diffusers/PEFT).{hint} Keys: {_example_keys(state_dict.keys())}"
        )
    logger.info(
        f"{source}: detected format "
        + ", ".join(f"{fmt} ({n} keys)" for fmt, n in formats.most_common())
        + (f"; {len(unrecognized)} keys not understood" if unrecognized else "")
    )

    result = ConvertedLora({}, dict(formats), unrecognized)
    no_alpha = []
    for name, parts in modules.items():
        split = {}
        if DOWN_KEY in parts and UP_KEY in parts:
            if ALPHA_KEY not in parts:
                value = adapter_alpha(*peft_path[name]) if name in peft_path else None
                if value is None:
                    value = float(parts[DOWN_KEY].shape[0])  # scale 1, as the reference assumes for lora_A/lora_B files
                    if name not in peft_path:
                        no_alpha.append(name)
                parts[ALPHA_KEY] = torch.tensor(value, dtype=alpha_dtype)
            hunyuan = _HUNYUAN_BODY.match(name[len(LORA_PREFIX) + 1 :])
            split = _split_hunyuan(name, parts, target_rows) if hunyuan else {name: parts}
        if not split:
            unrecognized.extend(origin[name].values())
        for target, target_parts in split.items():
            for kind, tensor in target_parts.items():
                result.state_dict[f"{target}.{kind}"] = tensor
                if kind in origin[name]:
                    result.sources[f"{target}.{kind}"] = origin[name][kind]
    if no_alpha:
        logger.warning(f"{source}: {len(no_alpha)} modules have no alpha; using alpha = rank (e.g. {no_alpha[0]})")
    return result


def group_by_module(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{name.kind: tensor}` -> `{name: {kind: tensor}}` (kind = `lora_down.weight`, `lora_up.weight`, `alpha`)."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state_dict.items():
        name, _, kind = key.partition(".")
        modules[name][kind] = tensor
    return modules


def to_diffusers(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "transformer", fold_alpha: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """musubi FramePack state dict -> (diffusers/PEFT tensors, header metadata carrying the alphas)."""
    tensors, ranks, alphas, unknown = {}, {}, {}, []
    alpha_dtypes = set()
    for name, parts in group_by_module(state_dict).items():
        path = module_path(name)
        if path is None or DOWN_KEY not in parts or UP_KEY not in parts:
            unknown.append(name)
            continue
        down, up = parts[DOWN_KEY], parts[UP_KEY]
        rank = down.shape[0]
        alpha = parts[ALPHA_KEY].item() if ALPHA_KEY in parts else rank
        if ALPHA_KEY in parts:
            alpha_dtypes.add(str(parts[ALPHA_KEY].dtype).removeprefix("torch."))
        if fold_alpha:
            root = math.sqrt(alpha / rank)
            down, up = (down.float() * root).to(down.dtype), (up.float() * root).to(up.dtype)
        tensors[f"{prefix}.{path}.lora_A.weight"] = down
        tensors[f"{prefix}.{path}.lora_B.weight"] = up
        ranks[path], alphas[path] = rank, alpha
    if unknown:
        raise LoraFormatError(f"cannot name these modules in the diffusers layout: {_example_keys(unknown)}")
    if fold_alpha:
        return tensors, {}

    rank0 = Counter(ranks.values()).most_common(1)[0][0]
    alpha0 = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        f"{prefix}.r": rank0,
        f"{prefix}.lora_alpha": alpha0,
        f"{prefix}.rank_pattern": {p: r for p, r in ranks.items() if r != rank0},
        f"{prefix}.alpha_pattern": {p: a for p, a in alphas.items() if a != alpha0},
        f"{prefix}.target_modules": sorted(ranks),
    }
    metadata = {ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True)}
    if len(alpha_dtypes) == 1:
        metadata[ALPHA_DTYPE_KEY] = alpha_dtypes.pop()
    return tensors, metadata
