"""What a LoRA file holds and at what strength other FramePack tools will apply it (`convert_lora.py --inspect`).

The verdicts follow how each tool reads a file:
- diffusers (`HunyuanVideoFramepackPipeline.load_lora_weights`): PEFT keys under `transformer.` only; it refuses a
  file with any key lacking "lora" (so `.alpha` keys), reads alpha/rank from the `lora_adapter_metadata` header
  (alpha = rank without it), and ignores musubi `lora_unet_*` keys with only a "No LoRA keys" warning.
- Kijai's ComfyUI-FramePackWrapper: reads the tensors only (ComfyUI's `load_torch_file`), so PEFT keys get scale 1.
  It converts musubi keys itself (scaling by their `.alpha`) when the file holds
  `lora_unet_single_transformer_blocks_0_attn_to_k`; its converter turns `_` into `.`, so `norm1_context_linear`
  becomes `norm1.context.linear` and those modules are dropped with an "unexpected keys" warning.
- FramePack-Studio (`diffusers_helper/lora_utils.py`): tensors only as well (diffusers' `_fetch_state_dict`), so
  scale 1; a musubi file raises IndexError in PEFT's `get_peft_kwargs`. It pins diffusers 0.33.1 / peft 0.15.2 and
  breaks with diffusers >= 0.42, where `_fetch_state_dict` returns a tuple.
ComfyUI core cannot load a FramePack DiT at all, so ComfyUI users go through Kijai's wrapper.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from networks.lora import DOWN_KEY, LORA_PREFIX, UP_KEY
from networks.lora_convert import (
    ADAPTER_METADATA_KEY,
    DIFFUSERS_FRAMEPACK,
    FOLDED_ALPHAS_KEY,
    MUSUBI_FRAMEPACK,
    PEFT_PREFIXES,
    convert_to_framepack,
    describe_scales,
    load_lora_file,
    ranks_alphas,
)
from networks.lora_framepack import BLOCK_LISTS

KIJAI_DETECTION_KEY = f"{LORA_PREFIX}_single_transformer_blocks_0_attn_to_k.{UP_KEY}"
KIJAI_DROPPED_CHILD = "norm1_context_linear"  # `_` -> `.` gives norm1.context.linear, which no module has
BLOCK_KINDS = {"transformer_blocks": "double-stream blocks", "single_transformer_blocks": "single-stream blocks"}
_BLOCK = re.compile(rf"^{LORA_PREFIX}_({'|'.join(BLOCK_LISTS)})_\d+_(.+)$")
OTHER_BLOCKS = "outside the FramePack blocks"
ADALN_MODULES = "of which AdaLN modulation Linears"
ADALN_CHILDREN = ("norm1_linear", "norm1_context_linear", "norm_linear")
SCALE_TOLERANCE = 1e-6

TOOLS = ("diffusers", "Kijai ComfyUI-FramePackWrapper", "FramePack-Studio")
YES, NO, PARTLY, NOT_ASSESSED = "yes", "no", "partly", "not assessed"
CONVERT_HINT = "export with `convert_lora.py --target other`"


@dataclass
class LoraFileInfo:
    """A LoRA file as other tools see it (alphas as stored, folded factors not divided back)."""

    path: str
    formats: dict[str, int]
    scales: dict[str, tuple[int, float]]  # musubi module name -> (rank, alpha) that applies to the stored factors
    alpha_sources: dict[str, str]  # module name -> where its alpha came from
    tensor_dtypes: dict[str, int]  # dtype of the lora_A/B (down/up) tensors -> count
    block_counts: dict[str, int]
    unrecognized: list[str]
    keys: list[str]
    metadata: dict[str, str]
    folded_alphas: dict[str, float] = field(default_factory=dict)  # module path -> original alpha (our exports)

    @property
    def main_format(self) -> str:
        return max(self.formats, key=self.formats.get)

    @property
    def scale_one(self) -> bool:
        """Every module is meant to be applied at alpha/rank = 1, which is what tensors-only loaders do."""
        return all(abs(alpha / rank - 1) <= SCALE_TOLERANCE for rank, alpha in self.scales.values())

    def peft_prefixes(self) -> set[str]:
        prefixes = set()
        for key in self.keys:
            if ".lora_A." in key or ".lora_B." in key or (key.endswith(".alpha") and not key.startswith(LORA_PREFIX)):
                prefixes.add(next((p for p in PEFT_PREFIXES if key.startswith(f"{p}.")), ""))
        return prefixes


def inspect_lora_file(path: str, flag: str = "--inspect") -> LoraFileInfo:
    state_dict, metadata = load_lora_file(path, flag)
    converted = convert_to_framepack(state_dict, metadata, source=path, unfold=False)
    scales = ranks_alphas(converted.state_dict)
    blocks = dict.fromkeys([*BLOCK_KINDS.values(), OTHER_BLOCKS, ADALN_MODULES], 0)
    for name in scales:
        m = _BLOCK.match(name)
        blocks[BLOCK_KINDS[m[1]] if m else OTHER_BLOCKS] += 1
        if m and m[2] in ADALN_CHILDREN:
            blocks[ADALN_MODULES] += 1
    dtypes = Counter(
        str(t.dtype).removeprefix("torch.")
        for k, t in state_dict.items()
        if any(part in k for part in (".lora_A.", ".lora_B.", DOWN_KEY, UP_KEY))
    )
    folded = {p: float(a) for p, a in json.loads(metadata.get(FOLDED_ALPHAS_KEY) or "{}").items()}
    return LoraFileInfo(
        path=str(path),
        formats=converted.formats,
        scales=scales,
        alpha_sources=converted.alpha_sources,
        tensor_dtypes=dict(dtypes),
        block_counts={k: n for k, n in blocks.items() if n},
        unrecognized=converted.unrecognized,
        keys=list(state_dict),
        metadata=metadata,
        folded_alphas=folded,
    )


def _tensors_only_verdict(info: LoraFileInfo) -> tuple[str, str]:
    """PEFT keys read without the header: every module gets scale 1."""
    if info.scale_one:
        return YES, "it applies scale 1 and the factors are meant for scale 1"
    (rank, alpha), _ = Counter(info.scales.values()).most_common(1)[0]
    factor = rank / alpha
    return NO, (
        f"it reads only the tensors and applies scale 1 instead of alpha/rank = {alpha / rank:.6g}: "
        f"{factor:.6g}x too {'strong' if factor > 1 else 'weak'}; export with `convert_lora.py --target other` "
        "(alpha folded into the factors)"
    )


def tool_verdicts(info: LoraFileInfo) -> list[tuple[str, str, str]]:
    """(tool, yes/no/partly/not assessed, why) for diffusers, Kijai's wrapper and FramePack-Studio."""
    fmt = info.main_format
    if fmt == MUSUBI_FRAMEPACK:
        kijai_dropped = sum(1 for n in info.scales if n.endswith(f"_{KIJAI_DROPPED_CHILD}"))
        if not any(k == KIJAI_DETECTION_KEY for k in info.keys):
            kijai = (NO, f"it converts musubi keys only when the file holds {KIJAI_DETECTION_KEY}; {CONVERT_HINT}")
        elif kijai_dropped:
            kijai = (
                PARTLY,
                f"strength right, but its `_` -> `.` renaming drops the {kijai_dropped} {KIJAI_DROPPED_CHILD} "
                f"modules (norm1.context.linear: 'unexpected keys'); {CONVERT_HINT}",
            )
        else:
            kijai = (YES, "it converts lora_unet_* keys itself and scales them by their alpha")
        return [
            ("diffusers", NO, f"lora_unet_* keys are ignored with only a 'No LoRA keys' warning; {CONVERT_HINT}"),
            ("Kijai ComfyUI-FramePackWrapper", *kijai),
            ("FramePack-Studio", NO, f"raises IndexError in PEFT's get_peft_kwargs; {CONVERT_HINT}"),
        ]
    if fmt != DIFFUSERS_FRAMEPACK:
        why = f"{fmt} files were not checked against this tool; {CONVERT_HINT}"
        return [(tool, NOT_ASSESSED, why) for tool in TOOLS]

    prefixes = info.peft_prefixes()
    alpha_keys = any(k.endswith(".alpha") and not k.startswith(LORA_PREFIX) for k in info.keys)
    if alpha_keys:
        diffusers = (NO, f"refused: every key must contain 'lora' and the .alpha keys do not; {CONVERT_HINT}")
    elif prefixes != {"transformer"}:
        diffusers = (NO, f"it loads only keys under transformer. (here: {sorted(prefixes)}); use --prefix transformer")
    elif ADAPTER_METADATA_KEY in info.metadata:
        diffusers = (YES, f"it reads alpha/rank from the {ADAPTER_METADATA_KEY} header")
    else:
        diffusers = (YES, "no alphas stored: alpha = rank, scale 1, as diffusers assumes")
    tensors_only = _tensors_only_verdict(info)
    if alpha_keys and tensors_only[0] == NO:
        tensors_only = (NO, tensors_only[1].replace("it reads only the tensors", "it ignores the .alpha keys"))
    if not prefixes <= {"transformer", "diffusion_model"}:
        tensors_only = (NOT_ASSESSED, f"key prefixes {sorted(prefixes)} not checked; use --prefix transformer")
    studio_note = " (with its pinned diffusers 0.33.1; it breaks with diffusers >= 0.42)"
    return [
        ("diffusers", *diffusers),
        ("Kijai ComfyUI-FramePackWrapper", *tensors_only),
        ("FramePack-Studio", tensors_only[0], tensors_only[1] + studio_note),
    ]


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.items())


