"""RAR model configuration."""

from transformers import PreTrainedConfig

# Official sizes (paper, Table 4) and their sampling settings (guidance scale, pow-cosine exponent, temperature).
RAR_PRESETS = {
    "rar-b": dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=16, intermediate_size=3072),
    "rar-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "rar-xl": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120),
    "rar-xxl": dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144),
}
RAR_SAMPLING_DEFAULTS = {
    "rar-b": dict(guidance_scale=16.0, guidance_scale_pow=2.75, temperature=1.0),
    "rar-l": dict(guidance_scale=15.5, guidance_scale_pow=2.5, temperature=1.02),
    "rar-xl": dict(guidance_scale=6.9, guidance_scale_pow=1.5, temperature=1.02),
    "rar-xxl": dict(guidance_scale=8.0, guidance_scale_pow=1.2, temperature=1.02),
}


def match_preset(config_kwargs: dict) -> str | None:
    """Name of the official size whose width, depth, heads and MLP width match, if any."""
    for name, preset in RAR_PRESETS.items():
        if all(config_kwargs.get(k) == v for k, v in preset.items()):
            return name
    return None


class RARConfig(PreTrainedConfig):
    r"""
    Configuration of a [`RARForImageGeneration`] model (Randomized AutoRegressive visual generation, arXiv 2411.00776).

    The token-id layout follows the official implementation: image tokens are `[0, codebook_size)`, id
    `codebook_size` is an unused mask token, class `c` is `codebook_size + 1 + c` and the null (unconditional) class is
    `codebook_size + 1 + num_classes`.

    Args:
        hidden_size (`int`, *optional*, defaults to 1024): width of the transformer.
        num_hidden_layers (`int`, *optional*, defaults to 24): number of AdaLN transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 16): attention heads per block.
        intermediate_size (`int`, *optional*, defaults to 4096): width of the MLP.
        codebook_size (`int`, *optional*, defaults to 1024): number of image tokens of the tokenizer.
        num_classes (`int`, *optional*, defaults to 1000): number of class labels.
        image_seq_len (`int`, *optional*, defaults to 256): number of image tokens per image (16x16 for 256px images).
        latent_size (`list[int]`, *optional*): the `(height, width)` token grid; defaults to the square grid of
            `image_seq_len` tokens. Only used to lay out tokens (scan orders, decoding).
        dropout (`float`, *optional*, defaults to 0.1): dropout on attention projections and MLP outputs (training).
        attention_dropout (`float`, *optional*, defaults to 0.1): dropout on attention probabilities (training).
        class_dropout_prob (`float`, *optional*, defaults to 0.1): probability that the data collator replaces a class
            by the null class, which trains the unconditional model used by classifier-free guidance.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of every LayerNorm.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the truncated-normal weight init.
        target_aware_position_embedding_folded (`bool`, *optional*, defaults to `False`): set by
            [`RARForImageGeneration.fold_target_aware_position_embedding`]; a folded model only runs raster order.
        sampling_defaults (`dict`, *optional*): sampling settings (`guidance_scale`, `guidance_scale_pow`,
            `guidance_schedule`, `temperature`) that seed the model's `generation_config` when it is built (the presets
            hold the paper's values). Not saved in `config.json`: the model's `generation_config.json` is the one
            source of sampling defaults. Configs written before that (with `sampling_defaults`) still load.
        use_cache (`bool`, *optional*, defaults to `True`): whether a forward without a `cache` creates and returns
            one (the default of `RARModel.forward(use_cache=...)`).

    Example:

    ```python
    >>> from rar_hf import RARConfig, RARForImageGeneration

    >>> config = RARConfig.from_preset("rar-xl")  # 955M parameters, the paper's XL
    >>> model = RARForImageGeneration(config)
    ```
    """

    model_type = "rar"

    def __init__(
        self,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        codebook_size: int = 1024,
        num_classes: int = 1000,
        image_seq_len: int = 256,
        latent_size: list[int] | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        class_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        target_aware_position_embedding_folded: bool = False,
        sampling_defaults: dict | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})."
            )
        if latent_size is None:
            side = int(round(image_seq_len**0.5))
            if side * side != image_seq_len:
                raise ValueError(
                    f"image_seq_len={image_seq_len} is not a square number: pass latent_size=(height, width)."
                )
            latent_size = [side, side]
        latent_size = [int(s) for s in latent_size]
        if len(latent_size) != 2 or latent_size[0] * latent_size[1] != image_seq_len:
            raise ValueError(f"latent_size {latent_size} must be (height, width) with height * width == {image_seq_len}.")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.image_seq_len = image_seq_len
        self.latent_size = latent_size
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.class_dropout_prob = class_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.target_aware_position_embedding_folded = target_aware_position_embedding_folded
        # Read once, by the model's default generation config; never written back (see to_dict).
        self.legacy_sampling_defaults = dict(sampling_defaults) if sampling_defaults else None
        self.use_cache = use_cache
        # The generation loop sees `[condition, image tokens]`; the learned cls slot is added inside the model.
        kwargs.setdefault("bos_token_id", None)
        kwargs.setdefault("pad_token_id", None)
        kwargs.setdefault("eos_token_id", None)
        super().__init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        output.pop("legacy_sampling_defaults", None)
        return output

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: image tokens, the mask token, the classes and the null class."""
        return self.codebook_size + 1 + self.num_classes + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def null_class_id(self) -> int:
        return self.codebook_size + 1 + self.num_classes

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "RARConfig":
        """Config of an official size: `"rar-b"`, `"rar-l"`, `"rar-xl"` or `"rar-xxl"` (keyword arguments override)."""
        key = name.lower().replace("_", "-")
        if not key.startswith("rar-"):
            key = "rar-" + key
        if key not in RAR_PRESETS:
            raise ValueError(f"Unknown RAR preset {name!r}; expected one of {sorted(RAR_PRESETS)}.")
        kwargs = {**RAR_PRESETS[key], **kwargs}
        kwargs.setdefault("sampling_defaults", RAR_SAMPLING_DEFAULTS[key])
        return cls(**kwargs)
