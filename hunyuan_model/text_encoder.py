"""Text encoder 1 (LLaMA, llava-llama-3-8b text part) and text encoder 2 (CLIP-L text model) for FramePack.

Encoding follows musubi-tuner: the prompt goes into the HunyuanVideo video template for LLaMA, the third-from-last
hidden state is kept from the end of the template's system part on, and padded to 512 with a bool mask; CLIP gets
the raw prompt and gives its pooled output.

Loading accepts every published layout (Comfy-Org single files, hunyuanvideo-community split files, snapshot
folders). The model config comes from `config.json` when a folder has one, else from the checkpoint's shapes plus the
family constants below. Headers are checked against the model's expected keys before any tensor is read, so a wrong
file is refused with a message naming the flag, the file and what was expected.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

from hunyuan_model.encoder_loader import EncoderSpec, count_layers, heads_from_rows, load_encoder

logger = logging.getLogger(__name__)

# --- prompt template (HunyuanVideo "dit-llm-encode-video", also diffusers' DEFAULT_PROMPT_TEMPLATE) -------------
SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"
USER_HEADER = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
END_OF_TURN = "<|eot_id|>"
DEFAULT_SYSTEM_PROMPT = (
    "Describe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:"
)
PROMPT_TEMPLATE = f"{SYSTEM_HEADER}{DEFAULT_SYSTEM_PROMPT}{USER_HEADER}{{}}{END_OF_TURN}"

LLAMA_MAX_PROMPT_TOKENS = 256  # tokens kept after the crop; the tokenizer pads/truncates to this + crop_start
LLAMA_HIDDEN_STATE_INDEX = -3
LLAMA_PADDED_LENGTH = 512
CLIP_MAX_LENGTH = 77

# --- family constants that shapes cannot reveal ------------------------------------------------------------------
LLAMA_HEAD_DIM = 128
LLAMA_ROPE_THETA = 500000.0
LLAMA_RMS_NORM_EPS = 1e-5
LLAMA_MAX_POSITIONS = 8192
LLAMA_BOS_ID, LLAMA_EOS_ID = 128000, 128001  # only meaningful for the real vocabulary (128320)

CLIP_HEAD_DIM = 64
CLIP_ACT = "quick_gelu"
CLIP_LAYER_NORM_EPS = 1e-5
CLIP_BOS_ID, CLIP_EOS_ID, CLIP_PAD_ID = 0, 2, 1  # eos 2 selects the legacy pooling: argmax of input_ids

LLAMA_EXPECTED = (
    "text encoder 1 (LLaMA): Comfy-Org llava_llama3_fp16.safetensors, the first of hunyuanvideo-community's "
    "text_encoder/model-0000N-of-00004.safetensors, or a HunyuanVideo snapshot folder"
)
CLIP_EXPECTED = (
    "text encoder 2 (CLIP-L text model): Comfy-Org clip_l.safetensors, hunyuanvideo-community's "
    "text_encoder_2/model.safetensors, or a HunyuanVideo snapshot folder"
)
LLAMA_COMFY_PREFIX = "model."
LLAMA_IGNORED_KEYS = ("tokenizer", "lm_head.weight")  # present in some single-file LLaMA checkpoints
CLIP_PREFIX = "text_model."  # transformers 4.x checkpoint names; the 5.x module has no such level
CLIP_IGNORED_KEYS = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")

# Key fragments that identify what a checkpoint is, for error messages. Checked in order.
# --- text encoder 1: LLaMA ---------------------------------------------------------------------------------------


def _llama_rename(infos) -> Callable[[str], str | None]:
    comfy = f"{LLAMA_COMFY_PREFIX}embed_tokens.weight" in infos

    def rename(key: str) -> str | None:
        if key in LLAMA_IGNORED_KEYS:
            return None
        if comfy and key.startswith(LLAMA_COMFY_PREFIX):
            return key[len(LLAMA_COMFY_PREFIX) :]
        return key

    return rename


def llama_config_from_shapes(shapes: dict[str, tuple[int, ...]], flag: str = "--text_encoder1", path="") -> LlamaConfig:
    """LLaMA-3 config from module-named shapes (`embed_tokens.weight`, `layers.N....`)."""
    vocab, hidden = shapes["embed_tokens.weight"]
    real_vocab = vocab > LLAMA_EOS_ID
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=count_layers(shapes, "layers."),
        num_attention_heads=heads_from_rows(
            shapes["layers.0.self_attn.q_proj.weight"][0], LLAMA_HEAD_DIM, "q_proj", flag, path
        ),
        num_key_value_heads=heads_from_rows(
            shapes["layers.0.self_attn.k_proj.weight"][0], LLAMA_HEAD_DIM, "k_proj", flag, path
        ),
        head_dim=LLAMA_HEAD_DIM,
        hidden_act="silu",
        max_position_embeddings=LLAMA_MAX_POSITIONS,
        rms_norm_eps=LLAMA_RMS_NORM_EPS,
        rope_theta=LLAMA_ROPE_THETA,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=LLAMA_BOS_ID if real_vocab else None,
        eos_token_id=LLAMA_EOS_ID if real_vocab else None,
    )


LLAMA_SPEC = EncoderSpec(
    name="text encoder 1",
    model_class=LlamaModel,
    config_class=LlamaConfig,
    subfolder="text_encoder",
    expected=LLAMA_EXPECTED,
    required_keys=("embed_tokens.weight", "layers.0.self_attn.q_proj.weight"),
    rename=_llama_rename,
    config_from_shapes=llama_config_from_shapes,
)


def load_text_encoder1(
    path: str | os.PathLike, device: str | torch.device = "cpu", fp8_llm: bool = False, flag: str = "--text_encoder1"
) -> LlamaModel:
    """Load the LLaMA text encoder from a Comfy single file, the first of the HF split files, or a snapshot folder.

    Files keep their dtype; a folder is loaded as float16 (musubi-tuner uses `from_pretrained(torch_dtype=fp16)`).
    """
    model = load_encoder(LLAMA_SPEC, path, flag)
    if fp8_llm:
        apply_fp8_llm(model, device)
    else:
        model.to(device)
    return model


def _rms_norm_fp8_forward(module: torch.nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight.to(input_dtype) * x.to(input_dtype)

    return forward


def apply_fp8_llm(model: LlamaModel, device: str | torch.device = "cpu") -> LlamaModel:
    """`--fp8_llm`: everything (weights and buffers, as musubi-tuner does) to float8_e4m3fn, embeddings back.

    Matmuls then run under autocast in the embeddings' dtype, which upcasts the fp8 weights per op (CUDA and CPU
    alike). RMSNorm's own forward would multiply an fp8 weight with a half tensor, so it is replaced by one that
    casts the weight first.
    """
    org_dtype = encoder_dtype(model)
    if org_dtype not in (torch.float16, torch.bfloat16):
        org_dtype = torch.float16  # autocast has no float32 mode, and fp8 matmuls need it
    logger.info("Casting text encoder 1 to float8_e4m3fn on %s (embeddings stay %s)", device, org_dtype)
    model.to(device=device, dtype=torch.float8_e4m3fn)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.to(org_dtype)
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = _rms_norm_fp8_forward(module)
    return model


# --- text encoder 2: CLIP-L ----------------------------------------------------------------------------------------


def _clip_rename(key: str) -> str | None:
    if key in CLIP_IGNORED_KEYS:
        return None
    return key[len(CLIP_PREFIX) :] if key.startswith(CLIP_PREFIX) else key


def clip_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], flag: str = "--text_encoder2", path=""
) -> CLIPTextConfig:
    """CLIP text config from module-named shapes (`embeddings.token_embedding.weight`, `encoder.layers.N....`)."""
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        projection_dim=hidden,
        num_hidden_layers=count_layers(shapes, "encoder.layers."),
        num_attention_heads=heads_from_rows(hidden, CLIP_HEAD_DIM, "the hidden size", flag, path),
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
        hidden_act=CLIP_ACT,
        layer_norm_eps=CLIP_LAYER_NORM_EPS,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_PAD_ID,
    )


CLIP_SPEC = EncoderSpec(
    name="text encoder 2",
    model_class=CLIPTextModel,
    config_class=CLIPTextConfig,
    subfolder="text_encoder_2",
    expected=CLIP_EXPECTED,
    required_keys=("embeddings.token_embedding.weight", "encoder.layers.0.mlp.fc1.weight"),
    rename=lambda infos: _clip_rename,
    config_from_shapes=clip_config_from_shapes,
)


def load_text_encoder2(
    path: str | os.PathLike, device: str | torch.device = "cpu", flag: str = "--text_encoder2"
) -> CLIPTextModel:
    """Load the CLIP-L text model from a Comfy / community single file or a snapshot folder (folder → float16)."""
    return load_encoder(CLIP_SPEC, path, flag).to(device)


# --- encoding -----------------------------------------------------------------------------------------------------


def llama_prompt_prefix(custom_system_prompt: str | None = None) -> str:
    """The template up to where the user prompt goes; its token count is the crop start."""
    system = DEFAULT_SYSTEM_PROMPT if custom_system_prompt is None else custom_system_prompt
    return f"{SYSTEM_HEADER}{system}{USER_HEADER}"


def llama_crop_start(tokenizer, custom_system_prompt: str | None = None) -> int:
    """Tokens of the template prefix, BOS included (95 for the default template with the real tokenizer)."""
    return len(tokenizer(llama_prompt_prefix(custom_system_prompt), truncation=True)["input_ids"])


def crop_or_pad_yield_mask(x: torch.Tensor, length: int = LLAMA_PADDED_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, C) → (B, length, C) zero-padded or cropped, plus a bool mask that is True on the real tokens."""
    b, n, c = x.shape
    if n >= length:
        return x[:, :length], torch.ones((b, length), dtype=torch.bool, device=x.device)
    padded = torch.zeros((b, length, c), dtype=x.dtype, device=x.device)
    padded[:, :n] = x
    mask = torch.zeros((b, length), dtype=torch.bool, device=x.device)
    mask[:, :n] = True
    return padded, mask


