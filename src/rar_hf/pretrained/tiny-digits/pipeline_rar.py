"""Lets diffusers' generic loader open this folder:
`DiffusionPipeline.from_pretrained(..., custom_pipeline="pipeline_rar", trust_remote_code=True)`.
It only imports the installed `rar-hf` package, which the components need anyway."""

from rar_hf.pipeline_rar import RARPipeline  # noqa: F401
