"""Step caches: skip the DiT's transformer blocks on sampling steps where their effect is predictable.

A step cache lives for one sampling run of `num_steps` model calls (one section, one guidance branch). Per call the
DiT asks `should_compute`; when it computes, it hands the blocks' residual (image tokens after the blocks minus
before them, all image tokens including the clean-latent ones) to `record`; when it skips, `apply` adds the last
recorded residual to the block input instead. The first and the last step of a run always compute.

With real CFG (`guidance_scale != 1`) the sampler makes two calls per step, positive then negative; `BranchedCache`
keeps one independent cache per branch and routes the calls to them in that order.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

ModulatedInput = Callable[[], torch.Tensor]  # the first double block's modulated image input, computed on demand


class StepCache(ABC):
    name = "step cache"

    def __init__(self, num_steps: int):
        if num_steps < 1:
            raise ValueError(f"a step cache needs at least one step, got {num_steps}")
        self.num_steps = num_steps
        self.computed: list[bool] = []  # one entry per step so far: did the blocks run
        self.residual: torch.Tensor | None = None

    @property
    def step(self) -> int:
        return len(self.computed)

    def should_compute(self, modulated_input: ModulatedInput) -> bool:
        """Decide for the current step and advance to the next one."""
        step = self.step
        if step >= self.num_steps:
            raise RuntimeError(f"{self.name}: model call {step + 1} in a run of {self.num_steps} steps")
        forced = step == 0 or step == self.num_steps - 1 or self.residual is None
        compute = self._decide(step, forced, modulated_input) or forced
        self.computed.append(compute)
        return compute

    @abstractmethod
    def _decide(self, step: int, forced: bool, modulated_input: ModulatedInput) -> bool:
        """True to run the blocks at `step`; called on every step (`forced`: it computes whatever this returns)."""

    def record(self, residual: torch.Tensor) -> None:
        self.residual = residual

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        return img + self.residual

    @property
    def blocks_run(self) -> int:
        return sum(self.computed)

    def calibration_ratios(self) -> tuple[float, ...] | None:
        """Measured per-step ratios when the cache ran as a calibration, else None."""
        return None

    def summary(self) -> str:
        skipped = [i for i, c in enumerate(self.computed) if not c]
        where = f" (skipped steps {format_steps(skipped)})" if skipped else ""
        return f"the blocks ran on {self.blocks_run} of {len(self.computed)} steps{where}"


class BranchedCache:
    """One cache per guidance branch; model calls alternate between them (positive, negative, positive, ...).

    Same interface as `StepCache`; `computed` lists every call's decision in call order.
    """

    def __init__(self, caches: list[StepCache]):
        self.caches = caches
        self.name = caches[0].name
        self.num_steps = caches[0].num_steps
        self.computed: list[bool] = []

    @property
    def current(self) -> StepCache:
        return self.caches[(len(self.computed) - 1) % len(self.caches)]

    def should_compute(self, modulated_input: ModulatedInput) -> bool:
        cache = self.caches[len(self.computed) % len(self.caches)]
        compute = cache.should_compute(modulated_input)
        self.computed.append(compute)
        return compute

    def record(self, residual: torch.Tensor) -> None:
        self.current.record(residual)

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        return self.current.apply(img)

    @property
    def blocks_run(self) -> int:
        return sum(self.computed)

    def calibration_ratios(self) -> tuple[float, ...] | None:
        """The positive branch's calibration (the branch that also runs without CFG)."""
        return self.caches[0].calibration_ratios()

    def summary(self) -> str:
        names = BRANCH_NAMES if len(self.caches) == len(BRANCH_NAMES) else [str(i) for i in range(len(self.caches))]
        return "; ".join(f"{name} branch: {cache.summary()}" for name, cache in zip(names, self.caches))


BRANCH_NAMES = ("positive", "negative")


def format_steps(steps: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


# ---- settings -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCacheSettings:
    """What the `--teacache_thresh` and `--magcache_*` flags ask for; `build` makes a fresh cache per run."""

    teacache_threshold: float | None = None
    magcache_ratios: tuple[float, ...] | None = None  # None: MagCache off; (): the default ratios
    magcache_calibration: bool = False
    magcache_retention_ratio: float = 0.2
    magcache_threshold: float = 0.24
    magcache_k: int = 6

    @property
    def magcache(self) -> bool:
        return self.magcache_ratios is not None or self.magcache_calibration

    @property
    def enabled(self) -> bool:
        return self.magcache or self.teacache_threshold is not None

    def describe(self) -> str | None:
        """One line for output metadata; None when no cache is on."""
        if self.magcache:
            ratios = (
                "calibration"
                if self.magcache_calibration
                else "custom ratios"
                if self.magcache_ratios
                else ("default ratios")
            )
            return (
                f"MagCache {ratios}, retention {self.magcache_retention_ratio}, threshold {self.magcache_threshold}, "
                f"K {self.magcache_k}"
            )
        if self.teacache_threshold is not None:
            return f"TeaCache threshold {self.teacache_threshold}"
        return None

    def validate(self) -> None:
        """Raise ValueError naming the flag at fault."""
        if self.magcache and self.teacache_threshold is not None:
            raise ValueError("--teacache_thresh and --magcache_* are two step caches: choose one")
        if self.teacache_threshold is not None and self.teacache_threshold < 0:
            raise ValueError(f"--teacache_thresh must be >= 0, got {self.teacache_threshold}")
        if not 0 <= self.magcache_retention_ratio <= 1:
            raise ValueError(f"--magcache_retention_ratio must be in [0, 1], got {self.magcache_retention_ratio}")
        if self.magcache_threshold < 0:
            raise ValueError(f"--magcache_threshold must be >= 0, got {self.magcache_threshold}")
        if self.magcache_k < 0:
            raise ValueError(f"--magcache_k must be >= 0, got {self.magcache_k}")

    def build(self, num_steps: int, branches: int = 1) -> StepCache | BranchedCache | None:
        """A cache for one run of `num_steps` steps (None when off); `branches` = model calls per step."""
        if not self.enabled:
            return None
        caches = [self._build_one(num_steps) for _ in range(branches)]
        return caches[0] if branches == 1 else BranchedCache(caches)

    def _build_one(self, num_steps: int) -> StepCache:
        if self.magcache:
            from frame_pack.magcache import MagCache

            return MagCache(
                num_steps,
                self.magcache_ratios or None,
                retention_ratio=self.magcache_retention_ratio,
                threshold=self.magcache_threshold,
                k=self.magcache_k,
                calibration=self.magcache_calibration,
            )
        from frame_pack.teacache import TeaCache

        return TeaCache(num_steps, self.teacache_threshold)


@contextlib.contextmanager
def step_cache_on(model, cache: StepCache | BranchedCache | None) -> Iterator[StepCache | BranchedCache | None]:
    """Attach `cache` to the DiT for the duration of one sampling run."""
    model.step_cache = cache
    try:
        yield cache
    finally:
        model.step_cache = None