def encoder_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a text encoder computes in: its input embeddings' (float16 for fp8_llm too)."""
    return model.get_input_embeddings().weight.dtype


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast in `dtype` where autocast supports it (not float32); otherwise nothing."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_llama(prompt: str, tokenizer, text_encoder: LlamaModel, custom_system_prompt: str | None = None):
    """(1, L, hidden) third-from-last hidden states of the prompt tokens, L ≤ 256 (the template prefix cropped)."""
    crop_start = llama_crop_start(tokenizer, custom_system_prompt)
    text = llama_prompt_prefix(custom_system_prompt) + prompt + END_OF_TURN
    inputs = tokenizer(
        text,
        padding="max_length",
        max_length=LLAMA_MAX_PROMPT_TOKENS + crop_start,
        truncation=True,
        return_tensors="pt",
        return_attention_mask=True,
    )
    input_ids = inputs["input_ids"].to(text_encoder.device)
    attention_mask = inputs["attention_mask"].to(text_encoder.device)
    valid_length = int(attention_mask.sum())
    if not bool(attention_mask[:, crop_start:valid_length].all()):
        raise RuntimeError("LLaMA tokenizer padded on the left; the crop needs right padding")
    outputs = text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return outputs.hidden_states[LLAMA_HIDDEN_STATE_INDEX][:, crop_start:valid_length]