def format_report(info: LoraFileInfo, multiplier: float = 1.0) -> str:
    ranks = Counter(rank for rank, _ in info.scales.values())
    alphas = Counter(alpha for _, alpha in info.scales.values())
    lines = [
        f"file:            {info.path} ({os.path.getsize(info.path)} bytes)",
        f"format:          {_counts(info.formats)} (keys)",
        f"modules:         {len(info.scales)} ({_counts(info.block_counts)})",
        f"rank:            {', '.join(f'{r} ({n} modules)' if len(ranks) > 1 else str(r) for r, n in ranks.items())}",
        "alpha:           "
        + ", ".join(f"{a:.6g} ({n} modules)" if len(alphas) > 1 else f"{a:.6g}" for a, n in alphas.items())
        + f"  [from {', '.join(sorted(set(info.alpha_sources.values())))}]",
    ]
    for key in ("ss_network_dim", "ss_network_alpha"):
        if key in info.metadata:
            lines.append(f"header {key}: {info.metadata[key]}")
    lines.append(f"effective scale: {describe_scales(info.scales, multiplier)}")
    if info.folded_alphas:
        original = Counter(info.folded_alphas.values()).most_common(1)[0][0]
        lines.append(
            f"folded:          yes: the factors already hold alpha/rank (original alpha {original:.6g}); "
            "our tools divide it back out on import"
        )
    lines.append(f"dtype:           {_counts(info.tensor_dtypes)} (tensors)")
    if info.unrecognized:
        lines.append(f"not understood:  {len(info.unrecognized)} keys, e.g. {', '.join(info.unrecognized[:3])}")
    lines.append("loads at the intended strength in:")
    for tool, verdict, why in tool_verdicts(info):
        lines.append(f"  {tool + ':':<32} {verdict:<4} - {why}")
    return "\n".join(lines)
