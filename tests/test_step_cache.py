"""Step caches (MagCache, TeaCache): skip decisions on hand-built sequences, calibration, CFG branches, the DiT hook."""

import numpy as np
import pytest
import torch

from frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked
from frame_pack.magcache import (
    DEFAULT_MAG_RATIOS,
    MagCache,
    format_ratios,
    magcache_schedule,
    parse_mag_ratios,
    resample_ratios,
)
from frame_pack.sampling import flow_match_x0_model, sample_flow
from frame_pack.step_cache import BranchedCache, StepCacheSettings, format_steps, step_cache_on
from frame_pack.teacache import TeaCache
from tests.factory.dit import tiny_dit_config, tiny_dit_state_dict

T, F = True, False


def drive(cache, probes=None, residuals=None):
    """Run `cache` through its steps like the DiT does; returns the decisions."""
    decisions = []
    for step in range(cache.num_steps):
        probe = probes[step] if probes is not None else torch.zeros(1)
        compute = cache.should_compute(lambda probe=probe: probe)
        if compute:
            cache.record(residuals[step] if residuals is not None else torch.zeros(1))
        decisions.append(compute)
    return decisions


def test_magcache_decisions_on_hand_built_residual_magnitudes():
    # residual norms grow by these factors from step to step; the calibration measures exactly them
    ratios = [1.0, 1.3, 1.02, 1.02, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    direction = torch.randn(4, 6, 8)
    residuals = [direction * float(np.prod(ratios[: i + 1])) for i in range(len(ratios))]
    calibration = MagCache(len(ratios), calibration=True)
    assert drive(calibration, residuals=residuals) == [T] * len(ratios)
    measured = calibration.calibration_ratios()
    assert len(measured) == len(ratios)
    assert measured == pytest.approx(ratios, abs=1e-5)

    # retention 0.2 of 10 steps: steps 0, 1 compute. Then, with threshold 0.1 and K 2:
    # step 2: product 1.02, error 0.02 -> skip; step 3: 1.0404, error 0.0604 -> skip;
    # step 4: 1.5606, error 0.62 > 0.1 -> compute, restart; steps 5, 6: error 0, 1-2 skipped -> skip;
    # step 7: 3 in a row > K -> compute, restart; step 8 -> skip; step 9 is the last -> compute.
    expected = [T, T, F, F, T, F, F, T, F, T]
    assert magcache_schedule(measured, retention_ratio=0.2, threshold=0.1, k=2) == expected
    fed_back = MagCache(len(ratios), measured, retention_ratio=0.2, threshold=0.1, k=2)
    assert drive(fed_back, residuals=residuals) == expected
    assert fed_back.summary() == "the blocks ran on 5 of 10 steps (skipped steps 2-3, 5-6, 8)"


def test_magcache_default_ratios_resample_to_25_steps_and_skip_more_than_half():
    assert len(DEFAULT_MAG_RATIOS) == 50
    assert resample_ratios(DEFAULT_MAG_RATIOS, 50) == DEFAULT_MAG_RATIOS
    ratios = resample_ratios(DEFAULT_MAG_RATIOS, 25)
    # index round(i * 49/24) with round-half-even
    assert [DEFAULT_MAG_RATIOS.index(r) for r in ratios[:4]] == [0, 2, 4, 6]
    assert ratios[-1] == DEFAULT_MAG_RATIOS[-1]
    schedule = MagCache(25).schedule
    assert schedule == magcache_schedule(ratios, 0.2, 0.24, 6)
    assert schedule[:5] == [T] * 5  # int(0.2 * 25) retained steps
    assert sum(schedule) == 10  # 2.5x fewer block evaluations at the defaults
    assert resample_ratios([1.0, 2.0, 3.0], 1) == (3.0,)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_first_and_last_steps_always_compute(steps):
    greedy = [
        MagCache(steps, [1.0] * steps, retention_ratio=0.0, threshold=1e9, k=10**9),
        TeaCache(steps, threshold=1e9),
    ]
    for cache in greedy:
        decisions = drive(cache, probes=[torch.full((3,), 1.0 + s) for s in range(steps)])
        assert decisions[0] and decisions[-1]
        assert not any(decisions[1:-1])


def test_teacache_decisions_on_hand_built_input_changes():
    # every step's modulated input is 10% larger than the previous one: relative L1 change 0.1
    coefficients = (7.33226126e2, -4.01131952e2, 6.75869174e1, -3.14987800, 9.61237896e-2)
    estimate = sum(c * 0.1 ** (4 - i) for i, c in enumerate(coefficients))  # ≈ 0.129 per step
    assert 0.1 < estimate < 0.2 < 2 * estimate
    probes = [torch.full((2, 5), 1.1**s) for s in range(8)]
    # threshold 0.2: one step accumulates 0.129 (skip), the next 0.258 (compute, restart)
    assert drive(TeaCache(8, threshold=0.2), probes=probes) == [T, F, T, F, T, F, T, T]
    assert drive(TeaCache(8, threshold=0.0), probes=probes) == [T] * 8
    cache = TeaCache(8, threshold=0.2)
    drive(cache, probes=probes)
    assert cache.accumulated == 0.0  # the last step restarted the sum


def test_more_calls_than_steps_is_an_error():
    cache = TeaCache(2)
    drive(cache, probes=[torch.ones(1), torch.ones(1)])
    with pytest.raises(RuntimeError, match="model call 3 in a run of 2 steps"):
        cache.should_compute(lambda: torch.ones(1))


def test_cfg_branches_keep_separate_residuals_and_decisions():
    cache = StepCacheSettings(magcache_ratios=(1.0,) * 6, magcache_retention_ratio=0.0).build(6, branches=2)
    assert isinstance(cache, BranchedCache)
    applied = []
    for step in range(6):
        for branch in (0, 1):  # positive then negative, as the sampler calls them
            if cache.should_compute(lambda: torch.zeros(1)):
                cache.record(torch.tensor([100.0 * branch + step]))  # tag: branch and step of the residual
            else:
                applied.append((branch, cache.apply(torch.zeros(1)).item()))
    assert cache.caches[0].computed == cache.caches[1].computed == [T, F, F, F, F, T]
    assert cache.computed == [T, T] + [F, F] * 4 + [T, T]
    assert applied == [(0, 0.0), (1, 100.0)] * 4  # each branch reuses its own step-0 residual
    assert cache.summary() == (
        "positive branch: the blocks ran on 2 of 6 steps (skipped steps 1-4); "
        "negative branch: the blocks ran on 2 of 6 steps (skipped steps 1-4)"
    )


def test_settings_parse_and_refuse_bad_values():
    assert parse_mag_ratios("0") == ()
    assert parse_mag_ratios("1.0,1.05") == (1.0, 1.05)
    assert parse_mag_ratios(format_ratios((1.0, 1.234567))) == (1.0, 1.23457)
    with pytest.raises(ValueError, match="--magcache_mag_ratios"):
        parse_mag_ratios("1.0,abc")
    with pytest.raises(ValueError, match="choose one"):
        StepCacheSettings(teacache_threshold=0.1, magcache_ratios=()).validate()
    with pytest.raises(ValueError, match="--magcache_retention_ratio"):
        StepCacheSettings(magcache_ratios=(), magcache_retention_ratio=1.5).validate()
    assert StepCacheSettings().build(5) is None
    assert format_steps([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


# ---- the DiT hook ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dit():
    config = tiny_dit_config()
    model = HunyuanVideoTransformer3DModelPacked(config)
    model.load_state_dict(tiny_dit_state_dict(0, config))
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def section_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16

    def text(n):
        return {
            "encoder_hidden_states": torch.randn(1, n, 128, generator=gen).to(bf),
            "encoder_attention_mask": torch.ones(1, n, dtype=torch.bool),
            "pooled_projections": torch.randn(1, 64, generator=gen).to(bf),
        }

    shared = {
        "image_embeddings": torch.randn(1, 5, 72, generator=gen).to(bf),
        "latent_indices": torch.arange(1, 4)[None],
        "clean_latents": torch.randn(1, 16, 2, 4, 6, generator=gen),
        "clean_latent_indices": torch.tensor([[0, 4]]),
    }
    return torch.randn(1, 16, 3, 4, 6, generator=gen), text(6), text(4), shared


def sample(dit, cache=None, guidance_scale=1.0, steps=8):
    noise, positive, negative, shared = section_inputs()
    model_x0 = flow_match_x0_model(dit, positive, negative, shared=shared, guidance_scale=guidance_scale)
    with torch.no_grad(), step_cache_on(dit, cache):
        out = sample_flow(model_x0, noise, steps, disable=True)
    assert dit.step_cache is None
    return out


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_caches_that_never_skip_are_bit_identical_to_no_cache(tiny_dit, guidance_scale):
    branches = 1 if guidance_scale == 1.0 else 2
    base = sample(tiny_dit, guidance_scale=guidance_scale)
    never = [
        StepCacheSettings(teacache_threshold=0.0).build(8, branches),
        StepCacheSettings(magcache_ratios=(), magcache_k=0).build(8, branches),
        StepCacheSettings(magcache_calibration=True).build(8, branches),
    ]
    for cache in never:
        assert torch.equal(sample(tiny_dit, cache, guidance_scale), base)
        assert all(cache.computed)


def test_skipped_steps_add_the_recorded_residual(tiny_dit, monkeypatch):
    base = sample(tiny_dit)
    cache = StepCacheSettings(magcache_ratios=()).build(8)
    blocks_run = []
    original = HunyuanVideoTransformer3DModelPacked._run_blocks
    monkeypatch.setattr(
        HunyuanVideoTransformer3DModelPacked,
        "_run_blocks",
        lambda self, *a: blocks_run.append(1) or original(self, *a),
    )
    cached = sample(tiny_dit, cache)
    assert len(blocks_run) == sum(cache.computed) == sum(MagCache(8).schedule) < 8
    assert torch.isfinite(cached).all() and not torch.equal(cached, base)
    rel = ((cached - base).norm() / base.norm()).item()
    assert rel < 0.5  # reused residuals approximate the skipped blocks


def test_calibration_on_the_dit_gives_one_ratio_per_step_and_feeding_it_back_repeats_its_decisions(tiny_dit):
    calibration = StepCacheSettings(magcache_calibration=True).build(8)
    sample(tiny_dit, calibration)
    ratios = calibration.calibration_ratios()
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    settings = StepCacheSettings(magcache_ratios=parse_mag_ratios(format_ratios(ratios)), magcache_threshold=0.5)
    fed_back = settings.build(8)
    sample(tiny_dit, fed_back)
    assert fed_back.computed == magcache_schedule(ratios, 0.2, 0.5, 6)
    again = StepCacheSettings(magcache_calibration=True).build(8)
    sample(tiny_dit, again)
    assert again.calibration_ratios() == ratios  # deterministic
