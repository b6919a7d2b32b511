"""Classifier-free guidance for RAR inside transformers' `generate()`: guidance schedules and the logits processor."""

import math

import torch
from transformers import LogitsProcessor

GUIDANCE_SCHEDULES = ("constant", "linear", "pow-cosine")


def guidance_scale_at(
    step: int, num_steps: int, guidance_scale: float, schedule: str = "pow-cosine", guidance_scale_pow: float = 0.0
) -> float:
    """Guidance scale used to sample image token `step` (0-based) of `num_steps`.

    - `"constant"`: `guidance_scale` at every step.
    - `"linear"`: from 1 at step 0 to `guidance_scale` at step `num_steps` (the paper's ablations).
    - `"pow-cosine"` (official): `s = (1 - cos((step / num_steps) ** pow * pi)) / 2`, scale = `(g - 1) * s + 1`.
      `pow = 0` gives a constant `g` except at step 0 (0 ** 0 = 1), as the official sampler.
    """
    if schedule == "constant":
        return float(guidance_scale)
    if schedule == "linear":
        return 1.0 + (guidance_scale - 1.0) * step / num_steps
    if schedule == "pow-cosine":
        # Evaluated in float32 as the official sampler, so cfg_scale matches it bit for bit.
        ratio = torch.tensor(step / num_steps, dtype=torch.float32) ** guidance_scale_pow
        scale_step = (1 - torch.cos(ratio * math.pi)) * 0.5
        return float((guidance_scale - 1) * scale_step + 1)
    raise ValueError(f"Unknown guidance schedule {schedule!r}; expected one of {GUIDANCE_SCHEDULES}.")


def guidance_scales(num_steps: int, guidance_scale: float, schedule: str = "pow-cosine", guidance_scale_pow: float = 0.0):
    """The whole schedule as a float32 tensor of `num_steps` scales."""
    return torch.tensor(
        [guidance_scale_at(s, num_steps, guidance_scale, schedule, guidance_scale_pow) for s in range(num_steps)],
        dtype=torch.float32,
    )


class RARClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    r"""
    Classifier-free guidance with a per-step scale, for a batch that the model ran doubled as `[conditional; null]`.

    It receives `2B` rows of logits and returns the `B` guided rows `u + (c - u) * scale(step)`, so that sampling
    draws one token per pair and both halves of the doubled batch always continue with the same token. The step is
    read from the length of `input_ids`, which makes it work with any cache and with `use_cache=False`.

    Args:
        guidance_scales (`torch.Tensor`): the scale for every image-token step (see [`guidance_scales`]).
        prompt_length (`int`): length of the prompt given to `generate()` (1: the class token).
    """

    def __init__(self, guidance_scales: torch.Tensor, prompt_length: int = 1):
        self.guidance_scales = guidance_scales.tolist()
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch_size = input_ids.shape[0]
        if scores.shape[0] != 2 * batch_size:
            raise ValueError(
                f"Classifier-free guidance expects 2 x {batch_size} rows of logits ([conditional; null]), got "
                f"{scores.shape[0]}: the model must be called through RARForImageGeneration.generate()."
            )
        step = input_ids.shape[1] - self.prompt_length
        scale = self.guidance_scales[min(step, len(self.guidance_scales) - 1)]
        cond, uncond = scores[:batch_size], scores[batch_size:]
        # Formed as u + (c - u) * s even when s == 1, as the official sampler (bit-level parity).
        return uncond + (cond - uncond) * scale
