"""Flow-matching sampling for FramePack: initial noise, flux time-shift schedule, x0 wrapper, UniPC (bh1).

k-diffusion conventions: a model callable ``model_x0(x, sigma) -> x0`` where ``sigma`` has shape (B,), and a sigma
schedule ``sigmas`` of length steps+1 that decreases from 1 to 0. The network predicts the flow velocity
v = noise - x0 for x_sigma = (1 - sigma) * x0 + sigma * noise, so x0 = x_sigma - sigma * v.

Numerics follow musubi-tuner exactly (so a shared seed gives the same video): noise, schedule and solver state in
fp32; network input, timestep and distilled guidance rounded to the model dtype (bf16); network output in fp32.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import trange

from hunyuan_model.frame_math import LATENT_CHANNELS, latent_frames, latent_size

# Flux mu line through (FLUX_MU_X1, FLUX_MU_Y1) and (FLUX_MU_X2, FLUX_MU_Y2), capped at ln(FLUX_SHIFT_MAX).
FLUX_MU_X1, FLUX_MU_Y1 = 256, 0.5
FLUX_MU_X2, FLUX_MU_Y2 = 4096, 1.15
FLUX_SHIFT_MAX = 7.0
FLUX_SIGMA_EXPONENT = 1.0

T_SCALE = 1000.0  # sigma -> model timestep; also the distilled-guidance multiplier
MAX_INFER_STEPS = 1000  # the model was trained on 1000 timesteps: more steps than that only repeat them
UNIPC_MAX_ORDER = 3
UNIPC_VARIANTS = ("bh1", "bh2")

SAMPLE_SOLVERS = ("unipc", "dpm++", "vanilla")  # accepted by musubi-tuner's parser
IMPLEMENTED_SAMPLE_SOLVERS = ("unipc",)

ModelX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------- solver choice


def validate_sample_solver(name: str) -> str:
    """Return ``name`` if it is an implemented solver; raise ValueError otherwise (scripts call this at parse time)."""
    if name not in IMPLEMENTED_SAMPLE_SOLVERS:
        known = "accepted by musubi-tuner but not implemented" if name in SAMPLE_SOLVERS else "unknown"
        raise ValueError(f"sample solver {name!r} is {known}; implemented: {', '.join(IMPLEMENTED_SAMPLE_SOLVERS)}")
    return name


def sample_solver_arg(name: str) -> str:
    """argparse ``type=`` for ``--sample_solver``: refuses unimplemented solvers with a readable message."""
    try:
        return validate_sample_solver(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------------------------------- noise


def make_generator(seed: int) -> torch.Generator:
    """The one CPU generator of a generation; every section draws its noise from it in generation order."""
    return torch.Generator(device="cpu").manual_seed(seed)


def initial_noise(
    generator: torch.Generator,
    frames: int,
    height: int,
    width: int,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One section's starting noise: randn (B, 16, (frames+3)//4, height/8, width/8) fp32 drawn on the CPU.

    ``height`` and ``width`` are pixel sizes. Drawn on the generator's device (CPU) and only then moved, so the
    values do not depend on ``device``.
    """
    shape = (
        batch_size,
        LATENT_CHANNELS,
        latent_frames(frames),
        *latent_size(height, width),
    )
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=device) if device is not None else noise


# ------------------------------------------------------------------------------------------------- schedule


def noisy_token_count(latent_shape: Sequence[int]) -> int:
    """seq_len for the mu rule: T*h*w // 4 of the noisy latent (B, C, T, h, w); clean latents do not count."""
    t, h, w = latent_shape[-3:]
    return t * h * w // 4


def flux_mu(seq_len: int) -> float:
    """Flux shift parameter: linear in seq_len through (256, 0.5) and (4096, 1.15), capped at ln 7."""
    k = (FLUX_MU_Y2 - FLUX_MU_Y1) / (FLUX_MU_X2 - FLUX_MU_X1)
    b = FLUX_MU_Y1 - k * FLUX_MU_X1
    return min(k * seq_len + b, math.log(FLUX_SHIFT_MAX))


