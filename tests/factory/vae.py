"""Tiny HunyuanVideo VAE checkpoints in each real layout, from seeded deterministic weights.

Same block structure and compression as the real VAE (4 blocks, 8× spatial, 4× temporal), channels from dims.py.
Weights are drawn on the CPU from a seeded generator and rounded through fp16, so the fp32 `.pt` and the fp16
safetensors layouts hold identical values. Shaped like a trained model: activations stay O(1), kernels are
centre-heavy, and the log-variance half of `quant_conv` is biased to −8 so the posterior is narrow.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from pathlib import Path

import torch

from hunyuan_model.vae import DIFFUSERS_FILE, OFFICIAL_FILE, SUBFOLDER, AutoencoderKLCausal3D, VAEConfig
from tests.factory.dims import VAE_BLOCK_OUT_CHANNELS, VAE_LAYERS_PER_BLOCK
from utils.safetensors_utils import save_safetensors

LOGVAR_BIAS = -8.0
RESIDUAL_GAIN = 0.2  # resnet conv2 and attention output: blocks stay close to their identity path


def _spatial_profile(k: int) -> torch.Tensor:
    """exp(−(dy² + dx²)) over a k×k kernel, energy-normalised: centre-heavy kernels like trained ones, which keeps
    the tiny VAE local enough that tiled and untiled passes agree as they do for the real model."""
    d = torch.arange(k, dtype=torch.float32) - k // 2
    profile = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2))
    return profile / profile.pow(2).mean().sqrt()


def tiny_vae_config(**overrides) -> VAEConfig:
    base = VAEConfig(block_out_channels=VAE_BLOCK_OUT_CHANNELS, layers_per_block=VAE_LAYERS_PER_BLOCK)
    return replace(base, **overrides)


@torch.no_grad()
def init_vae_weights_(model: AutoencoderKLCausal3D, seed: int = 0) -> AutoencoderKLCausal3D:
    """Fill every parameter in place from a CPU generator seeded with `seed` (fan-in scaled, fp16-exact)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2:  # conv / linear weight
            fan_in = math.prod(param.shape[1:])
            gain = RESIDUAL_GAIN if name.endswith(("conv2.conv.weight", "to_out.0.weight")) else 1.0
            value = torch.randn(param.shape, generator=gen) * (gain / math.sqrt(fan_in))
            if param.ndim == 5 and param.shape[-1] > 1:
                value *= _spatial_profile(param.shape[-1])
        elif "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.05 * torch.randn(param.shape, generator=gen)
        else:
            value = 0.02 * torch.randn(param.shape, generator=gen)
        if name == "quant_conv.bias":
            value[model.config.latent_channels :] += LOGVAR_BIAS
        param.copy_(value.half().float())
    return model


def make_tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> AutoencoderKLCausal3D:
    """An in-memory tiny VAE (no file), eval mode; `overrides` are VAEConfig fields."""
    model = init_vae_weights_(AutoencoderKLCausal3D(tiny_vae_config(**overrides)), seed)
    return model.to(dtype).eval().requires_grad_(False)


def make_vae_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """The tiny VAE's weights in the checkpoint key layout, fp32."""
    return make_tiny_vae(seed, **overrides).state_dict()


def config_to_json(config: VAEConfig) -> dict:
    """A diffusers-style `vae/config.json` (as in the hunyuanvideo-community snapshot)."""
    n = len(config.block_out_channels)
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    values["block_out_channels"] = list(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKLHunyuanVideo",
        "act_fn": "silu",
        "down_block_types": ["HunyuanVideoDownBlock3D"] * n,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * n,
        **values,
    }


def write_official_pt(
    folder: str | Path, seed: int = 0, vae_prefix: bool = False, name: str = OFFICIAL_FILE, **overrides
) -> Path:
    """The official HunyuanVideo layout: torch.save({'state_dict': ...}) in fp32. With `vae_prefix` the keys
    carry `vae.` and a stray non-VAE entry sits beside them (as in training checkpoints), to be dropped."""
    state = make_vae_state_dict(seed, **overrides)
    if vae_prefix:
        state = {f"vae.{k}": v for k, v in state.items()}
        state["loss.logvar"] = torch.zeros(())
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return path


def write_diffusers_safetensors(folder: str | Path, seed: int = 0, **overrides) -> Path:
    """hunyuanvideo-community `vae/diffusion_pytorch_model.safetensors`: same keys, fp16."""
    state = {k: v.half() for k, v in make_vae_state_dict(seed, **overrides).items()}
    path = Path(folder) / DIFFUSERS_FILE
    save_safetensors(state, path, metadata={"format": "pt"})
    return path


def write_snapshot(root: str | Path, seed: int = 0, **overrides) -> Path:
    """A snapshot root holding `vae/diffusion_pytorch_model.safetensors` and `vae/config.json`; returns the root."""
    root = Path(root)
    write_diffusers_safetensors(root / SUBFOLDER, seed, **overrides)
    with open(root / SUBFOLDER / "config.json", "w") as f:
        json.dump(config_to_json(tiny_vae_config(**overrides)), f, indent=2)
    return root
