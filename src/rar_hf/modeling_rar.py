"""RAR: a decoder-only transformer with AdaLN blocks and target-aware position embeddings (arXiv 2411.00776).

This file holds the network: its modules, `forward` and loading. How it samples lives in `generation_rar.py`
([`RARGenerationMixin`]); optional CPU kernels (packed linears, a decoding attention) are explicit swaps in
`cpu_kernels.py`.
"""

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
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
from .generation_rar import RARGenerationMixin
from .quantization import check_quantization_config


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


class RARAdaLNModulation(nn.Linear):
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
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        query, key = self.q_norm(query), self.k_norm(key)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
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
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        [`~transformers.PreTrainedModel.from_pretrained`], with transformers' handling of partial checkpoints (missing
        weights are initialised with a warning, e.g. the head when loading a [`RARModel`] checkpoint) and three
        refusals, each one line naming the file: weights whose shapes do not match the config (unless
        `ignore_mismatched_sizes=True`), non-finite (NaN/inf) weights, and pickle-format weights (`*.bin`: rar-hf
        only loads safetensors, which cannot run code; `rar-hf convert` reads the official `.bin` files safely).
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "use_safetensors=False would load pickle-format weights, which can run code: rar-hf loads safetensors "
                "only (official .bin checkpoints go through `rar-hf convert`)."
            )
        kwargs["use_safetensors"] = True
        # A torchao configuration this machine cannot run is refused in one line before any weight is read.
        check_quantization_config(
            kwargs.get("quantization_config"), kwargs.get("device_map"), kwargs.get("dtype", kwargs.get("torch_dtype"))
        )
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"The weights of {pretrained_model_name_or_path} do not match its config: "
                f"{_first_shape_mismatch(cls, pretrained_model_name_or_path, kwargs)}. The config.json and the weights "
                "come from different models (ignore_mismatched_sizes=True re-initialises such tensors)."
            ) from None
        except OSError as error:
            folder = pretrained_model_name_or_path
            subfolder = kwargs.get("subfolder") or ""
            if os.path.isdir(os.path.join(folder, subfolder)) and any(
                name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in os.listdir(os.path.join(folder, subfolder))
            ):
                raise ValueError(
                    f"{os.path.join(folder, subfolder)} holds pickle-format weights but no model.safetensors: rar-hf "
                    "loads safetensors only (a pickle can run code). Official RAR checkpoints: `rar-hf convert`; "
                    "your own: save them with save_pretrained()."
                ) from error
            raise
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and type(tensor) is torch.Tensor and tensor.device.type != "meta":
                if not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"The weights of {pretrained_model_name_or_path} hold NaN or inf values (first in {name}): "
                        "a corrupted checkpoint or a diverged training run; refusing to load them."
                    )
        return (model, info) if output_loading_info else model


def _first_shape_mismatch(cls, path, kwargs) -> str:
    """`"<key> has shape (..) in the checkpoint and (..) in the model"` for the first tensor whose shape differs."""
    try:
        from safetensors import safe_open
        from transformers.utils import cached_file

        subfolder = kwargs.get("subfolder") or ""
        config = cls.config_class.from_pretrained(path, subfolder=subfolder)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        prefix = cls.base_model_prefix + "."
        with safe_open(cached_file(path, "model.safetensors", subfolder=subfolder), framework="pt") as weights:
            for key in weights.keys():
                saved = tuple(weights.get_slice(key).get_shape())
                model_key = key if key in expected else prefix + key
                if model_key in expected and expected[model_key] != saved:
                    return f"{key} has shape {saved} in the checkpoint and {expected[model_key]} in the model"
    except Exception:  # the message is a courtesy: never hide the refusal behind another error
        pass
    return "some tensors have other shapes in the checkpoint than in the model"


