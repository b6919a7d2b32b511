"""rar-hf: Randomized Autoregressive visual generation (RAR) on transformers, diffusers and accelerate."""

from importlib import import_module

from .quantization import drop_torchao_import_noise

drop_torchao_import_noise()  # before transformers imports torchao (when installed): see rar_hf.quantization

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_rar import RAR_PRESETS, RAR_SAMPLING_DEFAULTS, RARConfig
from .cpu_kernels import (
    cpu_fast_paths,
    disable_cpu_fast_paths,
    enable_cpu_fast_paths,
    replace_with_packed_linear,
    replace_with_plain_linear,
)
from .generation_rar import (
    GUIDANCE_SCHEDULES,
    RARClassifierFreeGuidanceLogitsProcessor,
    RARGenerationMixin,
    guidance_scale_at,
    guidance_scales,
)
from .modeling_rar import RARForImageGeneration, RARModel, RARPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("rar", RARConfig, exist_ok=True)
AutoModel.register(RARConfig, RARModel, exist_ok=True)
AutoModelForCausalLM.register(RARConfig, RARForImageGeneration, exist_ok=True)

# The diffusers-based parts load on first use, so the transformers model works where diffusers is not installed.
_LAZY = {
    "MaskGITVQModel": ".modeling_maskgit_vqgan",
    "RARPipeline": ".pipeline_rar",
    "RARPipelineOutput": ".pipeline_rar",
}

__all__ = [
    "GUIDANCE_SCHEDULES",
    "RAR_PRESETS",
    "RAR_SAMPLING_DEFAULTS",
    "RARClassifierFreeGuidanceLogitsProcessor",
    "RARConfig",
    "RARForImageGeneration",
    "RARGenerationMixin",
    "RARModel",
    "RARPreTrainedModel",
    "cpu_fast_paths",
    "disable_cpu_fast_paths",
    "enable_cpu_fast_paths",
    "guidance_scale_at",
    "guidance_scales",
    "replace_with_packed_linear",
    "replace_with_plain_linear",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
