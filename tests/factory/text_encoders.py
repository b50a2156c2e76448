"""Tiny seeded text encoders written in every published layout.

Key names are spelled out here from the real checkpoints (not taken from the loader under test):
* LLaMA (HF split files): `embed_tokens.weight`, `layers.N.self_attn.{q,k,v,o}_proj.weight`,
  `layers.N.mlp.{gate,up,down}_proj.weight`, `layers.N.{input,post_attention}_layernorm.weight`, `norm.weight`;
  the Comfy-Org single file prefixes them with `model.` and also carries `lm_head.weight` and a `tokenizer` blob.
* CLIP-L text (transformers 4.x names): `text_model.embeddings.{token,position}_embedding.weight`,
  `text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj,layer_norm1,layer_norm2,mlp.fc1,mlp.fc2}.{weight,bias}`,
  `text_model.final_layer_norm.{weight,bias}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hunyuan_model.text_encoder import CLIP_HEAD_DIM, LLAMA_HEAD_DIM
from hunyuan_model.text_encoder import CLIP_MAX_LENGTH as CLIP_POSITIONS
from tests.factory import dims
from tests.factory.tokenizers import (
    LLAMA_VOCAB,
    clip_vocab_size,
    make_clip_tokenizer,
    make_llama_tokenizer,
    write_json,
)
from utils.safetensors_utils import save_safetensors, save_sharded

LLAMA_SHARDS = 4


def seeded_tensor(shape, generator: torch.Generator, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """'norm' → around 1, 'bias' → small, 'embed' → unit scale, 'linear' → 1/sqrt(fan_in) (healthy activations)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    scale = {"norm": 0.1, "bias": 0.02, "embed": 1.0}.get(kind, shape[-1] ** -0.5 if len(shape) > 1 else 0.02)
    x = x * scale + (1.0 if kind == "norm" else 0.0)
    return x.to(dtype)


def seeded_state_dict(
    spec: dict[str, tuple[tuple[int, ...], str]], seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: seeded_tensor(shape, generator, kind, dtype) for name, (shape, kind) in spec.items()}


def llama_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """HF split-file key names (no prefix), tiny sizes from dims.py."""
    h, i = dims.LLAMA_HIDDEN, dims.LLAMA_INTERMEDIATE
    q_rows, kv_rows = h, dims.LLAMA_KV_HEADS * LLAMA_HEAD_DIM
    spec = {"embed_tokens.weight": ((LLAMA_VOCAB, h), "embed")}
    for n in range(dims.LLAMA_LAYERS):
        p = f"layers.{n}."
        spec.update(
            {
                p + "self_attn.q_proj.weight": ((q_rows, h), "linear"),
                p + "self_attn.k_proj.weight": ((kv_rows, h), "linear"),
                p + "self_attn.v_proj.weight": ((kv_rows, h), "linear"),
                p + "self_attn.o_proj.weight": ((h, q_rows), "linear"),
                p + "mlp.gate_proj.weight": ((i, h), "linear"),
                p + "mlp.up_proj.weight": ((i, h), "linear"),
                p + "mlp.down_proj.weight": ((h, i), "linear"),
                p + "input_layernorm.weight": ((h,), "norm"),
                p + "post_attention_layernorm.weight": ((h,), "norm"),
            }
        )
    spec["norm.weight"] = ((h,), "norm")
    return seeded_state_dict(spec, seed, dtype)


def llama_config_json() -> dict:
    """config.json as the community snapshot's text_encoder/ has it (transformers 4.46 style), tiny sizes."""
    return {
        "architectures": ["LlamaModel"],
        "model_type": "llama",
        "hidden_size": dims.LLAMA_HIDDEN,
        "intermediate_size": dims.LLAMA_INTERMEDIATE,
        "num_hidden_layers": dims.LLAMA_LAYERS,
        "num_attention_heads": dims.LLAMA_HIDDEN // LLAMA_HEAD_DIM,
        "num_key_value_heads": dims.LLAMA_KV_HEADS,
        "head_dim": LLAMA_HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": LLAMA_VOCAB,
        "torch_dtype": "float16",
    }