def flux_time_shift(t: torch.Tensor, mu: float, exponent: float = FLUX_SIGMA_EXPONENT) -> torch.Tensor:
    """sigma(t) = e^mu / (e^mu + (1/t - 1)^exponent); t = 0 gives 0 (1/0 = inf)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** exponent)


def flux_sigmas(steps: int, mu: float) -> torch.Tensor:
    """fp32 schedule of length steps+1: time shift of linspace(1, 0); sigma_0 = 1, sigma_steps = 0."""
    return flux_time_shift(torch.linspace(1, 0, steps + 1, dtype=torch.float32), mu)


# ------------------------------------------------------------------------------------------------- model wrapper


def rescale_guidance(v_cfg: torch.Tensor, v_pos: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """CFG rescale: r * v_cfg * std(v_pos)/std(v_cfg) + (1 - r) * v_cfg, std per sample over non-batch dims."""
    if guidance_rescale == 0:
        return v_cfg
    dims = list(range(1, v_pos.ndim))
    std_pos = v_pos.std(dim=dims, keepdim=True)
    std_cfg = v_cfg.std(dim=dims, keepdim=True)
    return guidance_rescale * (v_cfg * (std_pos / std_cfg)) + (1.0 - guidance_rescale) * v_cfg


def distilled_guidance(scale: float, batch_size: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(B,) guidance input: scale * 1000 rounded to ``dtype`` (bf16: 10.0 -> 9984)."""
    return torch.tensor([scale * T_SCALE] * batch_size, dtype=torch.float32).to(device=device, dtype=dtype)


def _first_output(out: Any) -> torch.Tensor:
    """Accept a tensor, a (tensor, ...) tuple or an object with ``.sample`` as the network's velocity."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "sample", out)


def flow_match_x0_model(
    model: Callable[..., Any],
    positive: Mapping[str, Any],
    negative: Mapping[str, Any] | None = None,
    *,
    shared: Mapping[str, Any] | None = None,
    embedded_cfg_scale: float = 10.0,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    dtype: torch.dtype = torch.bfloat16,
) -> ModelX0:
    """Wrap a velocity network as ``model_x0(x, sigma)`` (fp32 in, fp32 x0 out).

    ``positive`` / ``negative``: text conditioning kwargs (encoder_hidden_states, encoder_attention_mask,
    pooled_projections). ``shared``: kwargs identical for both calls (image_embeddings, latent_indices, clean
    latents and their indices). The network is called as ``model(hidden_states=, timestep=, guidance=, **text,
    **shared)``; the negative call happens only when ``guidance_scale != 1``.

    As in musubi-tuner, x0 is computed from the model-dtype copy of x: x0 = float(bf16(x)) - v * sigma.
    """
    shared = dict(shared or {})
    if guidance_scale != 1.0 and negative is None:
        raise ValueError("guidance_scale != 1 needs negative conditioning")

    def velocity(x_in, timestep, guidance, text):
        return _first_output(model(hidden_states=x_in, timestep=timestep, guidance=guidance, **text, **shared)).float()

    def model_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.float()
        x_in = x.to(dtype)
        timestep = (sigma * T_SCALE).to(dtype)
        guidance = distilled_guidance(embedded_cfg_scale, x.shape[0], dtype, x.device)
        v_pos = velocity(x_in, timestep, guidance, positive)
        if guidance_scale == 1.0:
            v_neg = torch.zeros_like(v_pos)
        else:
            v_neg = velocity(x_in, timestep, guidance, negative)
        v = rescale_guidance(v_neg + guidance_scale * (v_pos - v_neg), v_pos, guidance_rescale)
        x0 = x_in.float() - v * sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x0.to(x.dtype)

    return model_x0


# ------------------------------------------------------------------------------------------------- UniPC


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims in total."""
    return v[(...,) + (None,) * (ndim - 1)]


