"""TeaCache for the packed DiT: skip the transformer blocks on steps whose input barely changed.

The FramePack model carries this in musubi-tuner (and upstream FramePack turns it on by default, threshold 0.15)
but musubi's CLI does not expose it; here it is `--teacache_thresh`. Per sampling step the first double block's
modulated image input is compared with the previous step's; the rescaled relative L1 change is accumulated, and
while the sum stays under the threshold the blocks are skipped and the image tokens get the residual the blocks
added last time. The first and last step of a section always compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Fitted polynomial mapping the raw relative L1 change to an estimate of the output change (highest degree first).
RESCALE_COEFFICIENTS = (7.33226126e2, -4.01131952e2, 6.75869174e1, -3.14987800, 9.61237896e-2)
DEFAULT_THRESHOLD = 0.15  # upstream FramePack's default


@dataclass
class TeaCache:
    num_steps: int
    threshold: float
    count: int = 0
    accumulated: float = 0.0
    previous_modulated: torch.Tensor | None = None
    previous_residual: torch.Tensor | None = None
    skipped: int = 0
    rescale: np.poly1d = field(default_factory=lambda: np.poly1d(RESCALE_COEFFICIENTS))

    def should_compute(self, modulated: torch.Tensor) -> bool:
        """Decide for this step from the first block's modulated input; advances the step counter."""
        if self.count in (0, self.num_steps - 1) or self.previous_residual is None:
            compute, self.accumulated = True, 0.0
        else:
            prev = self.previous_modulated
            change = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated += float(self.rescale(change))
            compute = self.accumulated >= self.threshold
            if compute:
                self.accumulated = 0.0
        self.previous_modulated = modulated
        self.count = (self.count + 1) % self.num_steps
        self.skipped += not compute
        return compute
