"""A complete set of tiny models (one public layout each) for end-to-end runs: tests and `make demo`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.factory.dit import KIJAI_NAME, write_dit_single
from tests.factory.image_encoder import COMFY_NAME, siglip_state_dict
from tests.factory.text_encoders import write_clip_file, write_llama_comfy
from tests.factory.tokenizers import clip_vocab_size, make_clip_tokenizer, make_llama_tokenizer
from tests.factory.vae import write_snapshot as write_vae_snapshot
from utils.safetensors_utils import save_safetensors


@dataclass(frozen=True)
class ModelFiles:
    dit: Path
    vae: Path
    text_encoder1: Path
    text_encoder2: Path
    image_encoder: Path
    tokenizer1: Path
    tokenizer2: Path

    def flags(self) -> list[str]:
        """The model flags of the generation and caching scripts."""
        return [
            "--dit", str(self.dit), "--vae", str(self.vae),
            "--text_encoder1", str(self.text_encoder1), "--text_encoder2", str(self.text_encoder2),
            "--image_encoder", str(self.image_encoder),
            "--tokenizer1", str(self.tokenizer1), "--tokenizer2", str(self.tokenizer2),
        ]  # fmt: skip


def write_all_models(folder: str | Path, seed: int = 0) -> ModelFiles:
    """Kijai DiT file, HunyuanVideo-community VAE snapshot, Comfy-Org LLaMA/CLIP/SigLIP files, local tokenizers."""
    folder = Path(folder)
    tokenizer1 = make_llama_tokenizer(folder / "tokenizer")
    tokenizer2 = make_clip_tokenizer(folder / "tokenizer_2")
    image_encoder = folder / "sigclip_vision_384" / COMFY_NAME
    save_safetensors(siglip_state_dict(seed + 2), image_encoder)
    return ModelFiles(
        dit=Path(write_dit_single(folder / KIJAI_NAME, seed)),
        vae=write_vae_snapshot(folder / "HunyuanVideo", seed),
        text_encoder1=write_llama_comfy(folder / "llava_llama3_fp16.safetensors", seed),
        text_encoder2=write_clip_file(folder / "clip_l.safetensors", clip_vocab_size(tokenizer2), seed + 1),
        image_encoder=image_encoder,
        tokenizer1=tokenizer1,
        tokenizer2=tokenizer2,
    )