def unipc_coefficients(
    rks: torch.Tensor, hh: torch.Tensor, order: int, variant: str = "bh1"
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Predictor and corrector weights of a UniPC step.

    rks: (order,) = [r_1 .. r_{order-1}, 1] step ratios in lambda = -ln(sigma); hh = -h (0-d).
    Returns (rhos_p or None, rhos_c, B_h); rhos_p has order-1 entries, rhos_c has order entries.
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"UniPC variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
    h_phi_k = torch.expm1(hh) / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    factorial = 1
    rows, b = [], []
    for j in range(1, order + 1):
        rows.append(torch.pow(rks, j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.stack(rows)  # (order, order)
    b = torch.tensor(b, dtype=rks.dtype, device=rks.device)  # (order,)

    if order == 1:
        rhos_p = None
    elif order == 2:
        rhos_p = torch.tensor([0.5], dtype=b.dtype, device=b.device)
    else:
        rhos_p = torch.linalg.solve(r[:-1, :-1], b[:-1])
    rhos_c = torch.tensor([0.5], dtype=b.dtype, device=b.device) if order == 1 else torch.linalg.solve(r, b)
    return rhos_p, rhos_c, b_h


def unipc_update(
    model_x0: ModelX0,
    x: torch.Tensor,
    model_outputs: Sequence[torch.Tensor],
    sigma_history: Sequence[torch.Tensor],
    sigma: torch.Tensor,
    order: int,
    variant: str = "bh1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One predictor-corrector step from sigma_history[-1] to ``sigma`` (both (B,)); returns (x_new, m(x_pred))."""
    sigma_prev = sigma_history[-1]
    m_prev = model_outputs[-1]
    lambda_prev = -torch.log(sigma_prev)
    h = -torch.log(sigma) - lambda_prev

    rks, differences = [], []  # D_k = (m_{-(k+1)} - m_prev) / r_k
    for k in range(1, order):
        rk = ((-torch.log(sigma_history[-(k + 1)]) - lambda_prev) / h)[0]
        rks.append(rk)
        differences.append((model_outputs[-(k + 1)] - m_prev) / rk)
    rks.append(1.0)
    rks = torch.tensor(rks, dtype=x.dtype, device=x.device)

    hh = -h[0]
    rhos_p, rhos_c, b_h = unipc_coefficients(rks, hh, order, variant)
    d = torch.stack(differences, dim=1) if differences else None  # (B, order-1, C, T, h, w)

    x_linear = _per_sample(sigma / sigma_prev, x.ndim) * x - torch.expm1(hh) * m_prev
    predictor = torch.tensordot(d, rhos_p, dims=([1], [0])) if d is not None else 0
    m_t = model_x0(x_linear - b_h * predictor, sigma)

    corrector = torch.tensordot(d, rhos_c[:-1], dims=([1], [0])) if d is not None else 0
    x_new = x_linear - b_h * (corrector + rhos_c[-1] * (m_t - m_prev))
    return x_new, m_t


@torch.no_grad()
def sample_unipc(
    model_x0: ModelX0,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
    variant: str = "bh1",
) -> torch.Tensor:
    """Flow-matching UniPC ("Better Flow Matching UniPC", bh1 by default) from sigmas[0] down to sigmas[-1].

    n = len(sigmas) - 1 model evaluations; order = min(3, n - 1) with warm-up orders 1, 2. Returns the last x0
    prediction (made at sigmas[n-1]); sigmas[n] = 0 is never evaluated and the final corrected x is discarded.
    ``callback`` receives {"x", "i", "sigma", "denoised"} after every step.
    """
    steps = len(sigmas) - 1
    order = min(UNIPC_MAX_ORDER, steps - 1)
    keep = max(order, 1)
    x = noise
    model_outputs: list[torch.Tensor] = []
    sigma_history: list[torch.Tensor] = []
    for i in trange(steps, disable=disable, desc="Sampling"):
        sigma = sigmas[i].expand(x.shape[0])
        if i == 0:
            m = model_x0(x, sigma)
        else:
            x, m = unipc_update(model_x0, x, model_outputs, sigma_history, sigma, min(i, order), variant)
        model_outputs = (model_outputs + [m])[-keep:]
        sigma_history = (sigma_history + [sigma])[-keep:]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": m})
    return model_outputs[-1]


SOLVER_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"unipc": sample_unipc}


def sample_flow(
    model_x0: ModelX0,
    noise: torch.Tensor,
    steps: int,
    sample_solver: str = "unipc",
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
) -> torch.Tensor:
    """Sample one section: flux schedule with mu from the noise's token count, then the chosen solver."""
    validate_sample_solver(sample_solver)
    sigmas = flux_sigmas(steps, flux_mu(noisy_token_count(noise.shape))).to(noise.device)
    return SOLVER_FUNCTIONS[sample_solver](model_x0, noise, sigmas, callback=callback, disable=disable)
