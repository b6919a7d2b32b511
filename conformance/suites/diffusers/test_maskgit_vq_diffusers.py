"""MaskGITVQModel run through diffusers' model tester mixin (tests/models/testing_utils, the current one).

Upstream helpers: exported at run time by conformance/export.py (diffusers main 58eb52c080, 2026-08-23), importable
as the `tests` package. TrainingTesterMixin and MemoryTesterMixin are gated on an accelerator upstream
(@require_torch_accelerator_with_training / @require_accelerator), so on this CPU-only machine only ModelTesterMixin
can run.

Adaptations: none to the mixin. The config class only supplies what BaseModelTesterConfig asks for: the project's
tiny tokenizer config, and images in [0, 1] (the tokenizer rejects [-1, 1] input by design), with a fixed generator.
"""

import torch

from tests.models.testing_utils import BaseModelTesterConfig, ModelTesterMixin
from tests.testing_utils import enable_full_determinism, torch_device

from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

enable_full_determinism()

TINY = dict(hidden_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, latent_channels=8, codebook_size=16,
            sample_size=16)


class MaskGITVQModelTesterConfig(BaseModelTesterConfig):
    @property
    def model_class(self):
        return MaskGITVQModel

    @property
    def main_input_name(self) -> str:
        return "images"

    @property
    def output_shape(self) -> tuple:
        return (3, 16, 16)

    def get_init_dict(self) -> dict:
        return dict(TINY)

    def get_dummy_inputs(self) -> dict:
        generator = torch.Generator("cpu").manual_seed(0)
        images = torch.rand((2, 3, 16, 16), generator=generator).to(torch_device)
        return {"images": images}


class TestMaskGITVQModel(MaskGITVQModelTesterConfig, ModelTesterMixin):
    pass
