"""RARPipeline run through diffusers' PipelineTesterMixin, set up like DiT's (the other class-conditional pipeline).

Upstream helpers: exported at run time by conformance/export.py (diffusers main 58eb52c080, 2026-08-23).

Adaptations (listed with reasons in conformance/README.md):
  P1 params / batch_params = CLASS_CONDITIONED_IMAGE_GENERATION_{,BATCH_}PARAMS, as DiT.
  P2 required_optional_params minus `latents`, `num_images_per_prompt` (DiT removes the same two), and minus
     `num_inference_steps`: RAR samples exactly image_seq_len tokens, there is no step count to choose.
  P3 test_inference_batch_single_identical: the upstream helper copies `num_inference_steps` into the batched inputs
     by default (`additional_params_copy_to_batched_inputs=["num_inference_steps"]`); RAR has no such input, so the
     override passes an empty list. Nothing else changes.
  get_dummy_components randomises the generator's weights (seeded) as the project's own tests do: a freshly built
  RAR is adaLN-zero, so every token would ignore the class and the image tokens before it.
"""

import unittest

import torch

from tests.pipelines.pipeline_params import (
    CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS,
    CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS,
)
from tests.pipelines.test_pipelines_common import PipelineTesterMixin
from tests.testing_utils import enable_full_determinism

from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
from rar_hf.pipeline_rar import RARPipeline

enable_full_determinism()


class RARPipelineFastTests(PipelineTesterMixin, unittest.TestCase):
    pipeline_class = RARPipeline
    params = CLASS_CONDITIONED_IMAGE_GENERATION_PARAMS  # P1
    batch_params = CLASS_CONDITIONED_IMAGE_GENERATION_BATCH_PARAMS  # P1
    required_optional_params = PipelineTesterMixin.required_optional_params - {  # P2
        "latents",
        "num_images_per_prompt",
        "num_inference_steps",
    }

    def get_dummy_components(self):
        torch.manual_seed(0)
        config = RARConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            codebook_size=16,
            num_classes=3,
            image_seq_len=16,
            dropout=0.0,
            attention_dropout=0.0,
            sampling_defaults=dict(guidance_scale=3.0, guidance_scale_pow=1.0, temperature=1.0),
        )
        transformer = RARForImageGeneration(config).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in transformer.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        vqvae = MaskGITVQModel(
            hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8
        ).eval()
        return {"transformer": transformer, "vqvae": vqvae}

    def get_dummy_inputs(self, device, seed=0):
        if str(device).startswith("mps"):
            generator = torch.manual_seed(seed)
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
        # one label (an int): the batching helpers build `batch_size * [value]`, a list of labels
        return {"class_labels": 1, "generator": generator, "output_type": "np"}

    def test_inference(self):
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=None)
        image = pipe(**self.get_dummy_inputs("cpu")).images
        self.assertEqual(image.shape, (1, 8, 8, 3))

    def test_inference_batch_single_identical(self):  # P3
        self._test_inference_batch_single_identical(batch_size=3, additional_params_copy_to_batched_inputs=[])
