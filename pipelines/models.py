"""The models a pipeline uses, each loaded when first needed: one cache shared by generation and both caching
pipelines.

With `keep` (batch and interactive generation, sampling during training, caching) a loaded model stays loaded and
only moves to the CPU between uses; without it each is dropped as soon as its work is done, as musubi-tuner's
one-shot generation does. Either way a stage's models leave the device before the next stage's arrive (encoders
before the DiT, the DiT, block-swapped or not, before the VAE decodes), so peak device memory is that of the
largest stage, not the sum; each move is logged with where every model then is (`placement`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from networks.lora_switch import LoraSet, LoraSwitcher, lora_set
from pipelines.flags import VAE_DTYPE_CHOICES, compile_settings
from pipelines.settings import ModelSettings
from utils.device import clean_memory

logger = logging.getLogger(__name__)


@dataclass
class TextEncoders:
    """LLaMA (1) and CLIP-L (2) with their tokenizers."""

    tokenizer1: Any
    text_encoder1: torch.nn.Module
    tokenizer2: Any
    text_encoder2: torch.nn.Module

    def encode(self, prompt: str, custom_system_prompt: str | None = None):
        """(llama_vec (1, 512, hidden), llama_attention_mask (1, 512), clip_l_pooler (1, hidden)) of one prompt."""
        from hunyuan_model.text_encoder import encode_prompt_conds

        return encode_prompt_conds(
            prompt, self.text_encoder1, self.text_encoder2, self.tokenizer1, self.tokenizer2, custom_system_prompt
        )

    def to(self, device) -> TextEncoders:
        self.text_encoder1.to(device)
        self.text_encoder2.to(device)
        return self


class ModelCache:
    """Text encoders, image encoder, VAE and DiT of one `ModelSettings`, loaded on first use and placed on `device`
    whenever asked for. `image_encoder_dtype` casts SigLIP after loading (the latent cache stores float16)."""

    def __init__(
        self,
        settings: ModelSettings,
        device: torch.device,
        keep: bool,
        image_encoder_dtype: torch.dtype | None = None,
        lora_sets: list[LoraSet] | None = None,
    ):
        """`lora_sets`: the LoRA sets known in advance when generations switch LoRAs (prompt lines with --lw/--lm,
        interactive mode); the DiT then gets a LoraSwitcher and `dit(loras)` merges the given set."""
        self.settings, self.device, self.keep = settings, device, keep
        self.lora_sets = lora_sets
        self.lora_switcher: LoraSwitcher | None = None
        self.image_encoder_dtype = image_encoder_dtype
        self._text_encoders: TextEncoders | None = None
        self._image_encoder = None
        self._vae = None
        self._dit = None
        # model -> "device" (on `device`), "cpu" (loaded, offloaded) or "not loaded"
        self.placement = dict.fromkeys(("text encoders", "image encoder", "VAE", "DiT"), "not loaded")

    def _place(self, where: dict[str, str]) -> None:
        """Record where models now are and log the whole placement."""
        self.placement.update(where)
        words = {"device": f"on {self.device}", "cpu": "offloaded to cpu", "not loaded": "not loaded"}
        shown = ", ".join(f"{name} {words[where]}" for name, where in self.placement.items())
        logger.info(f"models: {shown}")

    def text_encoders(self) -> TextEncoders:
        if self._text_encoders is None:
            from hunyuan_model.text_encoder import load_text_encoder1, load_text_encoder2
            from hunyuan_model.tokenizers import load_tokenizer1, load_tokenizer2

            s = self.settings
            self._text_encoders = TextEncoders(
                tokenizer1=load_tokenizer1(s.tokenizer1, s.text_encoder1),
                text_encoder1=load_text_encoder1(s.text_encoder1, self.device, fp8_llm=s.fp8_llm).eval(),
                tokenizer2=load_tokenizer2(s.tokenizer2, s.text_encoder2),
                text_encoder2=load_text_encoder2(s.text_encoder2, self.device).eval(),
            )
        self._place({"text encoders": "device"})
        return self._text_encoders.to(self.device)

    def image_encoder(self):
        if self._image_encoder is None:
            from hunyuan_model.image_encoder import load_image_encoder

            encoder = load_image_encoder(self.settings.image_encoder, self.device)
            if self.image_encoder_dtype is not None:
                encoder = encoder.to(dtype=self.image_encoder_dtype)
            self._image_encoder = encoder.eval().requires_grad_(False)
        self._place({"image encoder": "device"})
        return self._image_encoder.to(self.device)

    def vae(self):
        if self._vae is None:
            from hunyuan_model.vae import load_vae

            s = self.settings
            dtype = vae_dtype(s.vae_dtype, self.device)
            logger.info(f"Loading VAE from {s.vae} ({dtype})")
            self._vae = load_vae(
                s.vae,
                "cpu",
                dtype=dtype,
                chunk_size=s.vae_chunk_size,
                spatial_tile_sample_min_size=s.vae_spatial_tile_sample_min_size,
            )
        self._place({"VAE": "device"})
        return self._vae.to(self.device)

    def dit(self, loras: LoraSet | None = None):
        """The DiT on the device; with a switcher, `loras` (default: the --lora_weight set) merged."""
        if self._dit is None:
            self._dit, self.lora_switcher = load_dit(self.settings, self.device, self.lora_sets)
            if self._dit is None:  # --save_merged_model: the merged file is written, nothing was loaded
                return None
        else:
            self._dit.move_to_device_except_swap_blocks(self.device)
        if self.lora_switcher is not None:
            self.lora_switcher.apply(model_loras(self.settings) if loras is None else loras)
        elif loras is not None and loras != model_loras(self.settings):
            raise ValueError("per-line LoRAs (--lw/--lm) cannot be switched with --lycoris")
        self._place({"DiT": "device"})  # with block swap: its resident blocks; the others stream from the CPU
        return self._dit

    def restore_base_weights(self) -> None:
        """Unmerge every switched LoRA (the end of a queue leaves the DiT as loaded, without LoRAs)."""
        if self.lora_switcher is not None:
            self.lora_switcher.apply(())

    def release_encoders(self) -> None:
        """After encoding: text and image encoders leave the device (kept on the CPU with `keep`)."""
        if self.keep:
            if self._text_encoders is not None:
                self._text_encoders.to("cpu")
            if self._image_encoder is not None:
                self._image_encoder.to("cpu")
        else:
            self._text_encoders = self._image_encoder = None
        clean_memory(self.device)
        self._place(
            {"text encoders": self._released(self._text_encoders), "image encoder": self._released(self._image_encoder)}
        )

    def offload_vae(self) -> None:
        if self._vae is not None:
            self._vae.to("cpu")
            self._place({"VAE": "cpu"})
        clean_memory(self.device)

    def release_dit(self) -> None:
        """After sampling: the DiT leaves the device before the VAE decodes (kept on the CPU with `keep`)."""
        if self.keep and self._dit is not None:
            self._dit.offload_to_cpu()
        elif not self.keep:
            self._dit = None
        clean_memory(self.device)
        self._place({"DiT": self._released(self._dit)})

    def _released(self, model) -> str:
        return "not loaded" if model is None else "cpu"


def vae_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`--vae_dtype`: the named dtype, or the device default (float16 on CUDA as musubi-tuner, float32 on the CPU,
    which has no fast float16 3D convolutions)."""
    from hunyuan_model.vae import compute_dtype

    return compute_dtype(device) if name is None else VAE_DTYPES[name]


