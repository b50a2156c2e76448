"""Recognise what a checkpoint is from its key names, so a wrong file gets an error that says what it is."""

from __future__ import annotations

# (a key that only this kind of file has, what to call it, which flag takes it)
_SIGNATURES = (
    ("x_embedder.proj.weight", "a FramePack DiT", "--dit"),
    ("double_blocks.0.img_attn_qkv.weight", "a HunyuanVideo DiT (not FramePack)", None),
    ("decoder.conv_in.conv.weight", "a HunyuanVideo VAE", "--vae"),
    ("vae.decoder.conv_in.conv.weight", "a HunyuanVideo VAE", "--vae"),
    ("model.embed_tokens.weight", "a LLaMA text encoder", "--text_encoder1"),
    ("embed_tokens.weight", "a LLaMA text encoder", "--text_encoder1"),
    ("text_model.embeddings.token_embedding.weight", "a CLIP text encoder", "--text_encoder2"),
    ("vision_model.embeddings.patch_embedding.weight", "a SigLIP image encoder", "--image_encoder"),
)


def identify_checkpoint(keys) -> str | None:
    """A short description such as 'a HunyuanVideo VAE (use it with --vae)', or None when unrecognised."""
    keys = set(keys)
    if any(k.startswith("lora_unet_") or ".lora_A." in k or ".lora_down." in k for k in keys):
        return "a LoRA file (use it with --lora_weight)"
    for key, what, flag in _SIGNATURES:
        if key in keys:
            return f"{what} (use it with {flag})" if flag else what
    return None


def wrong_file_message(flag: str, path: str, expected: str, keys) -> str:
    what = identify_checkpoint(keys)
    found = (
        f"this looks like {what}"
        if what
        else "its keys are not those of any known model, e.g. " + ", ".join(sorted(keys)[:4])
    )
    return f"{flag} {path}: expected {expected}, but {found}"
