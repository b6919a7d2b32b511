"""RARForImageGeneration / RARModel / RARConfig through transformers' own test mixins, the way transformers'
tests/models/*/test_modeling_*.py use them.

Upstream helpers (exported at run time by conformance/export.py, importable as the `tests` package):
  tests/test_modeling_common.py      ModelTesterMixin       (the installed release's sdist, exact)
  tests/test_configuration_common.py ConfigTester           (the installed release's sdist, exact)
  tests/generation/test_utils.py     GenerationTesterMixin  (git snapshot, drift-patched; not shipped in the sdist)

No upstream test method is overridden or disabled here; the tester supplies inputs and the mixins' documented hooks
(`_check_*`, tester attributes), as upstream model tests do. Each adaptation is listed in conformance/README.md.

Design adaptations (what RAR is):
  A1 inputs are [class token, image tokens]: class ids codebook_size+1 .. null class, image ids < codebook_size.
  A2 no attention_mask in the common inputs: RAR sequences are never padded.
  A3 _check_scores / _check_logits expect codebook_size columns (the head), not config.vocab_size (embedding rows);
     ImageGPT's upstream test overrides the same two for its vocab_size - 1 head.
  A5 ConfigTester(has_text_modality=False, common_properties=RAR's real attributes).
  A8 _check_past_key_values_for_generate expects one more cache slot: the learned cls slot.
  A12 the learned cls slot also runs in a call that starts a sequence, and `hidden_states` / `attentions` count it
      (documented in RARModel.forward): the tester's `encoder_seq_length` is seq_length + 1 (ViT's tester counts its
      CLS token the same way), and the generate-output checks expect one more query and key slot.
  A11 test_eager_matches_sdpa_inference_* builds a batch of 7 and fills missing rows with random ids (no class token
      first, which RAR rejects): the tester's batch is 7 for those tests.
Harness adaptations (RAR is not a model inside transformers):
  A6 MODEL_MAPPING_NAMES["rar"] / MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["rar"] during each test: the mixins decide "base
     model: no loss" and "give causal-LM labels" from these static tables, which AutoModel.register does not fill.
  A10 test_can_init_all_missing_weights_before_2023 = True: upstream runs that test only for models whose config file
      has a "# Copyright 20xx" header >= 2023.
Test strength:
  A7 RARModelTestNonZeroAdaLN runs everything again with adaLN modulations initialised N(0, 0.2): a fresh RAR is
     adaLN-zero (every block the identity), so cache / attention / batching comparisons would hold even if broken.
Current limitations (delete the marked code when the limitation goes):
Tiny config: hidden 32, 2 layers, 4 heads, MLP 64, codebook 16, 10 classes, dropout 0, image_seq_len 36 (6 x 6): a
full 7-token prompt plus the 20 new tokens of test_generate_with_static_cache must fit in an image.
"""

import unittest
from unittest import mock

import torch
from transformers import initialization as init
from transformers.models.auto import modeling_auto
from transformers.testing_utils import require_torch, torch_device

from tests.generation.test_utils import GenerationTesterMixin
from tests.test_configuration_common import ConfigTester
from tests.test_modeling_common import ModelTesterMixin, ids_tensor

from rar_hf import RARConfig, RARForImageGeneration, RARModel
from rar_hf.modeling_rar import RARAdaLNModulation, RARPreTrainedModel


class RARModelTester:
    def __init__(
        self,
        parent,
        batch_size=3,
        seq_length=7,  # 1 class token + 6 image tokens
        is_training=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        codebook_size=16,
        num_classes=10,
        image_seq_len=36,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        # A12: the sequence the model runs is [cls slot, input_ids] (read by test_attention_outputs and
        # test_hidden_states_output; hidden from the generate-output checks, see RARModelTest._check_generate_outputs)
        self.encoder_seq_length = seq_length + 1
        self.is_training = is_training
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.image_seq_len = image_seq_len
        self.vocab_size = codebook_size + 1 + num_classes + 1  # embedding rows: codebook, mask, classes, null class

    def get_config(self):
        return RARConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            codebook_size=self.codebook_size,
            num_classes=self.num_classes,
            image_seq_len=self.image_seq_len,
            dropout=0.0,
            attention_dropout=0.0,
        )

    def input_ids(self, batch_size, seq_length):
        # A1: a class token (class c -> codebook_size + 1 + c; the null class included), then image tokens
        classes = ids_tensor([batch_size, 1], self.num_classes + 1) + self.codebook_size + 1
        tokens = ids_tensor([batch_size, seq_length - 1], self.codebook_size)
        return torch.cat([classes, tokens], dim=1)

    def prepare_config_and_inputs(self):
        input_ids = self.input_ids(self.batch_size, self.seq_length)
        return self.get_config(), input_ids, input_ids.clone()

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids}  # A2: no attention_mask

    def create_and_check_model(self, config, input_ids, labels):
        model = RARForImageGeneration(config).to(torch_device).eval()
        out = model(input_ids.to(torch_device), labels=labels.to(torch_device))
        self.parent.assertEqual(out.logits.shape, (self.batch_size, self.seq_length, self.codebook_size))
        self.parent.assertEqual(out.loss.shape, ())
        base = RARModel(config).to(torch_device).eval()
        hidden = base(input_ids.to(torch_device)).last_hidden_state
        self.parent.assertEqual(hidden.shape, (self.batch_size, self.seq_length, self.hidden_size))