VAE_DTYPES = {name: getattr(torch, name) for name in VAE_DTYPE_CHOICES}


def model_loras(settings: ModelSettings) -> LoraSet:
    """The LoRA set of --lora_weight / --lora_multiplier / --include_patterns / --exclude_patterns."""
    if not settings.lora_weight:
        return ()
    s = settings
    return lora_set(s.lora_weight, s.lora_multiplier, s.include_patterns, s.exclude_patterns)


def load_dit(settings: ModelSettings, device: torch.device, lora_sets: list[LoraSet] | None = None):
    """Load, merge LoRAs, optionally save the merged model, quantize, place on the device -> (model, switcher).

    Without LoRA switching the checkpoint streams in: each weight is merged and quantized on `device` as it is read
    (straight to `device` without block swap; to the CPU with it, then only the resident blocks move), and
    `--save_merged_model` streams file to file and returns (None, None). With `lora_sets` (switching LoRAs between
    generations) the merge goes through a LoraSwitcher, which keeps base copies of the modules those sets touch,
    before fp8 quantization, so that later switches are exact; LyCORIS files merge into a fully loaded model too
    (their networks need the model).
    """
    from frame_pack.dit_loader import dit_skeleton, load_packed_model, save_merged_dit
    from frame_pack.fp8 import Fp8Settings, apply_fp8
    from networks.lora_merge import merge_lora_files, plan_lora_merge, save_merged_model

    s = settings
    quantized = s.fp8 or s.fp8_scaled
    switching = lora_sets is not None and not s.lycoris
    merge_args = (list(s.lora_weight), list(s.lora_multiplier), s.include_patterns, s.exclude_patterns, device)
    switcher = None
    if switching or (s.lora_weight and s.lycoris):
        on_device = s.blocks_to_swap == 0 and not quantized and not s.lora_weight and not switching
        model = load_packed_model(s.dit, device if on_device else "cpu", attn_mode=s.attn_mode)
        if switching:
            switcher = LoraSwitcher(model, device)
            if quantized:
                switcher.keep_base(switcher.touched_modules({spec for loras in lora_sets for spec in loras}))
            switcher.apply(model_loras(s))
        else:
            merge_lora_files(model, *merge_args, lycoris=True)
            if s.save_merged_model:
                save_merged_model(model, s.save_merged_model)
                logger.info(f"merged DiT saved to {s.save_merged_model}")
                return model, None
        if quantized:
            apply_fp8(model, scaled=s.fp8_scaled, device=device, keep_on_device=s.blocks_to_swap == 0)
    else:
        merge = plan_lora_merge(dit_skeleton(s.dit), *merge_args) if s.lora_weight else None
        if s.save_merged_model:
            save_merged_dit(s.dit, merge, s.save_merged_model)
            logger.info(f"merged DiT saved to {s.save_merged_model}")
            return None, None
        home = device if s.blocks_to_swap == 0 else torch.device("cpu")
        fp8 = Fp8Settings(scaled=s.fp8_scaled, device=device) if quantized else None
        model = load_packed_model(s.dit, home, attn_mode=s.attn_mode, weight_transform=merge, fp8=fp8)
    model.eval().requires_grad_(False)
    model.enable_rope_scaling(s.rope_scaling_timestep_threshold, s.rope_scaling_factor)
    if s.blocks_to_swap > 0:
        model.enable_block_swap(s.blocks_to_swap, device, use_pinned_memory=s.use_pinned_memory_for_block_swap)
    model.move_to_device_except_swap_blocks(device)
    compile_with = compile_settings(s)
    if compile_with is not None:
        from frame_pack.compile import compile_blocks

        compile_blocks(model, compile_with)
    return model, switcher


def dit_dtype(model) -> torch.dtype:
    """The dtype activations run in: the checkpoint's dtype (fp8 keeps it for non-quantized layers)."""
    return model.x_embedder.proj.weight.dtype
