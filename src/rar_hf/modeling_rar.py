"""RAR: a decoder-only transformer with AdaLN blocks and target-aware position embeddings (arXiv 2411.00776)."""

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_rar import RARConfig
from .decoding_attention import decoding_attention_forward, filled_slots_attention, uses_decoding_attention
from .generation_rar import (
    RARClassifierFreeGuidanceLogitsProcessor,
    RARFiniteLogitsCheck,
    RARSamplingLogitsProcessor,
    RARStepCallback,
    check_sampling_arguments,
    guidance_scales,
    random_orders,
)
from .prepacked_linear import PrepackedLinear, pack_linear_weights, unpack_linear_weights
from .speculative_rar import speculative_generate


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class RARAdaLNModulation(PrepackedLinear):
    """Projection of the condition to shift/scale/gate vectors; zero-initialised so each block starts as identity."""


class RARAttention(nn.Module):
    """Causal self-attention with a fused qkv projection and LayerNorm on queries and keys (shared by all heads)."""

    def __init__(self, config: RARConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.num_key_value_groups = 1
        self.qkv_proj = PrepackedLinear(config.hidden_size, 3 * config.hidden_size)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.o_proj = PrepackedLinear(config.hidden_size, config.hidden_size)
        self.o_dropout = nn.Dropout(config.dropout)

    def forward(
        self, hidden_states, attention_mask=None, cache: Cache | None = None, kv_length=None, last_position=None, **kwargs
    ):
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        query, key = self.q_norm(query), self.k_norm(key)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            if kv_length is not None and key.shape[-2] > kv_length and isinstance(attention_mask, torch.Tensor):
                # A static cache returns all its slots; the ones past the sequence are masked, so skip reading them.
                key, value = key[:, :, :kv_length], value[:, :, :kv_length]
                attention_mask = attention_mask[..., :kv_length]
        sdpa = self.config._attn_implementation == "sdpa"
        if seq_len == 1 and last_position is not None and sdpa and query.dtype == torch.float32:
            # Compiled float32 CPU step over a static cache: an opaque op reads only the filled slots (a length the
            # graph cannot know without recompiling at every step). In half precision, inductor's own fusion of
            # `decoding_attention_forward` over all slots is faster than this op (42 against 46 ms per RAR-B step).
            attn_output = filled_slots_attention(query, key, value, last_position, self.scaling)
            return self.o_dropout(self.o_proj(attn_output.reshape(batch_size, seq_len, -1))), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if seq_len == 1 and uses_decoding_attention(query, self.config._attn_implementation, kwargs):
            attention_interface = decoding_attention_forward
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)
        return self.o_dropout(self.o_proj(attn_output)), attn_weights