class RARModel(RARPreTrainedModel):
    r"""
    The RAR transformer without its output projection.

    The sequence it runs is `[cls, condition, image tokens...]`: a learned cls slot is prepended inside the model, so
    callers pass `input_ids = [condition, image tokens in generation order]`. Slot `s` of that sequence (cls = 0,
    condition = 1, image token `j` = `2 + j`) gets

    - the position embedding of the raster position it holds (`position_embedding[2 + orders[j]]`; rows 0 and 1 are
      the cls and condition slots);
    - the target-aware position embedding of the raster position it must predict (`2 + orders[j + 1]`; zero for cls
      and for the last image token), so that permutations sharing a prefix are told apart;
    - an AdaLN condition `class embedding + condition_position_embedding[s]`.
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

    def _position_tables(self, slots: torch.Tensor, orders: torch.Tensor | None):
        """Position and target-aware embeddings of the sequence slots `slots` (1-D; cls = 0, condition = 1)."""
        num_positions = self.config.image_seq_len + 2
        if orders is None:
            position_index = slots
            target_index = slots + 1
        else:
            # Slot 0 (cls) and 1 (condition) are never permuted; image slot j holds raster position orders[j].
            prefix = torch.arange(2, device=orders.device).expand(orders.shape[0], 2)
            slot_position = torch.cat([prefix, orders + 2], dim=1)  # (B, L + 2)
            position_index = slot_position.index_select(1, slots)
            target_index = slot_position.index_select(1, (slots + 1).clamp(max=num_positions - 1))
        position = self.position_embedding[position_index]
        if self.target_aware_position_embedding is None:
            return position
        # Nothing is predicted from cls's target slot and nothing follows the last image token.
        has_target = ((slots >= 1) & (slots < num_positions - 1)).to(position.dtype)[:, None]
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
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        starts_sequence: bool | None = None,
        modulations: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`):
            A stretch of the sequence `[condition, image tokens in generation order]`: the whole of it (or its start)
            on a call that starts a sequence, the new image tokens on a call that continues a cached one.
        condition_ids (`torch.LongTensor` of shape `(B,)`, *optional*):
            The class token of each row; needed when `input_ids` continues a cached sequence (it then holds no class
            token). By default `input_ids[:, 0]`.
        orders (`torch.LongTensor` of shape `(B, image_seq_len)`, *optional*):
            The generation order as raster positions (`None`: raster order); see [`RARForImageGeneration`].
        attention_mask (`torch.Tensor`, *optional*):
            RAR sequences in a batch always have the same length, so there is nothing to mask: an all-ones mask is
            accepted, anything else (padding) is an error.
        position_ids (`torch.LongTensor` of shape `(T,)` or `(B, T)`, *optional*):
            Index of each `input_ids` entry in `[condition, image tokens...]` (condition = 0, image token `j` =
            `1 + j`), the same for every row. By default read from the cache length.
        starts_sequence (`bool`, *optional*):
            Whether this call starts the sequence: the learned cls slot is then prepended and `input_ids[:, 0]` is the
            class token. By default: when there is no cache or it is empty (reading its length, a device
            synchronisation for a static cache on an accelerator; `generate()` passes it).
        modulations (`list[torch.Tensor]`, *optional*):
            Precomputed AdaLN modulations of this call's slots, one `(B, T', 6 * hidden)` tensor per layer and a last
            `(B, T', 2 * hidden)` one for the output norm (see [`RARModulationCache`]).

        Returns `BaseModelOutputWithPast` (a tuple with `return_dict=False`). `last_hidden_state` has one row per
        `input_ids` entry (the cls slot predicts nothing and is dropped) after the final AdaLN norm. With
        `output_hidden_states=True`, `hidden_states` holds `num_hidden_layers + 1` tensors: the embeddings, then the
        output of each layer, all before the final norm and over the slots this call runs, which **count the cls slot**
        on a call that starts a sequence (`(B, 1 + T, hidden)`, cls at index 0). `attentions` (eager attention; sdpa
        and flash attention return none, as in transformers) are `(B, heads, T', kv_length)` per layer.
        """
        if input_ids is None:
            raise ValueError("RARModel needs input_ids: the class token followed by image tokens (see its docstring).")
        if attention_mask is not None and (attention_mask.dim() != 2 or not bool(attention_mask.all())):
            raise ValueError(
                "RAR does not take a padding attention_mask: its sequences in a batch always have the same length, "
                f"so the only accepted mask is all ones of shape (batch, length); got shape {tuple(attention_mask.shape)}"
                f"{'' if attention_mask.dim() != 2 else ' with zeros'}."
            )
        use_cache = use_cache if use_cache is not None else False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None or starts_sequence is None:
            past_slots = int(cache.get_seq_length()) if cache is not None else 0
            if starts_sequence is None:
                starts_sequence = past_slots == 0
            if position_ids is None:
                first = 0 if starts_sequence else past_slots - 1
                position_ids = torch.arange(first, first + input_ids.shape[1], device=input_ids.device)
        positions = position_ids[0] if position_ids.dim() == 2 else position_ids
        batch_size = input_ids.shape[0]
        embeds = self.embed_tokens(input_ids)
        slots = positions + 1  # slot 0 is the cls slot
        if starts_sequence:
            # The condition comes first in input_ids; the learned cls slot is prepended here.
            condition_ids = input_ids[:, 0]
            embeds = torch.cat([self.cls_token.expand(batch_size, -1, -1).to(embeds.dtype), embeds], dim=1)
            slots = torch.cat([slots.new_zeros(1), slots])
        elif condition_ids is None:
            raise ValueError("Continuing a cached sequence needs `condition_ids` (the class token of each row).")
        if orders is not None and self.target_aware_position_embedding is None:
            raise ValueError(
                "This model's target-aware position embedding was folded into its position embedding for raster "
                "order; it cannot run other orders (pass orders=None)."
            )
        hidden_states = embeds + self._position_tables(slots, orders)
        condition = self.embed_tokens(condition_ids)[:, None, :] + self.condition_position_embedding[slots]

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=None,  # no padding (checked above)
            cache=cache,
            position_ids=slots[None],
        )
        modulations = modulations or [None] * (len(self.layers) + 1)
        for layer, modulation in zip(self.layers, modulations):
            # `position_ids` (the cache slots) reach the attention function, as in transformers' models.
            hidden_states = layer(
                hidden_states,
                condition,
                attention_mask=causal_mask,
                cache=cache,
                modulation=modulation,
                position_ids=slots,
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


class RARForImageGeneration(RARPreTrainedModel, RARGenerationMixin):
    r"""
    RAR with its token head: class-conditional image-token generation.

    `input_ids` is `(B, 1 + N)`: a class (or null) token, then `N <= image_seq_len` image tokens in generation order.
    `orders` (`(B, image_seq_len)`, optional) is that order as raster positions: `input_ids[:, 1 + j]` is the token at
    raster position `orders[:, j]`; `None` is raster order. `logits[:, j]` is the distribution of the `j`-th image
    token of the order. `labels` follow the causal-LM convention (same shape as `input_ids`, shifted inside, -100
    ignored). Use [`~RARGenerationMixin.prepare_class_ids`] to build prompts and
    [`~RARGenerationMixin.generate`] to sample.
    """

    _tied_weights_keys = {}
    # Labels are the input ids themselves (shifted inside): transformers' causal-LM loss, over the image tokens.
    loss_type = "ForCausalLM"

    def __init__(self, config: RARConfig):
        super().__init__(config)
        self.model = RARModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.codebook_size)
        self.generation_config = self.default_generation_config(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def resize_token_embeddings(self, *args, **kwargs):
        raise ValueError(
            "RAR's vocabulary cannot be resized: its ids are the image tokenizer's codebook "
            f"[0, {self.config.codebook_size}), one mask token, then the {self.config.num_classes} classes and the null "
            "class (see RARConfig), and the output head scores exactly the codebook. A different class set is "
            "from_pretrained(path, num_classes=N, ignore_mismatched_sizes=True); a different codebook is a new model."
        )

    def check_inputs(self, input_ids: torch.LongTensor, orders: torch.LongTensor | None = None):
        """Raise a `ValueError` naming the problem unless `input_ids` is `(B, 1 + n)` class token + image tokens with
        `n <= image_seq_len`, and `orders` (if given) one permutation of the raster positions per row."""
        config = self.config
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
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
            raise ValueError(
                f"input_ids[:, 0] must be a class token in [{first_class}, {config.null_class_id}] (class c is "
                f"{first_class} + c, the null class {config.null_class_id}); got {condition[bad][0].item()}. Use "
                "prepare_class_ids()."
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

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        orders: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        condition_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        starts_sequence: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        See [`RARModel.forward`] for the inputs. `logits[:, i]` scores the image token that follows `input_ids[:, i]`.

        labels (`torch.LongTensor` of shape `(B, 1 + N)`, *optional*):
            Causal-LM labels aligned with `input_ids` (`-100` ignored, shifted inside), or pass `shift_labels` already
            aligned with the logits. The loss is transformers' `self.loss_function` (`ForCausalLMLoss`), so
            `num_items_in_batch` (the number of labelled tokens over all gradient-accumulation micro-batches) gives a
            sum normalised by it, as the Trainer expects.
        logits_to_keep (`int`, defaults to 0): compute the logits of the last `logits_to_keep` entries only (0: all).

        Returns `CausalLMOutputWithPast` (a tuple with `return_dict=False`); `hidden_states` and `attentions` as
        [`RARModel.forward`] describes (they count the cls slot on a call that starts a sequence).
        """
        if input_ids is None:
            raise ValueError("RARForImageGeneration needs input_ids: the class token followed by image tokens.")
        if starts_sequence is None:
            starts_sequence = cache is None or int(cache.get_seq_length()) == 0
        # Checked on a call that starts a sequence; generate() checks its prompt once and feeds only drawn tokens.
        if starts_sequence and not torch.compiler.is_compiling():
            self.check_inputs(input_ids, orders)
        outputs = self.model(
            input_ids=input_ids,
            condition_ids=condition_ids,
            orders=orders,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            starts_sequence=starts_sequence,
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
