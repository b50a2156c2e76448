"""Recognise what a checkpoint is from its key names, so a wrong file gets an error that says what it is."""

from __future__ import annotations

from collections.abc import Mapping

# (what it is, key fragments that only this kind of file has, the flag that takes it)
_KINDS = (
    ("a FramePack DiT", ("x_embedder.proj.", "clean_x_embedder."), "--dit"),
    ("a HunyuanVideo DiT (not FramePack)", ("double_blocks.", "single_blocks."), None),
    (
        "a HunyuanVideo VAE",
        ("decoder.conv_in.conv.", "decoder.up_blocks.", "encoder.down_blocks.", "post_quant_conv."),
        "--vae",
    ),
    ("a LLaMA text encoder", ("embed_tokens.weight",), "--text_encoder1"),
    (
        "a CLIP text encoder",
        ("text_model.embeddings.token_embedding.", "embeddings.token_embedding."),
        "--text_encoder2",
    ),
    (
        "a SigLIP image encoder",
        ("vision_model.embeddings.patch_embedding.", "embeddings.patch_embedding."),
        "--image_encoder",
    ),
)


def identify_checkpoint(keys) -> str | None:
    """A short description such as 'a HunyuanVideo VAE (use it with --vae)', or None when unrecognised."""
    keys = list(keys)
    if any(k.startswith("lora_unet_") or ".lora_A." in k or ".lora_down." in k for k in keys):
        return "a LoRA file (use it with --lora_weight)"
    for what, fragments, flag in _KINDS:
        if any(fragment in key for key in keys for fragment in fragments):
            return f"{what} (use it with {flag})" if flag else what
    return None


def describe_checkpoint(keys) -> str:
    """Like identify_checkpoint, but always a phrase ('an unrecognised checkpoint' when nothing matches)."""
    keys = list(keys)
    return identify_checkpoint(keys) or ("an unrecognised checkpoint" if keys else "an empty checkpoint")


def wrong_file_message(flag: str, path: str, expected: str, keys) -> str:
    what = identify_checkpoint(keys)
    found = (
        f"this looks like {what}"
        if what
        else "its keys are not those of any known model, e.g. " + ", ".join(sorted(keys)[:4])
    )
    return f"{flag} {path}: expected {expected}, but {found}"


def state_dict_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str | None:
    """How a checkpoint's tensor shapes differ from a model's: missing, unexpected, wrong-shape keys, or None."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(k for k in expected if k in found and tuple(found[k]) != tuple(expected[k]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        shown = "; ".join(f"{k} {tuple(found[k])} (expected {tuple(expected[k])})" for k in wrong[:3])
        parts.append(f"{len(wrong)} wrong shapes: {shown}")
    return "; ".join(parts) or None
