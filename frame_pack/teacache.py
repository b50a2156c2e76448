"""TeaCache for the packed DiT (`--teacache_thresh`): skip the blocks on steps whose input barely changed.

The FramePack model carries this in musubi-tuner (and upstream FramePack turns it on by default, threshold 0.15)
but musubi's CLI does not expose it. Per sampling step the first double block's modulated image input is compared
with the previous step's; the relative L1 change, mapped through a fitted polynomial to an estimate of the output
change, is accumulated, and while the sum stays under the threshold the blocks are skipped and the image tokens get
the residual the blocks added last time. The first and last step of a run always compute (and restart the sum).
"""

from __future__ import annotations

import numpy as np
import torch

from frame_pack.step_cache import ModulatedInput, StepCache

# Fitted polynomial mapping the raw relative L1 change to an estimate of the output change (highest degree first).
RESCALE_COEFFICIENTS = (7.33226126e2, -4.01131952e2, 6.75869174e1, -3.14987800, 9.61237896e-2)
DEFAULT_THRESHOLD = 0.15  # upstream FramePack's default


def relative_l1_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class TeaCache(StepCache):
    name = "TeaCache"

    def __init__(self, num_steps: int, threshold: float = DEFAULT_THRESHOLD):
        super().__init__(num_steps)
        self.threshold = threshold
        self.accumulated = 0.0
        self.previous_modulated: torch.Tensor | None = None
        self.rescale = np.poly1d(RESCALE_COEFFICIENTS)

    def _decide(self, step: int, forced: bool, modulated_input: ModulatedInput) -> bool:
        modulated = modulated_input()
        previous, self.previous_modulated = self.previous_modulated, modulated
        if forced or previous is None:
            self.accumulated = 0.0
            return True
        self.accumulated += float(self.rescale(relative_l1_change(modulated, previous)))
        if self.accumulated >= self.threshold:
            self.accumulated = 0.0
            return True
        return False
