"""rar-hf: Randomized Autoregressive visual generation (RAR) on transformers, diffusers and accelerate."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_rar import RAR_PRESETS, RAR_SAMPLING_DEFAULTS, RARConfig
from .generation_rar import GUIDANCE_SCHEDULES, RARClassifierFreeGuidanceLogitsProcessor, guidance_scale_at, guidance_scales
from .modeling_maskgit_vqgan import MaskGITVQModel
from .modeling_rar import RARForImageGeneration, RARModel, RARPreTrainedModel
from .pipeline_rar import RARPipeline, RARPipelineOutput

__version__ = "0.1.0"

AutoConfig.register("rar", RARConfig, exist_ok=True)
AutoModel.register(RARConfig, RARModel, exist_ok=True)
AutoModelForCausalLM.register(RARConfig, RARForImageGeneration, exist_ok=True)

__all__ = [
    "GUIDANCE_SCHEDULES",
    "MaskGITVQModel",
    "RAR_PRESETS",
    "RAR_SAMPLING_DEFAULTS",
    "RARClassifierFreeGuidanceLogitsProcessor",
    "RARConfig",
    "RARForImageGeneration",
    "RARModel",
    "RARPipeline",
    "RARPipelineOutput",
    "RARPreTrainedModel",
    "guidance_scale_at",
    "guidance_scales",
]
