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
diffusers `lora_adapter_metadata` header entry, else alpha = rank (scale 1, as musubi-tuner assumes).
HunyuanVideo block names are renamed to FramePack's, and fused projections are split (`HUNYUAN_TO_FRAMEPACK`).

Export (`to_diffusers`) writes the diffusers/PEFT layout that diffusers' HunyuanVideo/FramePack LoRA loader reads:
`transformer.<module path>.lora_A.weight` / `.lora_B.weight` and no `.alpha` keys (diffusers rejects a file with a
key lacking "lora"). By default alpha/rank is folded into the factors (each multiplied by sqrt(alpha/rank), in
float32) and the `lora_adapter_metadata` header entry says alpha = rank, so a loader that reads only the tensors
(ComfyUI's `load_torch_file`, FramePack-Studio) and one that reads the header (diffusers) apply the same weights.
Our own header entry `lora_folded_alphas` keeps the original alphas so the import divides them out again (exact
for bf16 files, to float32 rounding otherwise). `fold_alpha=False` keeps the tensors untouched and puts the alphas
only in the `lora_adapter_metadata` entry (`transformer.r`, `transformer.lora_alpha`, per-module
`rank_pattern`/`alpha_pattern`): exact, but too strong by rank/alpha in any loader that ignores the header.
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
from utils.cli import UserError, one_line
from utils.safetensors_utils import load_safetensors, save_safetensors

logger = logging.getLogger(__name__)

MUSUBI_FRAMEPACK = "musubi FramePack"
MUSUBI_HUNYUAN = "musubi HunyuanVideo"
DIFFUSION_PIPE_HUNYUAN = "diffusion-pipe HunyuanVideo"
DIFFUSERS_FRAMEPACK = "diffusers/PEFT FramePack"

# `transformer.`: diffusers; `diffusion_model.`: diffusion-pipe; `base_model.model.`: PEFT's own save_pretrained.
PEFT_PREFIXES = ("diffusion_model", "transformer", "base_model.model")
PEFT_KINDS = {"lora_A.weight": DOWN_KEY, "lora_B.weight": UP_KEY, ALPHA_KEY: ALPHA_KEY}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry holding the PEFT LoraConfig kwargs
ALPHA_DTYPE_KEY = "lora_alpha_dtype"  # ours: dtype of the alphas, so the import recreates them exactly
FOLDED_ALPHAS_KEY = "lora_folded_alphas"  # ours: {module path: alpha} folded into the factors of an export
WEIGHT_DTYPE_KEY = "lora_weight_dtype"  # ours: dtype of the factors before a folded export
EXPORT_DTYPE = torch.float32  # folded factors are stored in float32 unless asked otherwise
# Header entries that describe the tensors of one layout; a conversion rewrites them instead of copying them.
OUR_HEADER_KEYS = (ADAPTER_METADATA_KEY, ALPHA_DTYPE_KEY, FOLDED_ALPHAS_KEY, WEIGHT_DTYPE_KEY)
LYCORIS_MARKERS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_blocks", ".dora_scale", ".diff", ".diff_b")

_MUSUBI_KEY = re.compile(
    rf"^{LORA_PREFIX}_(?P<body>[^.]+)\.(?P<kind>{'|'.join(map(re.escape, (DOWN_KEY, UP_KEY, ALPHA_KEY)))})$"
)
_PEFT_KEY = re.compile(
    rf"^(?:(?P<prefix>{'|'.join(map(re.escape, PEFT_PREFIXES))})\.)?(?P<body>.+)"
    rf"\.(?P<kind>{'|'.join(map(re.escape, PEFT_KINDS))})$"
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


# Where a module's alpha was found (ConvertedLora.alpha_sources).
ALPHA_FROM_KEYS = "`.alpha` keys"
ALPHA_FROM_HEADER = f"header {ADAPTER_METADATA_KEY}"
ALPHA_FROM_FOLDED = f"folded into the factors (header {FOLDED_ALPHAS_KEY})"
ALPHA_FROM_NONE = "none stored (alpha = rank)"


class LoraFormatError(UserError, ValueError):
    """A LoRA file whose layout is not one this tool can merge."""


@dataclass
class ConvertedLora:
    """A state dict in musubi FramePack layout, with what was found on the way."""

    state_dict: dict[str, torch.Tensor]
    formats: dict[str, int] = field(default_factory=dict)  # format -> number of source keys
    unrecognized: list[str] = field(default_factory=list)  # source keys that could not be converted
    sources: dict[str, str] = field(default_factory=dict)  # converted key -> the file key it came from
    alpha_sources: dict[str, str] = field(default_factory=dict)  # converted module name -> where its alpha came from

    def source_keys(self, keys) -> list[str]:
        """The file keys behind some converted keys (each once; alphas added here have none)."""
        return list(dict.fromkeys(self.sources[k] for k in keys if k in self.sources))


def load_lora_file(path: str, flag: str = "--lora_weight") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a `.safetensors` LoRA; other extensions are read with torch.load. A file that
    is not what its extension says (text, truncated, a foreign pickle) is refused naming `flag`."""
    if os.path.splitext(str(path))[1] == ".safetensors":
        return load_safetensors(path, flag)  # a WeightFileError for truncated and non-safetensors files
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LoraFormatError(f"{flag} {path}: file not found") from None
    except Exception as e:  # torch raises unpickling, zip and EOF errors of several types for a foreign file
        raise LoraFormatError(f"{flag} {path}: not a LoRA file ({one_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoraFormatError(f"{flag} {path}: not a LoRA file (not a dict of tensors)")
    return state, {}


def _header_dtype(metadata: Mapping[str, str] | None, key: str) -> torch.dtype | None:
    value = getattr(torch, (metadata or {}).get(key, ""), None)
    return value if isinstance(value, torch.dtype) else None


def _unfold(parts: dict, alpha: float, weight_dtype, alpha_dtype) -> dict[str, torch.Tensor]:
    """Divide sqrt(alpha/rank) out of folded factors again and restore the alpha (the inverse of a folded export)."""
    root = math.sqrt(alpha / parts[DOWN_KEY].shape[0])
    down, up = parts[DOWN_KEY], parts[UP_KEY]
    return {
        DOWN_KEY: (down.float() / root).to(weight_dtype or down.dtype),
        UP_KEY: (up.float() / root).to(weight_dtype or up.dtype),
        ALPHA_KEY: torch.tensor(alpha, dtype=alpha_dtype),
    }


def example_keys(keys, n: int = 5) -> str:
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
    unfold: bool = True,
) -> ConvertedLora:
    """Detect the layout of every key and return the musubi FramePack state dict.

    `target_rows` (musubi name -> output rows of the DiT Linear) decides how fused HunyuanVideo up weights are
    split; without it the FramePack proportions are used (q = k = v, MLP = 4 x q). A folded export of ours gets its
    original alphas back (`unfold=False` keeps the folded factors with alpha = rank, as other tools see them).
    Raises LoraFormatError when no key is a LoRA key this tool knows (listing a few) or when the file is a LyCORIS
    one.
    """
    if any(k.endswith(LYCORIS_MARKERS) for k in state_dict):
        raise LoraFormatError(f"{source}: this is a LyCORIS file (LoHa/LoKr/DoRA keys); merge it with --lycoris")
    adapter_alpha = _adapter_alphas(metadata)
    alpha_dtype = _header_dtype(metadata, ALPHA_DTYPE_KEY) or torch.float32
    folded_alphas = json.loads((metadata or {}).get(FOLDED_ALPHAS_KEY) or "{}") if unfold else {}
    weight_dtype = _header_dtype(metadata, WEIGHT_DTYPE_KEY)

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
            peft_path[f"{LORA_PREFIX}_{body}"] = (m["prefix"] or "", m["body"])
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
            f"diffusers/PEFT).{hint} Keys: {example_keys(state_dict.keys())}"
        )
    logger.info(
        f"{source}: detected format "
        + ", ".join(f"{fmt} ({n} keys)" for fmt, n in formats.most_common())
        + (f"; {len(unrecognized)} keys not understood" if unrecognized else "")
    )

    result = ConvertedLora({}, dict(formats), unrecognized)
    alpha_sources: dict[str, str] = {}  # file module name -> source of its alpha
    no_alpha = []
    for name, parts in modules.items():
        split = {}
        if DOWN_KEY in parts and UP_KEY in parts:
            path = peft_path.get(name, ("", None))[1]
            if path in folded_alphas:
                parts = _unfold(parts, float(folded_alphas[path]), weight_dtype, alpha_dtype)
                alpha_sources[name] = ALPHA_FROM_FOLDED
            elif ALPHA_KEY in parts:
                alpha_sources[name] = ALPHA_FROM_KEYS
            else:
                value = adapter_alpha(*peft_path[name]) if name in peft_path else None
                alpha_sources[name] = ALPHA_FROM_NONE if value is None else ALPHA_FROM_HEADER
                if value is None:
                    value = float(parts[DOWN_KEY].shape[0])  # scale 1, as musubi-tuner assumes for lora_A/lora_B files
                    if name not in peft_path:
                        no_alpha.append(name)
                parts[ALPHA_KEY] = torch.tensor(value, dtype=alpha_dtype)
            hunyuan = _HUNYUAN_BODY.match(name[len(LORA_PREFIX) + 1 :])
            split = _split_hunyuan(name, parts, target_rows) if hunyuan else {name: parts}
        if not split:
            unrecognized.extend(origin[name].values())
        for target, target_parts in split.items():
            result.alpha_sources[target] = alpha_sources[name]
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


def _adapter_config(prefix: str, ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """The PEFT LoraConfig kwargs diffusers reads from `lora_adapter_metadata`: the commonest rank and alpha, plus
    per-module patterns for the others."""
    rank0 = Counter(ranks.values()).most_common(1)[0][0]
    alpha0 = Counter(alphas.values()).most_common(1)[0][0]
    return {
        f"{prefix}.r": rank0,
        f"{prefix}.lora_alpha": alpha0,
        f"{prefix}.rank_pattern": {p: r for p, r in ranks.items() if r != rank0},
        f"{prefix}.alpha_pattern": {p: a for p, a in alphas.items() if a != alpha0},
        f"{prefix}.target_modules": sorted(ranks),
    }


def to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = "transformer",
    fold_alpha: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """musubi FramePack state dict -> (diffusers/PEFT tensors, header metadata).

    `fold_alpha` (default): factors times sqrt(alpha/rank), stored in `dtype` (default float32), header alpha =
    rank, original alphas under `lora_folded_alphas`. Otherwise the tensors are copied (cast only when `dtype` is
    given) and the header carries the alphas.
    """
    tensors, ranks, alphas, unknown = {}, {}, {}, []
    alpha_dtypes, weight_dtypes = set(), set()
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
        weight_dtypes.add(str(down.dtype).removeprefix("torch."))
        if fold_alpha:
            root = math.sqrt(alpha / rank)
            down, up = down.float() * root, up.float() * root
            dtype = dtype or EXPORT_DTYPE
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        tensors[f"{prefix}.{path}.lora_A.weight"] = down
        tensors[f"{prefix}.{path}.lora_B.weight"] = up
        ranks[path], alphas[path] = rank, alpha
    if unknown:
        raise LoraFormatError(f"cannot name these modules in the diffusers layout: {example_keys(unknown)}")
    if not tensors:
        raise LoraFormatError("the LoRA has no module to export")

    if fold_alpha:
        config = _adapter_config(prefix, ranks, {p: float(r) for p, r in ranks.items()})
        metadata = {ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True)}
        metadata[FOLDED_ALPHAS_KEY] = json.dumps(alphas, sort_keys=True)
        if len(weight_dtypes) == 1:
            metadata[WEIGHT_DTYPE_KEY] = weight_dtypes.pop()
    else:
        metadata = {ADAPTER_METADATA_KEY: json.dumps(_adapter_config(prefix, ranks, alphas), sort_keys=True)}
    if len(alpha_dtypes) == 1:
        metadata[ALPHA_DTYPE_KEY] = alpha_dtypes.pop()
    return tensors, metadata


def export_lora_file(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    path: str,
    prefix: str = "transformer",
    fold_alpha: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a musubi FramePack state dict as a diffusers/PEFT file (atomically), keeping the user metadata."""
    tensors, extra = to_diffusers(state_dict, prefix=prefix, fold_alpha=fold_alpha, dtype=dtype)
    kept = {k: v for k, v in (metadata or {}).items() if k not in OUR_HEADER_KEYS and not k.startswith("sshs_")}
    save_safetensors(tensors, path, {**kept, **extra})


def ranks_alphas(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """musubi FramePack state dict -> {module name: (rank, alpha)} (alpha = rank where the module has none)."""
    found = {}
    for name, parts in group_by_module(state_dict).items():
        if DOWN_KEY in parts:
            rank = parts[DOWN_KEY].shape[0]
            found[name] = (rank, float(parts[ALPHA_KEY]) if ALPHA_KEY in parts else float(rank))
    return found


def _number(value: float) -> str:
    return f"{value:.6g}"


def describe_scales(ranks_and_alphas: Mapping[str, tuple[int, float]], multiplier: float = 1.0) -> str:
    """`alpha 2 / rank 4 x multiplier 0.7 = 0.35` per distinct (rank, alpha), commonest first, with module counts."""
    groups = Counter(ranks_and_alphas.values()).most_common()
    parts = []
    for (rank, alpha), count in groups[:4]:
        text = f"alpha {_number(alpha)} / rank {rank} x multiplier {_number(multiplier)} = "
        text += _number(alpha / rank * multiplier)
        parts.append(text + (f" ({count} modules)" if len(groups) > 1 else ""))
    if len(groups) > 4:
        parts.append(f"{len(groups) - 4} more (rank, alpha) pairs")
    return "; ".join(parts)
