"""MagCache for the packed DiT (`--magcache_*`): skip the blocks while the residual's magnitude is predictable.

The blocks' residual (output minus input image tokens) changes its norm from step to step by a ratio that depends on
the model and the schedule, not on the prompt. With the ratio of each step known (`mag_ratios[t]` ≈ ‖r_t‖ / ‖r_t-1‖),
MagCache multiplies the ratios of the steps it skips; the error of reusing the cached residual is taken as
|1 - product| and summed. A step reuses the cached residual while the summed error stays within `threshold` and at
most `k` steps in a row were skipped; otherwise it computes and the sums restart. Steps before
`max(int(retention_ratio · steps), 1)` and the last step always compute.

Calibration (`--magcache_calibration`) runs every step and measures the ratios (mean over tokens of the per-token
norm ratio, rounded to 5 decimals), so they can be passed back with `--magcache_mag_ratios` for that model and
step count. Ratios of another length are resampled to the step count by nearest index.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from frame_pack.step_cache import ModulatedInput, StepCache

logger = logging.getLogger(__name__)

# Residual norm ratios measured by MagCache's authors on HunyuanVideo for 50 steps (the first entry is 1 by
# definition). Used when `--magcache_mag_ratios 0` is given.
DEFAULT_MAG_RATIOS = (
    1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632,
    1.02974, 1.00984, 1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726,
    1.03727, 1.01502, 1.00992, 1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461,
    1.01152, 1.03082, 1.0061, 1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947, 1.01711,
    0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154, 0.86139, 0.76592,
)  # fmt: skip
DEFAULT_RETENTION_RATIO = 0.2
DEFAULT_THRESHOLD = 0.24
DEFAULT_K = 6
RATIO_DECIMALS = 5


def resample_ratios(ratios: Sequence[float], num_steps: int) -> tuple[float, ...]:
    """Nearest-index resampling to `num_steps` entries: index round(i · (n-1)/(steps-1)), numpy's round-half-even.

    One step takes the last ratio.
    """
    if num_steps == 1:
        return (float(ratios[-1]),)
    scale = (len(ratios) - 1) / (num_steps - 1)
    indices = np.round(np.arange(num_steps) * scale).astype(int)
    return tuple(float(ratios[i]) for i in indices)


def first_cached_step(num_steps: int, retention_ratio: float) -> int:
    return max(int(retention_ratio * num_steps), 1)


def magcache_schedule(
    ratios: Sequence[float],
    retention_ratio: float = DEFAULT_RETENTION_RATIO,
    threshold: float = DEFAULT_THRESHOLD,
    k: int = DEFAULT_K,
) -> list[bool]:
    """Which of the len(ratios) steps run the blocks; the decisions depend on the ratios only."""
    num_steps = len(ratios)
    start = first_cached_step(num_steps, retention_ratio)
    product, error, skipped = 1.0, 0.0, 0
    computed = []
    for step, ratio in enumerate(ratios):
        compute = True
        if start <= step < num_steps - 1:
            product *= ratio
            error += abs(1.0 - product)
            skipped += 1
            if error <= threshold and skipped <= k:
                compute = False
            else:
                product, error, skipped = 1.0, 0.0, 0
        computed.append(compute)
    return computed


def parse_mag_ratios(text: str, flag: str = "--magcache_mag_ratios") -> tuple[float, ...]:
    """'1.0,1.06,...' -> the ratios; '0' -> () meaning the default ratios."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers (or 0 for the defaults)") from None
    if values == (0.0,):
        return ()
    if any(not np.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{flag} {text!r}: ratios must be positive numbers")
    return values


def format_ratios(ratios: Sequence[float]) -> str:
    """The `--magcache_mag_ratios` value for `ratios`."""
    return ",".join(f"{r:.{RATIO_DECIMALS}f}" for r in ratios)


class MagCache(StepCache):
    name = "MagCache"

    def __init__(
        self,
        num_steps: int,
        mag_ratios: Sequence[float] | None = None,
        retention_ratio: float = DEFAULT_RETENTION_RATIO,
        threshold: float = DEFAULT_THRESHOLD,
        k: int = DEFAULT_K,
        calibration: bool = False,
    ):
        super().__init__(num_steps)
        ratios = tuple(mag_ratios) if mag_ratios else DEFAULT_MAG_RATIOS
        if len(ratios) != num_steps:
            logger.debug(f"MagCache: resampling {len(ratios)} ratios to {num_steps} steps")
            ratios = resample_ratios(ratios, num_steps)
        self.mag_ratios = ratios
        self.retention_ratio, self.threshold, self.k = retention_ratio, threshold, k
        self.calibration = calibration
        self.schedule = [True] * num_steps if calibration else magcache_schedule(ratios, retention_ratio, threshold, k)
        self.norm_ratio: list[float] = []  # calibration: per step from step 1
        self.norm_std: list[float] = []
        self.cosine_distance: list[float] = []

    def _decide(self, step: int, forced: bool, modulated_input: ModulatedInput) -> bool:
        return self.schedule[step]

    def record(self, residual: torch.Tensor) -> None:
        if self.calibration and self.residual is not None:
            ratio = residual.float().norm(dim=-1) / self.residual.float().norm(dim=-1)
            cosine = F.cosine_similarity(residual.float(), self.residual.float(), dim=-1, eps=1e-8)
            self.norm_ratio.append(round(ratio.mean().item(), RATIO_DECIMALS))
            self.norm_std.append(round(ratio.std().item(), RATIO_DECIMALS))
            self.cosine_distance.append(round((1 - cosine).mean().item(), RATIO_DECIMALS))
        super().record(residual)

    def calibration_ratios(self) -> tuple[float, ...] | None:
        """One ratio per step (1.0 first), ready for `--magcache_mag_ratios`; None when not calibrating."""
        return (1.0, *self.norm_ratio) if self.calibration else None

    def summary(self) -> str:
        if not self.calibration:
            return super().summary()
        ratios = self.calibration_ratios()
        would = magcache_schedule(ratios, self.retention_ratio, self.threshold, self.k)
        return (
            f"calibration ran all {self.step} steps; with these ratios MagCache (retention {self.retention_ratio}, "
            f"threshold {self.threshold}, K {self.k}) would run the blocks on {sum(would)} of {len(would)} steps"
        )