@torch.no_grad()
def encode_clip(prompt: str, tokenizer, text_encoder: CLIPTextModel) -> torch.Tensor:
    """(1, hidden) pooled output of the raw prompt padded to 77 (run without attention mask)."""
    inputs = tokenizer(prompt, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    return text_encoder(input_ids=inputs["input_ids"].to(text_encoder.device)).pooler_output


@torch.no_grad()
def encode_prompt_conds(
    prompt: str,
    text_encoder1: LlamaModel,
    text_encoder2: CLIPTextModel,
    tokenizer1,
    tokenizer2,
    custom_system_prompt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both encoders under autocast in text encoder 1's dtype.

    Returns, on CPU: llama_vec (1, 512, hidden1) zero-padded, llama_attention_mask (1, 512) bool,
    clip_l_pooler (1, hidden2).
    """
    with autocast_for(text_encoder1.device, encoder_dtype(text_encoder1)):
        llama_vec = encode_llama(prompt, tokenizer1, text_encoder1, custom_system_prompt)
        clip_l_pooler = encode_clip(prompt, tokenizer2, text_encoder2)
    llama_vec, llama_attention_mask = crop_or_pad_yield_mask(llama_vec.cpu(), LLAMA_PADDED_LENGTH)
    return llama_vec, llama_attention_mask, clip_l_pooler.cpu()
