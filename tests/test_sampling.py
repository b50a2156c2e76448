import argparse
import math

import pytest
import torch

from frame_pack import sampling
from frame_pack.sampling import (
    IMPLEMENTED_SAMPLE_SOLVERS,
    SAMPLE_SOLVERS,
    distilled_guidance,
    flow_match_x0_model,
    flux_mu,
    flux_sigmas,
    initial_noise,
    make_generator,
    noisy_token_count,
    rescale_guidance,
    sample_flow,
    sample_solver_arg,
    sample_unipc,
    validate_sample_solver,
)

# ---------------------------------------------------------------------------------------------- schedule


def test_flux_mu_examples():
    assert noisy_token_count((1, 16, 9, 32, 32)) == 2304
    assert flux_mu(2304) == pytest.approx(0.846667, abs=1e-6)  # 256x256, T=9
    assert noisy_token_count((1, 16, 9, 80, 80)) == 14400
    assert flux_mu(14400) == pytest.approx(math.log(7), abs=1e-12)  # 640x640 T=9: capped
    assert flux_mu(noisy_token_count((1, 16, 1, 104, 60))) == pytest.approx(0.720729, abs=1e-6)  # 832x480 T=1
    assert flux_mu(noisy_token_count((1, 16, 1, 80, 80))) == pytest.approx(0.7275, abs=1e-12)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


