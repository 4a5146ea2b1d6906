"""The paper's sampler, in one place: DDIM with 20 steps and classifier-free guidance 7 (the authors' data and tests).

Every command that draws images (training data, validation images, apl-bench, apl-eval, the world) defaults to it.
"""

from __future__ import annotations

#: DDIM steps of every image in the paper
PAPER_STEPS = 20
#: classifier-free guidance scale of every image in the paper
PAPER_GUIDANCE_SCALE = 7.0