@require_torch
class RARModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (RARModel, RARForImageGeneration)
    all_generative_model_classes = (RARForImageGeneration,)
    pipeline_model_mapping = {}
    test_can_init_all_missing_weights_before_2023 = True  # A10

    def setUp(self):
        for table, name in (  # A6
            (modeling_auto.MODEL_MAPPING_NAMES, "RARModel"),
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "RARForImageGeneration"),
        ):
            patcher = mock.patch.dict(table, {"rar": name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = RARModelTester(self)
        if self._testMethodName.startswith("test_eager_matches_sdpa_inference"):  # A11
            self.model_tester.batch_size = 7
        self.config_tester = ConfigTester(  # A5
            self,
            config_class=RARConfig,
            has_text_modality=False,
            common_properties=["hidden_size", "num_attention_heads", "num_hidden_layers", "codebook_size"],
            hidden_size=32,
            num_attention_heads=4,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    # A3: the head scores codebook_size image tokens
    def _check_scores(self, batch_size, scores, generated_length, config):
        self.assertIsInstance(scores, tuple)
        self.assertEqual(len(scores), generated_length)
        self.assertListEqual([s.shape for s in scores], [(batch_size, config.codebook_size)] * len(scores))

    def _check_logits(self, batch_size, logits, config):
        self.assertIsInstance(logits, tuple)
        self.assertListEqual([l.shape[0] for l in logits], [batch_size] * len(logits))
        self.assertListEqual([l.shape[-1] for l in logits], [config.codebook_size] * len(logits))

    # A8: the cache also holds the cls slot
    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        seq_length = None if seq_length is None else seq_length + 1
        super()._check_past_key_values_for_generate(batch_size, past_key_values, seq_length, config)

    # A12: generate() outputs count the cls slot in the first step's queries and in every step's keys. The mixin
    # reads the prompt length from `encoder_seq_length` when the tester has one: the prompt is `seq_length` tokens.
    def _check_generate_outputs(self, output, config, use_cache=False, num_return_sequences=1, num_beams=1):
        encoder_seq_length = self.model_tester.__dict__.pop("encoder_seq_length", None)
        try:
            super()._check_generate_outputs(output, config, use_cache, num_return_sequences, num_beams)
        finally:
            if encoder_seq_length is not None:
                self.model_tester.encoder_seq_length = encoder_seq_length

    def _check_attentions_for_generate(
        self, batch_size, attentions, prompt_length, output_length, config, decoder_past_key_values
    ):
        super()._check_attentions_for_generate(
            batch_size, attentions, prompt_length + 1, output_length + 1, config, decoder_past_key_values
        )

    def _check_hidden_states_for_generate(
        self, batch_size, hidden_states, prompt_length, output_length, config, use_cache=False
    ):
        super()._check_hidden_states_for_generate(
            batch_size, hidden_states, prompt_length + 1, output_length + 1, config, use_cache
        )


_stock_init_weights = RARPreTrainedModel._init_weights


@torch.no_grad()
def _init_weights_nonzero_adaln(self, module):
    if isinstance(module, RARAdaLNModulation):
        init.normal_(module.weight, std=0.2)
        init.normal_(module.bias, std=0.2)
    else:
        _stock_init_weights(self, module)


@require_torch
class RARModelTestNonZeroAdaLN(RARModelTest):
    """A7: the whole suite again with the adaLN modulations initialised N(0, 0.2) (see the module docstring)."""

    def setUp(self):
        super().setUp()
        patcher = mock.patch.object(RARPreTrainedModel, "_init_weights", _init_weights_nonzero_adaln)
        patcher.start()
        self.addCleanup(patcher.stop)