def test_flux_sigmas_256():
    sigmas = flux_sigmas(25, flux_mu(2304))
    assert sigmas.dtype == torch.float32 and sigmas.shape == (26,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    expected_head = [1.0, 0.98245, 0.96405, 0.94475]
    assert sigmas[:4].tolist() == pytest.approx(expected_head, abs=1e-5)
    assert sigmas[-3:].tolist() == pytest.approx([0.16859, 0.08856, 0.0], abs=1e-5)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_flux_sigmas_640_clipped():
    sigmas = flux_sigmas(25, flux_mu(14400))
    assert sigmas[:4].tolist() == pytest.approx([1.0, 0.99408, 0.98773, 0.98089], abs=1e-5)
    assert sigmas[-3:].tolist() == pytest.approx([0.37838, 0.22581, 0.0], abs=1e-5)


# ---------------------------------------------------------------------------------------------- noise


def test_initial_noise_shape_and_draw_order():
    g = make_generator(1234)
    first = initial_noise(g, 33, 256, 256)
    second = initial_noise(g, 33, 256, 256)
    assert first.shape == (1, 16, 9, 32, 32) and first.dtype == torch.float32
    reference = torch.Generator("cpu").manual_seed(1234)
    assert torch.equal(first, torch.randn((1, 16, 9, 32, 32), generator=reference))
    assert torch.equal(second, torch.randn((1, 16, 9, 32, 32), generator=reference))
    assert initial_noise(make_generator(0), 1, 64, 128).shape == (1, 16, 1, 8, 16)  # one-frame mode


# ---------------------------------------------------------------------------------------------- solver choice


def test_solver_validation():
    assert SAMPLE_SOLVERS == ("unipc", "dpm++", "vanilla")
    assert IMPLEMENTED_SAMPLE_SOLVERS == ("unipc",)
    assert validate_sample_solver("unipc") == "unipc"
    with pytest.raises(ValueError, match="not implemented"):
        validate_sample_solver("dpm++")
    with pytest.raises(ValueError, match="unknown"):
        validate_sample_solver("euler")

    parser = argparse.ArgumentParser()
    parser.add_argument("--sample_solver", type=sample_solver_arg, default="unipc", choices=SAMPLE_SOLVERS)
    assert parser.parse_args(["--sample_solver", "unipc"]).sample_solver == "unipc"
    with pytest.raises(SystemExit):
        parser.parse_args(["--sample_solver", "vanilla"])


# ---------------------------------------------------------------------------------------------- model wrapper


def test_bf16_rounding_of_guidance_and_timestep():
    g = distilled_guidance(10.0, 2, torch.bfloat16)
    assert g.dtype == torch.bfloat16 and g.tolist() == [9984.0, 9984.0]
    assert distilled_guidance(6.0, 1, torch.bfloat16).item() == 6016.0
    assert distilled_guidance(5.0, 1, torch.bfloat16).item() == 4992.0
    assert distilled_guidance(3.0, 1, torch.bfloat16).item() == 3008.0
    assert distilled_guidance(1.0, 1, torch.bfloat16).item() == 1000.0


class RecordingModel:
    """Velocity network stand-in: v = 0.5 * x + offset, offset taken from the text conditioning."""

    def __init__(self):
        self.calls = []

    def __call__(self, hidden_states, timestep, guidance, encoder_hidden_states, **kwargs):
        self.calls.append(
            dict(
                hidden_states=hidden_states,
                timestep=timestep,
                guidance=guidance,
                text=encoder_hidden_states,
                kwargs=kwargs,
            )
        )
        return (0.5 * hidden_states + encoder_hidden_states.to(hidden_states.dtype),)


def _conditioning(value):
    return {
        "encoder_hidden_states": torch.full((1, 1, 1, 1, 1), value),
        "pooled_projections": None,
        "encoder_attention_mask": None,
    }


def test_wrapper_single_call_without_cfg():
    model = RecordingModel()
    shared = {"latent_indices": torch.arange(9).unsqueeze(0)}
    x0_model = flow_match_x0_model(model, _conditioning(1.0), _conditioning(-1.0), shared=shared)
    x = torch.randn(1, 16, 2, 4, 4)
    sigma = torch.tensor([0.98773])
    x0 = x0_model(x, sigma)

    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["hidden_states"].dtype == torch.bfloat16
    assert call["timestep"].dtype == torch.bfloat16 and call["timestep"].item() == 988.0
    assert call["guidance"].item() == 9984.0
    assert call["text"].item() == 1.0 and call["kwargs"]["latent_indices"] is shared["latent_indices"]
    assert x0.dtype == torch.float32
    x_in = x.to(torch.bfloat16)
    v = (0.5 * x_in + 1.0).float()
    assert torch.equal(x0, x_in.float() - v * 0.98773)


def test_wrapper_real_cfg_calls_twice():
    model = RecordingModel()
    x0_model = flow_match_x0_model(model, _conditioning(1.0), _conditioning(-1.0), guidance_scale=3.0)
    x = torch.randn(1, 16, 1, 4, 4)
    x0 = x0_model(x, torch.tensor([0.5]))
    assert len(model.calls) == 2
    assert [c["text"].item() for c in model.calls] == [1.0, -1.0]
    x_in = x.to(torch.bfloat16)
    v_pos, v_neg = (0.5 * x_in + 1.0).float(), (0.5 * x_in - 1.0).float()
    expected = x_in.float() - (v_neg + 3.0 * (v_pos - v_neg)) * 0.5
    assert torch.allclose(x0, expected)


def test_wrapper_needs_negative_for_cfg():
    with pytest.raises(ValueError):
        flow_match_x0_model(RecordingModel(), _conditioning(1.0), None, guidance_scale=2.0)


def test_guidance_rescale_formula():
    torch.manual_seed(0)
    v_pos = torch.randn(2, 16, 3, 4, 4)
    v_cfg = 3.0 * torch.randn(2, 16, 3, 4, 4)
    assert rescale_guidance(v_cfg, v_pos, 0.0) is v_cfg
    out = rescale_guidance(v_cfg, v_pos, 0.7)
    for b in range(2):
        ratio = v_pos[b].std() / v_cfg[b].std()
        expected = 0.7 * v_cfg[b] * ratio + 0.3 * v_cfg[b]
        assert torch.allclose(out[b], expected, atol=1e-6)
    # full rescale gives the positive prediction's spread
    assert torch.allclose(rescale_guidance(v_cfg, v_pos, 1.0).std(dim=(1, 2, 3, 4)), v_pos.std(dim=(1, 2, 3, 4)))


def test_model_call_counts_per_step():
    for cfg, calls_per_step in ((1.0, 1), (2.5, 2)):
        model = RecordingModel()
        x0_model = flow_match_x0_model(model, _conditioning(0.1), _conditioning(0.0), guidance_scale=cfg)
        noise = initial_noise(make_generator(0), 33, 32, 32)
        sample_flow(x0_model, noise, steps=6, disable=True)
        assert len(model.calls) == 6 * calls_per_step


# ---------------------------------------------------------------------------------------------- UniPC

DATA_MEAN, DATA_STD = 0.3, 0.5


def gaussian_x0(x, sigma):
    """Exact E[x0 | x_sigma] for x0 ~ N(DATA_MEAN, DATA_STD^2) per element and x_sigma = (1-s) x0 + s eps."""
    s = sigma.reshape(-1, 1, 1, 1, 1).to(x.dtype)
    variance = (1 - s) ** 2 * DATA_STD**2 + s**2
    return DATA_MEAN + (1 - s) * DATA_STD**2 / variance * (x - (1 - s) * DATA_MEAN)


def exact_gaussian_x0(noise, sigma):
    """x0 prediction on the exact flow trajectory started from ``noise`` at sigma = 1."""
    spread = math.sqrt((1 - sigma) ** 2 * DATA_STD**2 + sigma**2)
    return DATA_MEAN + (1 - sigma) * DATA_STD**2 / spread * noise


def log_uniform_sigmas(steps, last_sigma):
    """Evaluation sigmas uniform in lambda = -ln(sigma) from 1 to ``last_sigma``, then the final 0."""
    return torch.cat([torch.logspace(0, math.log10(last_sigma), steps), torch.zeros(1)])


def test_unipc_matches_exact_flow_and_converges():
    noise = initial_noise(make_generator(3), 1, 128, 128)  # (1, 16, 1, 16, 16)
    target = exact_gaussian_x0(noise, 0.05)
    errors = []
    for steps in (8, 16, 32):
        out = sample_unipc(gaussian_x0, noise, log_uniform_sigmas(steps, 0.05), disable=True)
        errors.append((out - target).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[2] > 3  # at least second order
    assert errors[2] < 3e-4


def test_unipc_on_flux_schedule_close_to_exact():
    noise = initial_noise(make_generator(4), 33, 64, 64)
    sigmas = flux_sigmas(25, flux_mu(noisy_token_count(noise.shape)))
    out = sample_unipc(gaussian_x0, noise, sigmas, disable=True)
    target = exact_gaussian_x0(noise, sigmas[-2].item())
    assert (out - target).abs().mean().item() < 1e-2


def test_unipc_constant_prediction_is_exact():
    """With a constant x0 prediction all differences vanish and each step is the exact flow update."""
    c = torch.full((1, 16, 1, 2, 2), 0.25)
    noise = initial_noise(make_generator(5), 1, 16, 16)
    sigmas = flux_sigmas(10, 0.9)
    seen = []
    sample_unipc(lambda x, s: c.expand_as(x), noise, sigmas, disable=True, callback=seen.append)
    for step in seen[1:]:
        s = step["sigma"].item()
        assert torch.allclose(step["x"], s * noise + (1 - s) * c, atol=1e-5)


def test_unipc_bookkeeping():
    evaluated = []
    outputs = []

    def model(x, sigma):
        evaluated.append(sigma.clone())
        out = 0.9 * x
        outputs.append(out)
        return out

    noise = torch.randn(2, 16, 1, 2, 2)
    sigmas = flux_sigmas(7, 0.8)
    steps_seen = []
    result = sample_unipc(model, noise, sigmas, disable=True, callback=lambda d: steps_seen.append(d["i"]))
    assert len(evaluated) == 7 and steps_seen == list(range(7))
    assert all(s.shape == (2,) for s in evaluated)
    assert [s[0].item() for s in evaluated] == sigmas[:-1].tolist()  # sigma_n = 0 never evaluated
    assert result is outputs[-1]


def test_unipc_two_steps_is_first_order():
    """n = 2: one order-1 step; the result is the model at the linear (exact-for-constant-x0) point."""
    model = lambda x, s: torch.tanh(x) * (1 - s.reshape(-1, 1, 1, 1, 1))  # noqa: E731
    noise = torch.randn(1, 16, 1, 3, 3)
    sigmas = torch.tensor([1.0, 0.4, 0.0])
    m0 = model(noise, sigmas[:1])
    x_lin = 0.4 * noise + 0.6 * m0
    assert torch.allclose(sample_unipc(model, noise, sigmas, disable=True), model(x_lin, sigmas[1:2]), atol=1e-6)


def test_unipc_single_step():
    noise = torch.randn(1, 16, 1, 2, 2)
    out = sample_unipc(lambda x, s: x * 0 + 1.0, noise, flux_sigmas(1, 0.5), disable=True)
    assert torch.equal(out, torch.ones_like(noise))


def test_unipc_variant_check():
    with pytest.raises(ValueError):
        sampling.unipc_coefficients(torch.ones(1), torch.tensor(-0.5), 1, variant="bh3")
