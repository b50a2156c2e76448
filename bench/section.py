"""One FramePack section on a random-weight DiT, as the generation pipeline samples it, for the bench scripts.

Inputs follow the real layout: the noisy window plus the usual clean latents (start + 1x, 2x, 4x history) and their
indices from `frame_pack.sections`, SigLIP image tokens and a LLaMA prompt of `text_tokens` valid tokens in a
512-token buffer. Everything is drawn from one seed, so two variants of one run see the same inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from frame_pack import sections as S
from frame_pack.sampling import LATENT_CHANNELS, flow_match_x0_model, initial_noise, make_generator, sample_flow
from frame_pack.step_cache import step_cache_on
from hunyuan_model.vae import SPATIAL_COMPRESSION

TEXT_BUFFER_TOKENS = 512  # LLaMA features are padded to this length; the mask marks the valid prompt tokens
SIGLIP_TOKENS = 729  # 27 x 27 patches of a 384 px image


@dataclass
class Section:
    noise: torch.Tensor  # (1, 16, lws, h, w) fp32
    positive: dict
    negative: dict
    shared: dict
    f1: bool

    @property
    def tokens(self) -> dict[str, int]:
        """Token counts of one DiT call: noisy, clean (all scales), text (image + prompt)."""
        _, _, t, h, w = self.noise.shape
        noisy = t * (h // 2) * (w // 2)
        clean = 0
        for key, (pt, ph, pw) in (("clean_latents", (1, 2, 2)), ("clean_latents_2x", (2, 4, 4)),
                                  ("clean_latents_4x", (4, 8, 8))):  # fmt: skip
            x = self.shared.get(key)
            if x is not None:
                clean += -(-x.shape[2] // pt) * -(-x.shape[3] // ph) * -(-x.shape[4] // pw)
        text = self.shared["image_embeddings"].shape[1] + int(self.positive["encoder_attention_mask"].sum())
        return {"noisy": noisy, "clean": clean, "text": text}


def make_section(
    config,
    height: int,
    width: int,
    latent_window_size: int,
    text_tokens: int,
    image_tokens: int = SIGLIP_TOKENS,
    f1: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> Section:
    """The first generated section of a video (inverted: the last one in time; F1: the first)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION
    start = torch.randn(1, LATENT_CHANNELS, 1, h, w, generator=gen)
    (plan,) = S.plan_sections(1, latent_window_size, f1=f1)
    history = S.new_history(start, f1=f1)
    clean = S.clean_latents_from_history(history, start, f1=f1)

    def text(valid: int) -> dict:
        mask = torch.arange(TEXT_BUFFER_TOKENS) < valid
        features = torch.randn(1, TEXT_BUFFER_TOKENS, config.text_embed_dim, generator=gen) * mask[None, :, None]
        return {
            "encoder_hidden_states": features.to(device, dtype),
            "encoder_attention_mask": mask[None].to(device),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=gen).to(device, dtype),
        }

    positive, negative = text(text_tokens), text(max(1, text_tokens // 4))
    shared = {
        "image_embeddings": torch.randn(1, image_tokens, config.image_proj_dim, generator=gen).to(device, dtype),
        **{k: v.to(device) for k, v in plan.indices.batched(1).items() if v is not None},
        **{k: v.to(device) for k, v in clean.as_kwargs().items() if v is not None},
    }
    noise = initial_noise(make_generator(seed), S.section_frames(latent_window_size), height, width).to(device)
    return Section(noise, positive, negative, shared, f1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(dit, section: Section, steps: int, cache=None, guidance_scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """Sample the section with `cache` (None: uncached); returns (final latent fp32, wall seconds)."""
    dtype = dit.x_embedder.proj.weight.dtype
    model_x0 = flow_match_x0_model(
        dit, section.positive, section.negative, shared=section.shared, guidance_scale=guidance_scale, dtype=dtype
    )
    device = section.noise.device
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), step_cache_on(dit, cache):
        latent = sample_flow(model_x0, section.noise, steps, disable=True)
    synchronize(device)
    return latent.float(), time.perf_counter() - start


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference.float()).norm() / reference.float().norm()).item()


def psnr(x: torch.Tensor, reference: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB for signals spanning `peak` (pixels in [-1, 1]: 2)."""
    mse = (x.float() - reference.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


def block_count(dit) -> int:
    return len(dit.transformer_blocks) + len(dit.single_transformer_blocks)