def encoder_layer_specs(prefix: str, layers: int, h: int, i: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, kind) of HF CLIP-style encoder layers (CLIP text and SigLIP vision share this layout)."""
    spec = {}
    for n in range(layers):
        p = f"{prefix}.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            spec[f"{p}self_attn.{proj}.weight"] = ((h, h), "linear")
            spec[f"{p}self_attn.{proj}.bias"] = ((h,), "bias")
        for norm in ("layer_norm1", "layer_norm2"):
            spec[f"{p}{norm}.weight"] = ((h,), "norm")
            spec[f"{p}{norm}.bias"] = ((h,), "bias")
        spec[f"{p}mlp.fc1.weight"] = ((i, h), "linear")
        spec[f"{p}mlp.fc1.bias"] = ((i,), "bias")
        spec[f"{p}mlp.fc2.weight"] = ((h, i), "linear")
        spec[f"{p}mlp.fc2.bias"] = ((h,), "bias")
    return spec


def clip_state_dict(vocab: int, seed: int = 1, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    h, i = dims.CLIP_HIDDEN, dims.CLIP_INTERMEDIATE
    spec = {
        "text_model.embeddings.token_embedding.weight": ((vocab, h), "embed"),
        "text_model.embeddings.position_embedding.weight": ((CLIP_POSITIONS, h), "embed"),
    }
    spec.update(encoder_layer_specs("text_model.encoder.layers", dims.CLIP_LAYERS, h, i))
    spec["text_model.final_layer_norm.weight"] = ((h,), "norm")
    spec["text_model.final_layer_norm.bias"] = ((h,), "bias")
    return seeded_state_dict(spec, seed, dtype)


def clip_config_json(vocab: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": dims.CLIP_HIDDEN,
        "intermediate_size": dims.CLIP_INTERMEDIATE,
        "num_hidden_layers": dims.CLIP_LAYERS,
        "num_attention_heads": dims.CLIP_HIDDEN // CLIP_HEAD_DIM,
        "max_position_embeddings": CLIP_POSITIONS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": dims.CLIP_HIDDEN,
        "vocab_size": vocab,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float16",
    }


def write_llama_comfy(path: str | Path, seed: int = 0) -> Path:
    """`llava_llama3_fp16.safetensors` layout: `model.`-prefixed keys plus `lm_head.weight` and `tokenizer`."""
    state = {f"model.{k}": v for k, v in llama_state_dict(seed).items()}
    state["lm_head.weight"] = torch.zeros(LLAMA_VOCAB, dims.LLAMA_HIDDEN, dtype=torch.float16)
    state["tokenizer"] = torch.arange(16, dtype=torch.uint8)
    save_safetensors(state, path)
    return Path(path)


def write_llama_shards(folder: str | Path, seed: int = 0) -> Path:
    """`text_encoder/model-0000N-of-00004.safetensors` + index json; returns the first shard (what users pass)."""
    names = save_sharded(llama_state_dict(seed), folder, "model", LLAMA_SHARDS, "model.safetensors.index.json")
    return Path(names[0])


def write_clip_file(path: str | Path, vocab: int, seed: int = 1) -> Path:
    """Comfy `clip_l.safetensors` and community `text_encoder_2/model.safetensors` share this layout."""
    save_safetensors(clip_state_dict(vocab, seed), path, metadata={"format": "pt"})
    return Path(path)


def write_snapshot(root: str | Path, seed: int = 0) -> Path:
    """A hunyuanvideo-community/HunyuanVideo style snapshot: text_encoder{,_2}/ with config.json, tokenizer{,_2}/."""
    root = Path(root)
    tokenizer2 = make_clip_tokenizer(root / "tokenizer_2")
    make_llama_tokenizer(root / "tokenizer")
    write_llama_shards(root / "text_encoder", seed)
    write_json(root / "text_encoder" / "config.json", llama_config_json())
    vocab = clip_vocab_size(tokenizer2)
    write_clip_file(root / "text_encoder_2" / "model.safetensors", vocab, seed + 1)
    write_json(root / "text_encoder_2" / "config.json", clip_config_json(vocab))
    return root


@dataclass(frozen=True)
class TextEncoderFiles:
    llama_comfy: Path  # Comfy-Org llava_llama3_fp16.safetensors
    llama_shard: Path  # first of text_encoder/model-0000N-of-00004.safetensors
    clip_comfy: Path  # Comfy-Org clip_l.safetensors
    clip_hf: Path  # text_encoder_2/model.safetensors
    snapshot: Path  # root with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/
    tokenizer1: Path
    tokenizer2: Path


def make_text_encoder_files(out_dir: str | Path, seed: int = 0) -> TextEncoderFiles:
    """Every layout of both text encoders with the same weights, plus standalone tokenizer folders."""
    out = Path(out_dir)
    snapshot = write_snapshot(out / "snapshot", seed)
    tokenizer1 = make_llama_tokenizer(out / "tokenizer")
    tokenizer2 = make_clip_tokenizer(out / "tokenizer_2")
    vocab = clip_vocab_size(tokenizer2)
    return TextEncoderFiles(
        llama_comfy=write_llama_comfy(out / "comfy" / "llava_llama3_fp16.safetensors", seed),
        llama_shard=write_llama_shards(out / "hf" / "text_encoder", seed),
        clip_comfy=write_clip_file(out / "comfy" / "clip_l.safetensors", vocab, seed + 1),
        clip_hf=write_clip_file(out / "hf" / "text_encoder_2" / "model.safetensors", vocab, seed + 1),
        snapshot=snapshot,
        tokenizer1=tokenizer1,
        tokenizer2=tokenizer2,
    )