class RARMLP(nn.Module):
    def __init__(self, config: RARConfig):
        super().__init__()
        self.fc1 = PrepackedLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = PrepackedLinear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class RARDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block whose LayerNorms are modulated (shift, scale, gate) by the per-position condition (adaLN-zero)."""

    def __init__(self, config: RARConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = RARAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = RARMLP(config)
        self.adaln_modulation = RARAdaLNModulation(config.hidden_size, 6 * config.hidden_size)

    def forward(self, hidden_states, condition, attention_mask=None, cache=None, modulation=None, **kwargs):
        if modulation is None:
            modulation = self.adaln_modulation(F.silu(condition))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        attn_input = modulate(self.input_layernorm(hidden_states), shift_msa, scale_msa)
        attn_output, _ = self.self_attn(attn_input, attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + gate_msa * attn_output
        mlp_input = modulate(self.post_attention_layernorm(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp * self.mlp(mlp_input)


class RARPreTrainedModel(PreTrainedModel):
    config_class = RARConfig
    config: RARConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RARDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # `output_hidden_states` / `output_attentions` are recorded by transformers' hooks on these modules.
    _can_record_outputs = {"hidden_states": RARDecoderLayer, "attentions": RARAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        # The official initialisation: truncated normal everywhere, LayerNorms at identity, adaLN-zero.
        std = self.config.initializer_range
        if isinstance(module, RARAdaLNModulation):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RARModel):
            for table in (module.cls_token, module.position_embedding, module.condition_position_embedding):
                init.trunc_normal_(table, std=std)
            if module.target_aware_position_embedding is not None:
                init.trunc_normal_(module.target_aware_position_embedding, std=std)


class RARModel(RARPreTrainedModel):
    r"""
    The RAR transformer without its output projection.

    The sequence it runs is `[cls, condition, image tokens...]`: a learned cls slot is prepended inside the model, so
    callers pass `input_ids = [condition, image tokens in generation order]`. Each position gets

    - the position embedding of the raster position it holds (`position_embedding[2 + orders[j]]`; rows 0 and 1 are
      the cls and condition slots);
    - the target-aware position embedding of the raster position it must predict (`2 + orders[j + 1]`; zero for cls
      and for the last image token), so that permutations sharing a prefix are told apart;
    - an AdaLN condition `class embedding + condition_position_embedding[sequence position]`.
    """

    def __init__(self, config: RARConfig):
        super().__init__(config)
        hidden, num_positions = config.hidden_size, config.image_seq_len + 2
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.position_embedding = nn.Parameter(torch.zeros(num_positions, hidden))
        if config.target_aware_position_embedding_folded:
            self.target_aware_position_embedding = None
        else:
            self.target_aware_position_embedding = nn.Parameter(torch.zeros(num_positions, hidden))
        self.condition_position_embedding = nn.Parameter(torch.zeros(num_positions, hidden))
        self.layers = nn.ModuleList(RARDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps, elementwise_affine=False)
        self.final_adaln_modulation = RARAdaLNModulation(hidden, 2 * hidden)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @staticmethod
    def cache_position(input_ids: torch.LongTensor, cache: Cache | None) -> torch.LongTensor:
        """Sequence positions of the slots `input_ids` fills, read from the cache (plus the cls slot on a new sequence)."""
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        new_slots = input_ids.shape[1] + (1 if past_length == 0 else 0)
        return torch.arange(past_length, past_length + new_slots, device=input_ids.device)

    def _position_tables(self, positions: torch.Tensor, orders: torch.Tensor | None):
        """Position and target-aware embeddings for absolute sequence `positions` (cls = 0, condition = 1)."""
        num_positions = self.config.image_seq_len + 2
        if orders is None:
            position_index = positions
            target_index = positions + 1
        else:
            # Slot 0 (cls) and 1 (condition) are never permuted; image slot j holds raster position orders[j].
            prefix = torch.arange(2, device=orders.device).expand(orders.shape[0], 2)
            slot_position = torch.cat([prefix, orders + 2], dim=1)  # (B, L + 2)
            position_index = slot_position.index_select(1, positions)
            target_index = slot_position.index_select(1, (positions + 1).clamp(max=num_positions - 1))
        position = self.position_embedding[position_index]
        if self.target_aware_position_embedding is None:
            return position
        # Nothing is predicted from cls's target slot and nothing follows the last image token.
        has_target = ((positions >= 1) & (positions < num_positions - 1)).to(position.dtype)[:, None]
        target = self.target_aware_position_embedding[target_index.clamp(max=num_positions - 1)] * has_target
        return position + target

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        condition_ids: torch.LongTensor | None = None,
        orders: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        modulations: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        condition_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
            The class token of each row; needed when `input_ids` continues a cached sequence (it then holds only the
            new image tokens). By default `input_ids[:, 0]`.
        cache_position (`torch.LongTensor`, *optional*):
            Sequence positions (cls = 0, condition = 1) of this call's slots. When it has one more entry than
            `input_ids`, the call starts the sequence and the cls slot is prepended. Passing it (as `generate()` does)
            avoids reading the cache length, which is a device tensor for a static cache.
        modulations (`list[torch.Tensor]`, *optional*):
            Precomputed AdaLN modulations of this call's slots, one `(B, T, 6 * hidden)` tensor per layer and a last
            `(B, T, 2 * hidden)` one for the output norm (see [`RARModulationCache`]).

        Returns `BaseModelOutputWithPast` (a tuple with `return_dict=False`). `last_hidden_state` has one row per
        `input_ids` slot (the cls slot predicts nothing and is dropped) after the final AdaLN norm. With
        `output_hidden_states=True`, `hidden_states` holds `num_hidden_layers + 1` tensors: the embeddings, then the
        output of each layer, all before the final norm and over the slots this call runs, which **count the cls slot**
        on a call that starts a sequence (`(B, 1 + input_ids.shape[1], hidden)`, cls at index 0) and not on a call that
        continues a cached one (`(B, input_ids.shape[1], hidden)`). `attentions` (`output_attentions=True`, eager
        attention; sdpa and flash attention return none, as in transformers) are `(B, heads, T, kv_length)` per layer
        over the same slots.
        """
        use_cache = use_cache if use_cache is not None else False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache_position is None:
            cache_position = self.cache_position(input_ids, cache)
        starts_sequence = cache_position.shape[0] == input_ids.shape[1] + 1
        batch_size = input_ids.shape[0]
        embeds = self.embed_tokens(input_ids)
        if starts_sequence:
            # The condition comes first in input_ids; the learned cls slot is prepended here.
            condition_ids = input_ids[:, 0]
            embeds = torch.cat([self.cls_token.expand(batch_size, -1, -1).to(embeds.dtype), embeds], dim=1)
        elif condition_ids is None:
            raise ValueError("Decoding with a non-empty cache needs `condition_ids` (the class token of each row).")
        positions = cache_position
        if orders is not None and self.target_aware_position_embedding is None:
            raise ValueError(
                "This model's target-aware position embedding was folded into its position embedding for raster "
                "order; it cannot run other orders (pass orders=None)."
            )
        hidden_states = embeds + self._position_tables(positions, orders)
        condition = self.embed_tokens(condition_ids)[:, None, :] + self.condition_position_embedding[positions]

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=None,  # RAR sequences in a batch always have the same length: no padding.
            cache=cache,
            position_ids=positions[None],
        )
        # Slots filled after this call; with a static cache, attention reads only those. Known without a device sync
        # only when the positions live on the CPU, and a Python int would specialise compiled graphs on the step.
        kv_length = last_position = None
        if cache is not None and cache_position.device.type == "cpu":
            if torch.compiler.is_compiling():
                last_position = cache_position[-1:]
            else:
                kv_length = int(cache_position[-1]) + 1
        modulations = modulations or [None] * (len(self.layers) + 1)
        for layer, modulation in zip(self.layers, modulations):
            hidden_states = layer(
                hidden_states,
                condition,
                attention_mask=causal_mask,
                cache=cache,
                modulation=modulation,
                kv_length=kv_length,
                last_position=last_position,
                **kwargs,
            )

        final_modulation = modulations[-1]
        if final_modulation is None:
            final_modulation = self.final_adaln_modulation(F.silu(condition))
        if starts_sequence:  # cls predicts nothing
            hidden_states, final_modulation = hidden_states[:, 1:], final_modulation[:, 1:]
        # Official quirk: the final modulation is split as (scale, shift), the reverse of the blocks.
        scale, shift = final_modulation.chunk(2, dim=-1)
        hidden_states = modulate(self.norm(hidden_states), shift, scale)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class RARModulationCache:
    r"""
    AdaLN modulations of every layer, precomputed for the rows of one generation, a chunk of positions at a time.

    A row's condition is fixed for the whole sequence and the positions ahead are known, so the modulations of the
    next `chunk_size` positions come from one batched matmul per layer instead of one skinny matmul per layer and
    step, and rows that share a condition (every null row of classifier-free guidance) share the work. On a CPU,
    where a decoding step is bound by reading the weights, this removes a third of the bytes read per step.
    `generate()` creates one per call; it is filled outside the (possibly compiled) forward.
    """

    def __init__(self, chunk_size: int = 32):
        self.chunk_size = chunk_size
        self.unique_ids, self.inverse = None, None
        self.chunk_start, self.chunk_tables = 0, None

    @torch.no_grad()
    def modulations(self, model: RARModel, condition_ids: torch.LongTensor, start: int, length: int):
        """Per-layer (and final) modulations of positions `[start, start + length)` for every row."""
        if self.inverse is None:
            self.unique_ids, self.inverse = torch.unique(condition_ids, return_inverse=True)
        covered = self.chunk_start <= start and start + length <= self.chunk_start + self.chunk_size
        if self.chunk_tables is None or not covered:
            num_positions = model.config.image_seq_len + 2
            self.chunk_start = start
            positions = torch.arange(start, min(num_positions, start + max(self.chunk_size, length)), device=self.inverse.device)
            condition = model.embed_tokens(self.unique_ids)[:, None] + model.condition_position_embedding[positions]
            condition = F.silu(condition)
            linears = [layer.adaln_modulation for layer in model.layers] + [model.final_adaln_modulation]
            self.chunk_tables = [linear(condition) for linear in linears]
        offset = start - self.chunk_start
        return [table[self.inverse, offset : offset + length] for table in self.chunk_tables]


