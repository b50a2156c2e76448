"""Flow-matching timestep sampling and loss weighting of the training step.

x_t = (1 − σ)·x0 + σ·ε and the DiT predicts ε − x0. Every mode draws σ (or t) per sample; the model is fed
timestep = σ·1000 (table entries 1000 … 1, `sigma` mode) or t·1000 + 1 (continuous modes, 1 … 1001).

Draw order per step, after `noise = randn_like(latents)`: the mode's draws below, on the device (continuous modes)
or on the CPU (`sigma` mode density), as musubi-tuner does, so the same seed gives the same timesteps.
"""

from __future__ import annotations

import argparse
import logging
import math

import torch

from frame_pack.sampling import FLUX_MU_X1, FLUX_MU_X2, FLUX_MU_Y1, FLUX_MU_Y2

logger = logging.getLogger(__name__)

TIMESTEP_SAMPLING_MODES = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "logsnr", "qinglong")
CONTINUOUS_MODES = TIMESTEP_SAMPLING_MODES[1:]
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)  # the centres of five equal bands of the 1000 timesteps
# qinglong: per sample, flux_shift with probability 0.8, logsnr 0.075, and the rest logsnr around +5.36
# (low noise), i.e. the style-friendly high-noise draw balanced by a detail-oriented one.
QINGLONG_FLUX_SHIFT_SHARE = 0.80
QINGLONG_LOGSNR_SHARE = 0.075
QINGLONG_LOGSNR2_MEAN, QINGLONG_LOGSNR2_STD = 5.36, 1.0

_warned_off_table = False


def schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of the 1000-step training scheduler: sigmas = linspace(1, 0, 1001) in float32 and
    timesteps = sigmas[:-1]·1000 (1000, 999, …, 1), exactly as musubi-tuner builds them."""
    sigmas = torch.linspace(1, 0, NUM_TRAIN_TIMESTEPS + 1)
    return sigmas, (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.float32)


def timestep_bounds(args: argparse.Namespace) -> tuple[int, int]:
    return args.min_timestep or 0, 1000 if args.max_timestep is None else args.max_timestep


def density_for_sigma_mode(args: argparse.Namespace, batch_size: int) -> torch.Tensor:
    """u in [0, 1) for the `sigma` mode, drawn on the CPU with the weighting scheme's density (SD3)."""
    scheme = args.weighting_scheme
    if scheme == "logit_normal":
        u = torch.normal(mean=args.logit_mean, std=args.logit_std, size=(batch_size,), device="cpu")
        return torch.sigmoid(u)
    u = torch.rand(size=(batch_size,), device="cpu")
    if scheme == "mode":
        u = 1 - u - args.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flux_shift_mu(height: int, width: int) -> float:
    """Flux's resolution-dependent shift: linear in the tokens of one latent frame, (h//2)·(w//2), through
    (256, 0.5) and (4096, 1.15); not capped (the training mode of later musubi-tuner)."""
    slope = (FLUX_MU_Y2 - FLUX_MU_Y1) / (FLUX_MU_X2 - FLUX_MU_X1)
    return slope * ((height // 2) * (width // 2)) + FLUX_MU_Y1 - slope * FLUX_MU_X1


def _flux_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def _logsnr_t(mean: float, std: float, count: int, device) -> torch.Tensor:
    """t = sigmoid(−λ/2) with λ ~ N(mean, std): a log-SNR draw mapped to flow-matching time."""
    logsnr = torch.normal(mean=mean, std=std, size=(count,), device=device)
    return torch.sigmoid(-logsnr / 2)


def continuous_t(args: argparse.Namespace, batch_size: int, latent_hw: tuple[int, int], device) -> torch.Tensor:
    """t in [0, 1] per sample for the continuous modes, before the min/max timestep rescale."""
    mode = args.timestep_sampling
    if mode == "uniform":
        return torch.rand((batch_size,), device=device)
    if mode == "sigmoid":
        return torch.sigmoid(args.sigmoid_scale * torch.randn((batch_size,), device=device))
    if mode == "shift":
        t = (torch.randn(batch_size, device=device) * args.sigmoid_scale).sigmoid()
        shift = args.discrete_flow_shift
        return (t * shift) / (1 + (shift - 1) * t)
    if mode == "flux_shift":
        t = (torch.randn(batch_size, device=device) * args.sigmoid_scale).sigmoid()
        return _flux_shift(t, flux_shift_mu(*latent_hw))
    if mode == "logsnr":
        return _logsnr_t(args.logit_mean, args.logit_std, batch_size, device)
    if mode == "qinglong":
        decision = torch.rand((batch_size,), device=device)
        flux = decision < QINGLONG_FLUX_SHIFT_SHARE
        logsnr = (decision >= QINGLONG_FLUX_SHIFT_SHARE) & (
            decision < QINGLONG_FLUX_SHIFT_SHARE + QINGLONG_LOGSNR_SHARE
        )
        logsnr2 = decision >= QINGLONG_FLUX_SHIFT_SHARE + QINGLONG_LOGSNR_SHARE
        t = torch.zeros((batch_size,), device=device)
        if flux.any():
            draw = (torch.randn(int(flux.sum()), device=device) * args.sigmoid_scale).sigmoid()
            t[flux] = _flux_shift(draw, flux_shift_mu(*latent_hw))
        if logsnr.any():
            t[logsnr] = _logsnr_t(args.logit_mean, args.logit_std, int(logsnr.sum()), device)
        if logsnr2.any():
            t[logsnr2] = _logsnr_t(QINGLONG_LOGSNR2_MEAN, QINGLONG_LOGSNR2_STD, int(logsnr2.sum()), device)
        return t
    raise ValueError(f"unknown --timestep_sampling {mode!r}")


def sigmas_for_timesteps(timesteps: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """σ of each timestep: the table entry equal to it, else the nearest one (first on ties), shape (B,)."""
    global _warned_off_table
    sigmas, table = schedule()
    timesteps = timesteps.to("cpu", torch.float32)
    distance = (table[None, :] - timesteps[:, None]).abs()
    if not bool((distance.min(dim=1).values == 0).all()) and not _warned_off_table:
        logger.warning("some timesteps are not in the 1000-step table; using the nearest entry for their sigma")
        _warned_off_table = True
    return sigmas[distance.argmin(dim=1)].to(device=device, dtype=dtype)


def noisy_model_input_and_timesteps(
    args: argparse.Namespace, noise: torch.Tensor, latents: torch.Tensor, device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, timesteps (B,) float32) for one batch; `dtype` is the DiT dtype σ is rounded to in the
    discrete mode, as in musubi-tuner."""
    batch_size = noise.shape[0]
    t_min, t_max = timestep_bounds(args)
    if args.timestep_sampling in CONTINUOUS_MODES:
        t = continuous_t(args, batch_size, tuple(latents.shape[-2:]), device)
        low, high = t_min / 1000.0, t_max / 1000.0
        t = t * (high - low) + low
        timesteps = t * 1000.0 + 1
        t = t.view(-1, *([1] * (latents.ndim - 1)))
        return (1 - t) * latents + t * noise, timesteps
    u = density_for_sigma_mode(args, batch_size)
    indices = (u * (t_max - t_min) + t_min).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    timesteps = schedule()[1][indices].to(device=device)
    sigmas = sigmas_for_timesteps(timesteps, device, dtype).view(-1, *([1] * (latents.ndim - 1)))
    return sigmas * noise + (1.0 - sigmas) * latents, timesteps


def fixed_timestep_input(
    noise: torch.Tensor, latents: torch.Tensor, timestep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, timesteps (B,) float32) at one given timestep for the whole batch: σ = timestep / 1000,
    the model fed `timestep` (the scale of the `sigma` mode)."""
    sigma = timestep / NUM_TRAIN_TIMESTEPS
    timesteps = torch.full((noise.shape[0],), float(timestep), device=noise.device)
    return sigma * noise + (1.0 - sigma) * latents, timesteps


def loss_weighting(scheme: str, timesteps: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-sample loss weight (B, 1, 1, 1, 1) for sigma_sqrt (σ⁻²) and cosmap (2 / (π(1 − 2σ + 2σ²))), else None."""
    if scheme not in ("sigma_sqrt", "cosmap"):
        return None
    sigmas = sigmas_for_timesteps(timesteps, device, dtype).view(-1, 1, 1, 1, 1)
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))


def show_timesteps(args: argparse.Namespace) -> None:
    """--show_timesteps: histogram of 100 000 sampled timesteps and the loss weighting per timestep."""
    samples, batch, width, per_line = 100_000, 1000, 64, 25
    latents = torch.zeros(batch, 1, 1, 1, 1, dtype=torch.float16)
    noise = torch.ones_like(latents)
    counts = [0] * NUM_TRAIN_TIMESTEPS
    for _ in range(samples // batch):
        noisy, _ = noisy_model_input_and_timesteps(args, noise, latents, "cpu", torch.float16)
        for value in (noisy[:, 0, 0, 0, 0].float() * 1000).tolist():
            counts[min(int(value), NUM_TRAIN_TIMESTEPS - 1)] += 1
    weights = []
    for i in range(NUM_TRAIN_TIMESTEPS):
        w = loss_weighting(args.weighting_scheme, torch.tensor([i + 1.0]), "cpu", torch.float16)
        weights.append(1.0 if w is None or torch.isinf(w).any() else float(w.flatten()[0]))
    if args.show_timesteps == "image":
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise SystemExit("--show_timesteps image needs matplotlib (pip install matplotlib); use console") from None
        plt.figure(figsize=(10, 5))
        for k, (values, title, ylabel) in enumerate(
            ((counts, "Sampled timesteps", "Count"), (weights, "Sampled loss weighting", "Weighting"))
        ):
            plt.subplot(1, 2, k + 1)
            plt.bar(range(len(values)), values, width=1.0)
            plt.title(title)
            plt.xlabel("Timestep")
            plt.ylabel(ylabel)
        plt.tight_layout()
        plt.show()
        return
    rows = [sum(counts[i : i + per_line]) / per_line for i in range(0, NUM_TRAIN_TIMESTEPS, per_line)]
    peak = max(rows)
    print(f"Sampled timesteps: max count={peak}")
    for i, value in enumerate(rows):
        print(f"{i * per_line:4d}-{(i + 1) * per_line - 1:4d}: " + "#" * int(value / peak * width))
    rows = [sum(weights[i : i + per_line]) / per_line for i in range(0, NUM_TRAIN_TIMESTEPS, per_line)]
    peak = max(rows)
    print(f"Sampled loss weighting: max weighting={peak}")
    for i, value in enumerate(rows):
        print(f"{i * per_line:4d}-{(i + 1) * per_line - 1:4d}: {value:8.2f} " + "#" * int(value / peak * width))
