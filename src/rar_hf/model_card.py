"""Hub model cards (README.md with YAML metadata) for RAR pipeline folders.

The templates are package data in `rar_hf/model_cards/`: one per official size (`rar-b.md`, `rar-l.md`, `rar-xl.md`,
`rar-xxl.md`, with the paper's FID/IS as `model-index` metadata) and `rar-generic.md` for every other model.
"""

from importlib import resources
from pathlib import Path
from string import Template

import torch
from huggingface_hub import ModelCard

from .configuration_rar import match_preset


def model_card_template_name(config, training=None) -> str:
    """`"rar-b"` ... `"rar-xxl"` for the official ImageNet weights of that size, else `"rar-generic"`.

    A model gets an official card (and the paper's metrics) only if it has the official size and token layout and no
    `training` record, i.e. it is a converted official checkpoint rather than a model trained or fine-tuned here.
    """
    preset = match_preset(config.to_dict())
    imagenet_256 = (config.codebook_size, config.num_classes, config.image_seq_len) == (1024, 1000, 256)
    return preset if preset and imagenet_256 and training is None else "rar-generic"


def _num_parameters(config) -> str:
    from .modeling_rar import RARForImageGeneration

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        count = sum(p.numel() for p in RARForImageGeneration(config).parameters())
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def _training_markdown(training) -> str:
    if not training:
        return "Not recorded for this checkpoint."
    if isinstance(training, str):
        return training
    return "\n".join(f"- **{key}**: {value}" for key, value in training.items())


def write_model_card(output_dir, config, repo_id: str | None = None, training: dict | str | None = None) -> Path:
    r"""
    Write `README.md` (Hub model card) into a pipeline folder.

    Args:
        output_dir (`str` or `os.PathLike`): the pipeline folder.
        config ([`RARConfig`]): the generator's config; picks the template (see [`model_card_template_name`]) and fills
            the architecture and the recommended sampling settings (`config.sampling_defaults`).
        repo_id (`str`, *optional*): the Hub repo the folder goes to, used in the usage snippet; defaults to
            `path/to/<folder name>`.
        training (`dict` or `str`, *optional*): how the model was trained (e.g. `{"dataset": "ylecun/mnist",
            "steps": 2000, "batch_size": 64}`), rendered in the "Training" section; a `"dataset"` entry also becomes
            the card's `datasets` metadata. Official checkpoints have none.

    Returns:
        `Path` of the written `README.md`.

    Example:

    ```py
    >>> write_model_card("rar-xl", pipe.transformer.config, repo_id="org/rar-xl")
    ```
    """
    output_dir = Path(output_dir)
    name = model_card_template_name(config, training)
    template = resources.files("rar_hf").joinpath("model_cards", f"{name}.md").read_text(encoding="utf-8")
    sampling = config.sampling_defaults
    height, width = config.latent_size
    text = Template(template).substitute(
        repo_id=repo_id or f"path/to/{output_dir.resolve().name}",
        model_name=(repo_id or output_dir.resolve().name).split("/")[-1],
        guidance_scale=sampling["guidance_scale"],
        guidance_scale_pow=sampling["guidance_scale_pow"],
        temperature=sampling["temperature"],
        num_parameters=_num_parameters(config),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        num_classes=config.num_classes,
        image_seq_len=config.image_seq_len,
        latent_height=height,
        latent_width=width,
        codebook_size=config.codebook_size,
        training=_training_markdown(training),
    )
    card = ModelCard(text)  # parses the YAML front matter: a broken template fails here, not on the Hub
    if isinstance(training, dict) and training.get("dataset"):
        card.data.datasets = [training["dataset"]]
    path = output_dir / "README.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path