class RARForImageGeneration(RARPreTrainedModel, GenerationMixin):
    r"""
    RAR with its token head: class-conditional image-token generation.

    `input_ids` is `(B, 1 + N)`: a class (or null) token, then `N <= image_seq_len` image tokens in generation order.
    `orders` (`(B, image_seq_len)`, optional) is that order as raster positions: `input_ids[:, 1 + j]` is the token at
    raster position `orders[:, j]`; `None` is raster order. `logits[:, j]` is the distribution of the `j`-th image
    token of the order. `labels` follow the causal-LM convention (same shape as `input_ids`, shifted inside, -100
    ignored). Use [`prepare_class_ids`] to build prompts and [`generate`] to sample.
    """

    _tied_weights_keys = {}
    # What generate() and the speculative loop (which cannot import this module) precompute AdaLN modulations with.
    modulation_cache_class = RARModulationCache
    # Labels are the input ids themselves (shifted inside): transformers' causal-LM loss, over the image tokens.
    loss_type = "ForCausalLM"

    def __init__(self, config: RARConfig):
        super().__init__(config)
        self.model = RARModel(config)
        self.lm_head = PrepackedLinear(config.hidden_size, config.codebook_size)
        self.generation_config = GenerationConfig(
            do_sample=True,
            max_new_tokens=config.image_seq_len,
            min_new_tokens=config.image_seq_len,
            top_k=0,
            temperature=config.sampling_defaults["temperature"],
            # Every sequence has exactly 1 + image_seq_len slots: a preallocated cache, no per-step reallocation.
            cache_implementation="static",
        )
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        [`~transformers.PreTrainedModel.from_pretrained`], but weights that do not match the config are an error:
        missing keys (transformers would initialise them randomly) or unexpected keys (it would drop them), e.g. a
        `config.json` that declares more or fewer layers than the weights hold. Also through `RARPipeline`.

        Raises:
            ValueError: listing the missing and unexpected keys.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
        if missing or unexpected:

            def listed(keys):
                shown = ", ".join(keys[:12])
                return f"{len(keys)} ({shown}{', ...' if len(keys) > 12 else ''})" if keys else "none"

            config = model.config
            raise ValueError(
                f"The weights of {pretrained_model_name_or_path} do not match its config (num_hidden_layers="
                f"{config.num_hidden_layers}, hidden_size={config.hidden_size}): missing keys: {listed(missing)}; "
                f"unexpected keys: {listed(unexpected)}. The config.json and the weights come from different models."
            )
        return (model, info) if output_loading_info else model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def resize_token_embeddings(self, *args, **kwargs):
        raise ValueError(
            "RAR's vocabulary cannot be resized: its ids are the image tokenizer's codebook "
            f"[0, {self.config.codebook_size}), one mask token, then the {self.config.num_classes} classes and the null "
            "class (see RARConfig), and the output head scores exactly the codebook. A different codebook or class "
            "set is a new model: build one from a RARConfig with the new codebook_size / num_classes."
        )

    # ----------------------------------------------------------------------------------------------- prompts, checks
    def prepare_class_ids(self, class_labels, device=None) -> torch.LongTensor:
        """Turn class labels (ints, numpy or torch integers; `None` or -1 for unconditional) into the `(B, 1)` prompt
        ids of `generate()`."""
        config = self.config
        if isinstance(class_labels, numbers.Integral) or class_labels is None:
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor) or type(class_labels).__module__ == "numpy":
            class_labels = class_labels.flatten().tolist() if class_labels.ndim else [class_labels.item()]
        ids = []
        for label in class_labels:
            if isinstance(label, numbers.Integral) and not isinstance(label, bool):
                label = int(label)  # numpy integers compare and format like ints from here on
            if label is None or (type(label) is int and label == -1):
                ids.append(config.null_class_id)
                continue
            if type(label) is not int or not 0 <= label < config.num_classes:
                raise ValueError(
                    f"Class label {label!r} is out of range: expected an int in [0, {config.num_classes}) or None "
                    "for the unconditional (null) class."
                )
            ids.append(config.codebook_size + 1 + label)
        return torch.tensor(ids, dtype=torch.long, device=device or self.device)[:, None]

    def _check_inputs(self, input_ids: torch.LongTensor, orders: torch.LongTensor | None):
        config = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, 1 + num_image_tokens), got shape {tuple(input_ids.shape)}.")
        num_image_tokens = input_ids.shape[1] - 1
        if num_image_tokens > config.image_seq_len:
            raise ValueError(
                f"input_ids holds {num_image_tokens} image tokens after the class token; this model generates at most "
                f"image_seq_len={config.image_seq_len}."
            )
        condition = input_ids[:, 0]
        first_class = config.codebook_size + 1
        bad = (condition < first_class) | (condition > config.null_class_id)
        if bad.any():
            value = condition[bad][0].item()
            raise ValueError(
                f"input_ids[:, 0] must be a class token in [{first_class}, {config.null_class_id}] (class c is "
                f"{first_class} + c, the null class {config.null_class_id}); got {value}. Use prepare_class_ids()."
            )
        tokens = input_ids[:, 1:]
        bad = (tokens < 0) | (tokens >= config.codebook_size)
        if bad.any():
            raise ValueError(
                f"Image token {tokens[bad][0].item()} is out of range: expected ids in [0, {config.codebook_size})."
            )
        if orders is not None:
            expected = (input_ids.shape[0], config.image_seq_len)
            if orders.dim() != 2 or tuple(orders.shape) != expected:
                raise ValueError(f"orders must have shape {expected} (batch, image_seq_len), got {tuple(orders.shape)}.")
            reference = torch.arange(config.image_seq_len, device=orders.device)
            if not torch.equal(orders.sort(dim=1).values, reference.expand_as(orders)):
                raise ValueError(f"Each row of orders must be a permutation of [0, {config.image_seq_len}).")

    # ------------------------------------------------------------------------------------------------------ forward
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        orders: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        condition_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(B, 1 + N)`, *optional*):
            Causal-LM labels aligned with `input_ids` (`-100` ignored, shifted inside), or pass `shift_labels` already
            aligned with the logits. The loss is transformers' `self.loss_function` (`ForCausalLMLoss`), so
            `num_items_in_batch` (the number of labelled tokens over all gradient-accumulation micro-batches) gives a
            sum normalised by it, as the Trainer expects.

        Returns `CausalLMOutputWithPast` (a tuple with `return_dict=False`); `hidden_states` and `attentions` as
        [`RARModel.forward`] describes (they count the cls slot on a call that starts a sequence).
        """
        if input_ids is None:
            raise ValueError("RARForImageGeneration needs input_ids: the class token followed by image tokens.")
        if cache_position is None:
            cache_position = self.model.cache_position(input_ids, cache)
        starts_sequence = cache_position.shape[0] == input_ids.shape[1] + 1
        # Checked once per sequence: the decoding steps only feed tokens that the sampler drew.
        if starts_sequence and not torch.compiler.is_compiling():
            self._check_inputs(input_ids, orders)
        outputs = self.model(
            input_ids=input_ids,
            condition_ids=condition_ids,
            orders=orders,
            cache=cache,
            use_cache=use_cache,
            cache_position=cache_position,
            return_dict=True,  # this method makes the tuple, if asked
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.codebook_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    # ----------------------------------------------------------------------------------------------- generation
    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        use_cache=True,
        orders=None,
        guidance=False,
        modulation_cache=None,
        step_callback: RARStepCallback | None = None,
        next_sequence_length=None,
        is_first_iteration=None,
        **kwargs,
    ):
        r"""
        The model inputs of one generation step. RAR consumes `attention_mask` (its sequences never hold padding),
        `guidance` (the step runs the doubled batch `[conditional; null]`), `modulation_cache` and `next_sequence_length`
        (a step feeds the newest token once the cache holds the sequence); every other keyword (output flags, user
        arguments) is passed on to `forward()`, as transformers' own `prepare_inputs_for_generation` does.
        """
        # Inputs are views of the sequence that grows every step: copies keep their strides fixed, so that a compiled
        # forward is not recompiled at every step (transformers' own prepare_inputs_for_generation does the same).
        condition_ids = input_ids[:, 0].clone(memory_format=torch.contiguous_format)
        length = input_ids.shape[1]
        starts_sequence = cache is None or length == 1
        rewind = step_callback.pop_rewind() if step_callback is not None else None
        if starts_sequence:
            # The whole sequence (generate() prompts are one class token): the model prepends the cls slot.
            model_input_ids = input_ids.clone(memory_format=torch.contiguous_format)
            cache_position = torch.arange(length + 1, device=input_ids.device)
            start = 0
        elif rewind is not None:
            # The step callback replaced image tokens that are already cached: drop the cache from the first of
            # them (slot 2 + index, after cls and the condition) and feed them again with the newest token.
            start = 2 + rewind
            cache.crop(start - length)
            model_input_ids = input_ids[:, 1 + rewind :]
            cache_position = torch.arange(start, length + 1, device=input_ids.device)
        else:
            # The cache holds cls, the condition and all tokens but the newest one: `length` slots.
            model_input_ids = input_ids[:, -1:].clone(memory_format=torch.contiguous_format)
            cache_position = torch.tensor([length], device=input_ids.device)
            start = length
        if guidance:
            unconditional = model_input_ids.clone()
            if starts_sequence:
                unconditional[:, 0] = self.config.null_class_id
            model_input_ids = torch.cat([model_input_ids, unconditional])
            condition_ids = torch.cat([condition_ids, torch.full_like(condition_ids, self.config.null_class_id)])
            if orders is not None:
                orders = torch.cat([orders, orders])
        modulations = None
        if modulation_cache is not None and cache is not None:
            modulations = modulation_cache.modulations(self.model, condition_ids, start, cache_position.shape[0])
        model_inputs = {key: value for key, value in kwargs.items() if key != "labels"}
        model_inputs.update(
            input_ids=model_input_ids,
            condition_ids=condition_ids,
            orders=orders,
            cache=cache,
            use_cache=use_cache,
            cache_position=cache_position,
            modulations=modulations,
            logits_to_keep=1,
        )
        return model_inputs

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
    ):
        # The cache also holds the cls slot (one more position than input_ids) and, with guidance, the null rows.
        batch_size = batch_size * (2 if model_kwargs.get("guidance") else 1)
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length + 1, *args, **kwargs
        )

    def _check_generation_request(self, kwargs: dict, guidance: bool, orders) -> dict:
        """Reject what RAR cannot generate, before any compute; returns `kwargs` with consistent token counts."""
        if kwargs.get("prompt_lookup_num_tokens") is not None:
            raise ValueError(
                "generate() does not accept `prompt_lookup_num_tokens`: prompt lookup drafts tokens by copying n-grams "
                "of the prompt, and a class token followed by image tokens has no text to look up. Speculative "
                "decoding for RAR is `assistant_model=` (a smaller RAR) or `jacobi_window=`."
            )
        generation_config = kwargs.get("generation_config") or self.generation_config
        num_beams = kwargs.get("num_beams", generation_config.num_beams) or 1
        if num_beams > 1 and guidance:
            raise ValueError(
                f"Beam search (num_beams={num_beams}) cannot run with classifier-free guidance: guidance merges the "
                "[conditional; null] rows into one set of scores per image, which beam search cannot reorder. Pass "
                "guidance_scale=1.0 to beam-search the conditional model."
            )
        if num_beams > 1 and orders is not None:
            raise ValueError(f"Beam search (num_beams={num_beams}) runs in raster order only (orders=None).")
        left = self.config.image_seq_len  # the prompt is the class token alone
        max_new = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        if kwargs.get("max_length") is not None and kwargs.get("max_new_tokens") is None:
            max_new = kwargs["max_length"] - 1
        min_new = kwargs.get("min_new_tokens")
        if min_new is None and kwargs.get("min_length") is not None:
            min_new = kwargs["min_length"] - 1
        for name, value in (("max_new_tokens", max_new), ("min_new_tokens", min_new)):
            if value is not None and value > left:
                raise ValueError(
                    f"{name}={value} (or the max_length/min_length it comes from) asks for more image tokens than an "
                    f"image holds: image_seq_len={left} after the class token. Pass at most {left} (fewer give a "
                    "partial image in generation order)."
                )
        if max_new is not None and max_new < left:
            if orders is not None:
                raise ValueError(
                    f"A partial image (max_new_tokens={max_new} < image_seq_len={left}) is only returned in raster "
                    "order (orders=None): other orders are reordered to raster positions, which needs every token."
                )
            if min_new is None:
                # The default min_new_tokens is a whole image: a partial request lowers it with the maximum.
                kwargs = {**kwargs, "min_new_tokens": max_new}
        return kwargs

    def _resolve_orders(self, orders, batch_size: int, device, generator=None) -> torch.LongTensor | None:
        if orders is None or (isinstance(orders, str) and orders == "raster"):
            return None
        length = self.config.image_seq_len
        if isinstance(orders, str):
            if orders == "random":
                return random_orders(batch_size, length, generator, device)
            from .data.scan_orders import get_scan_order

            height, width = self.config.latent_size
            return get_scan_order(orders, height, width).to(device).expand(batch_size, -1).contiguous()
        orders = torch.as_tensor(orders, dtype=torch.long, device=device)
        if orders.dim() == 1:
            orders = orders.expand(batch_size, -1).contiguous()
        return orders

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        class_labels=None,
        guidance_scale: float | None = None,
        guidance_schedule: str = "pow-cosine",
        guidance_scale_pow: float | None = None,
        orders=None,
        logits_processor: LogitsProcessorList | None = None,
        prepack_weights: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        step_callback: RARStepCallback | None = None,
        **kwargs,
    ):
        r"""
        Sample `image_seq_len` image tokens per class with transformers' generation loop and caches.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, 1)`, *optional*): class tokens from [`prepare_class_ids`].
            class_labels (`list[int | None]`, *optional*): class ids instead of `input_ids` (`None`: unconditional).
            guidance_scale (`float`, *optional*): classifier-free guidance scale `g`; defaults to the config's. With
                `g != 1` the model runs one doubled batch `[conditional; null]` per step and both rows of a pair get
                the same token.
            guidance_schedule (`str`): `"pow-cosine"` (official), `"linear"` or `"constant"`.
            guidance_scale_pow (`float`, *optional*): exponent of the pow-cosine schedule; defaults to the config's.
            orders (`str` or `torch.LongTensor`, *optional*): generation order: `"raster"` (default), `"random"`, a
                scan order name (see `rar_hf.data.scan_orders`) or a `(B, image_seq_len)` permutation tensor.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the source of every random draw of
                the call: the random orders (`orders="random"`) and each sampled token (with the temperature, top-k
                and top-p of the call), so the same generator state gives the same tokens whatever the global RNG did
                meanwhile. One generator per row makes each row depend only on its own. `None`: torch's global RNG
                and transformers' own sampling. With `do_sample=False` only the orders are random.
            step_callback ([`RARStepCallback`], *optional*): called after every generated token; it can replace the
                tokens generated so far (the model continues from the replacement) and stop generation early. When it
                stops early the sequences are shorter (`1 + n`); with a non-raster order they keep `1 + image_seq_len`
                entries with `-1` at the positions not generated.
            prepack_weights (`bool`): on CPU, run the linear layers on oneDNN-packed float32/bfloat16 weights
                (decoding steps about 2x faster). The packed weights replace the plain ones and stay after the call,
                so later calls do not pack again and memory holds one copy; `state_dict()`/`save_pretrained` are
                unchanged, and `train()`, `.to()`, reading a `.weight` or `rar_hf.unpack_linear_weights(model)`
                restore the plain weights (see `rar_hf.pack_linear_weights`). `False` restores them and runs
                `F.linear`. No effect on other devices.
            assistant_model ([`RARForImageGeneration`], *optional*): a smaller RAR with the same codebook and classes
                that drafts `num_assistant_tokens` (default 4) tokens per target pass: speculative sampling, exact
                (see `rar_hf.speculative_rar`). Batches are exact too but accept fewer tokens per pass.
            jacobi_window (`int`, *optional*): speculative Jacobi decoding (training-free, exact) guessing this many
                tokens ahead per pass. With either, `generator=` (a `torch.Generator` or one per row) makes the draws
                reproducible, and `acceptance="relaxed"` (with `relax=`, default 2) trades exactness for speed.
            kwargs: passed to `GenerationMixin.generate` (`temperature`, `top_k`, `top_p`, `do_sample`,
                `cache_implementation="static"`, `use_cache`, `return_dict_in_generate`, `output_scores`, ...).

        Returns:
            `torch.LongTensor` `(B, 1 + image_seq_len)` (or a `GenerateOutput`): the class token then the image tokens
            **in raster order** whatever the generation order. `scores[s]` (with `output_scores=True`) are the guided,
            temperature-scaled scores from which the `s`-th generated token was drawn (`B` rows). `logits[s]`,
            `hidden_states[s]` and `attentions[s]` are the model's raw outputs of step `s`: with guidance they have the
            `2B` rows `[conditional; null]` the model ran; step 0 runs the cls and condition slots (see
            [`RARModel.forward`]), later steps the newest token (the whole sequence with `use_cache=False`).
            `max_new_tokens < image_seq_len` returns the first tokens of the image (raster order only); more than
            `image_seq_len` is an error. Beam search runs without guidance only; `prompt_lookup_num_tokens` is not
            supported (speculative decoding is `assistant_model=` or `jacobi_window=`).
        """
        if input_ids is None:
            if class_labels is None:
                raise ValueError("Pass class_labels (list of class ids, None for unconditional) or input_ids.")
            input_ids = self.prepare_class_ids(class_labels)
        if input_ids.shape[1] != 1:
            raise ValueError(f"generate() takes one class token per row (shape (B, 1)), got {tuple(input_ids.shape)}.")
        batch_size = input_ids.shape[0]
        generation_config = kwargs.get("generation_config") or self.generation_config
        sampling = {
            name: kwargs[name] if kwargs.get(name) is not None else getattr(generation_config, name)
            for name in ("do_sample", "temperature", "top_k", "top_p", "output_scores")
        }
        check_sampling_arguments(
            guidance_scale, guidance_schedule, guidance_scale_pow, sampling["temperature"], sampling["top_k"],
            sampling["top_p"], generator, batch_size,
        )  # fmt: skip
        orders = self._resolve_orders(orders, batch_size, input_ids.device, generator)
        self._check_inputs(input_ids, orders)
        defaults = self.config.sampling_defaults
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        guidance_scale_pow = defaults["guidance_scale_pow"] if guidance_scale_pow is None else guidance_scale_pow
        check_sampling_arguments(guidance_scale=guidance_scale, guidance_scale_pow=guidance_scale_pow)  # the config's
        guidance = guidance_scale != 1.0
        finite_check = RARFiniteLogitsCheck()  # first: it must see the model's raw logits
        processors = LogitsProcessorList([finite_check])
        if guidance:
            scales = guidance_scales(self.config.image_seq_len, guidance_scale, guidance_schedule, guidance_scale_pow)
            processors.append(RARClassifierFreeGuidanceLogitsProcessor(scales, prompt_length=1))
        if logits_processor is not None:
            processors.extend(logits_processor)
        kwargs = self._check_generation_request(kwargs, guidance, orders)
        assistant_model, jacobi_window = kwargs.pop("assistant_model", None), kwargs.pop("jacobi_window", None)
        speculative = assistant_model is not None or jacobi_window is not None
        if speculative and step_callback is not None:
            raise ValueError("step_callback cannot be combined with speculative decoding (assistant_model=, jacobi_window=).")
        sampler = None
        if generator is not None and sampling["do_sample"] and not speculative:
            # transformers samples from the global RNG: draw in a processor instead, and let greedy read the draw.
            sampler = RARSamplingLogitsProcessor(
                generator, sampling["temperature"], sampling["top_k"], sampling["top_p"],
                keep_scores=bool(sampling["output_scores"]),
            )  # fmt: skip
            processors.append(sampler)
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if step_callback is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), step_callback])
        num_rows = batch_size * (2 if guidance else 1)
        if prepack_weights and not self.training:
            # A layout for at least 8 rows: oneDNN's layout for 1-2 rows streams the weights 3x slower at any count.
            pack_linear_weights(self, num_rows=max(8, num_rows))
        elif not prepack_weights:
            unpack_linear_weights(self)
        if speculative:
            # Speculative decoding draws (with `generator`) and verifies several tokens per pass itself.
            outputs = speculative_generate(
                self, input_ids, processors, orders, guidance, assistant_model, jacobi_window=jacobi_window,
                generator=generator, prepack_weights=prepack_weights, **kwargs,
            )  # fmt: skip
        else:
            outputs = super().generate(
                input_ids=input_ids,
                logits_processor=processors,
                orders=orders,
                guidance=guidance,
                modulation_cache=self.modulation_cache_class(),
                step_callback=step_callback,
                **kwargs,
            )
        finite_check.raise_if_non_finite()
        if sampler is not None and sampler.scores is not None and not isinstance(outputs, torch.Tensor):
            outputs.scores = tuple(sampler.scores)  # the distributions drawn from, not the one-hot rows
        if orders is None:
            return outputs
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        # Stopped early (step callback): the positions not generated are -1.
        raster = torch.full((batch_size, 1 + self.config.image_seq_len), -1, dtype=sequences.dtype, device=sequences.device)
        raster[:, :1] = sequences[:, :1]
        raster[:, 1:].scatter_(1, orders[:, : sequences.shape[1] - 1], sequences[:, 1:])
        if isinstance(outputs, torch.Tensor):
            return raster
        outputs.sequences = raster
        return outputs

    # ----------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def fold_target_aware_position_embedding(self) -> "RARForImageGeneration":
        """Fold the target-aware position embedding into the position embedding, for raster order only.

        In raster order the slot at sequence position `p` always predicts position `p + 1`, so the two tables can be
        summed once (the paper's "no extra cost at inference"). Raster logits are unchanged; afterwards any other
        order raises an error. Returns the model.
        """
        model = self.model
        target = model.target_aware_position_embedding
        if target is None:
            return self
        length = self.config.image_seq_len
        # Slots 1..L predict positions 2..L+1; cls (0) and the last image token (L+1) get no target-aware term.
        model.position_embedding[1 : length + 1] += target[2 : length + 2]
        model.target_aware_position_embedding = None
        self.config.target_aware_position_embedding_folded = True
        return self
