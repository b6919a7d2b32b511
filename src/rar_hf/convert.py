r"""Convert official RAR checkpoints (bytedance/1d-tokenizer) into Hugging Face folders.

    rar-hf convert --generator rar_b.bin --output_dir rar-b
    rar-hf convert --generator rar_xl.bin --tokenizer maskgit-vqgan-imagenet-f16-256.bin \
        --output_dir rar-xl --push_to_hub org/rar-xl

With `--generator` alone the output is a `RARForImageGeneration` folder; with `--tokenizer` too it is a complete
`RARPipeline` folder (transformer/, vqvae/, model_index.json, ImageNet labels, sampling defaults and a model card;
a README.md of your own already in the folder is kept, only its metadata is completed). `python -m rar_hf.convert`
is the same command.
"""

import argparse
import re
from pathlib import Path

import torch

from .configuration_rar import RAR_SAMPLING_DEFAULTS, RARConfig, match_preset
from .modeling_rar import RARForImageGeneration

# Official key -> our key; `{i}` is a block index.
_RAR_KEY_MAP = {
    "cls_token": "model.cls_token",
    "embeddings.weight": "model.embed_tokens.weight",
    "blocks.{i}.norm1.{p}": "model.layers.{i}.input_layernorm.{p}",
    "blocks.{i}.attn.qkv.{p}": "model.layers.{i}.self_attn.qkv_proj.{p}",
    "blocks.{i}.attn.q_norm.{p}": "model.layers.{i}.self_attn.q_norm.{p}",
    "blocks.{i}.attn.k_norm.{p}": "model.layers.{i}.self_attn.k_norm.{p}",
    "blocks.{i}.attn.proj.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "blocks.{i}.norm2.{p}": "model.layers.{i}.post_attention_layernorm.{p}",
    "blocks.{i}.mlp.fc1.{p}": "model.layers.{i}.mlp.fc1.{p}",
    "blocks.{i}.mlp.fc2.{p}": "model.layers.{i}.mlp.fc2.{p}",
    "blocks.{i}.adaLN_modulation.1.{p}": "model.layers.{i}.adaln_modulation.{p}",
    "adaln_before_head.adaLN_modulation.1.{p}": "model.final_adaln_modulation.{p}",
    "lm_head.{p}": "lm_head.{p}",
}
# The official position tables carry spare rows (image_seq_len + 1024, + 100); only the first L + 2 are ever used.
_RAR_TABLES = {
    "pos_embed": ("model.position_embedding", 1024),
    "target_aware_pos_embed": ("model.target_aware_position_embedding", 1024),
    "timesteps_embeddings": ("model.condition_position_embedding", 100),
}


def _compile_key_map():
    patterns = []
    for official, ours in _RAR_KEY_MAP.items():
        regex = re.escape(official).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        patterns.append((re.compile(regex + "$"), ours))
    return patterns


_RAR_KEY_PATTERNS = _compile_key_map()


def load_official_state_dict(path) -> dict:
    """Load an official `.bin` (`torch.load(weights_only=True)`) or `.safetensors` state dict, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated, corrupted or not a state dict): {error}"
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state_dict).__name__}).")
    return state_dict


def _shape_of(state_dict, key):
    if key not in state_dict:
        raise ValueError(
            f"Not an official RAR generator checkpoint: key {key!r} is missing "
            f"(found {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})."
        )
    return tuple(state_dict[key].shape)


def infer_rar_config(state_dict: dict) -> dict:
    """Infer RARConfig fields (width, depth, heads, MLP width, codebook, classes, sequence length) from shapes."""
    num_rows, hidden_size = _shape_of(state_dict, "embeddings.weight")
    codebook_size = _shape_of(state_dict, "lm_head.weight")[0]
    head_dim = _shape_of(state_dict, "blocks.0.attn.q_norm.weight")[0]
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    image_seq_len = _shape_of(state_dict, "pos_embed")[1] - 1024
    timestep_len = _shape_of(state_dict, "timesteps_embeddings")[1] - 100
    if image_seq_len != timestep_len or image_seq_len <= 0:
        raise ValueError(
            f"Inconsistent sequence length: pos_embed implies {image_seq_len} image tokens, timesteps_embeddings "
            f"implies {timestep_len}."
        )
    if hidden_size % head_dim:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of the QK-norm width {head_dim}.")
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=max(layer_ids) + 1 if layer_ids else 0,
        num_attention_heads=hidden_size // head_dim,
        intermediate_size=_shape_of(state_dict, "blocks.0.mlp.fc1.weight")[0],
        codebook_size=codebook_size,
        num_classes=num_rows - codebook_size - 2,
        image_seq_len=image_seq_len,
        dropout=0.0,
        attention_dropout=0.0,
    )


def convert_rar_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """Official generator state dict -> (RARConfig kwargs, our state dict). Errors list every bad key."""
    config_kwargs = infer_rar_config(state_dict)
    preset = match_preset(config_kwargs)
    if preset is not None:
        config_kwargs["sampling_defaults"] = dict(RAR_SAMPLING_DEFAULTS[preset])
    length = config_kwargs["image_seq_len"]
    converted, unexpected = {}, []
    for key, tensor in state_dict.items():
        if key in _RAR_TABLES:
            new_key, _ = _RAR_TABLES[key]
            converted[new_key] = tensor[0, : length + 2].clone() if tensor.dim() == 3 else tensor
            continue
        for pattern, template in _RAR_KEY_PATTERNS:
            match = pattern.match(key)
            if match:
                converted[template.format(**match.groupdict())] = tensor
                break
        else:
            unexpected.append(key)

    with torch.device("meta"):
        expected = RARForImageGeneration(RARConfig(**config_kwargs)).state_dict()
    missing = [k for k in expected if k not in converted]
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    unexpected += [k for k in converted if k not in expected]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "The checkpoint does not match the RAR architecture inferred from its shapes "
            f"({config_kwargs}):\n  missing: {missing}\n  unexpected: {unexpected}\n  mis-shaped: {mis_shaped}"
        )
    return config_kwargs, converted


def rar_from_official_checkpoint(checkpoint, **config_overrides) -> RARForImageGeneration:
    """Build a model from an official RAR generator state dict (`rar_b.bin`, ...) or a path to one.

    The whole config is inferred from the tensor shapes; keyword arguments override config fields (e.g. sampling
    settings). Missing, unexpected or mis-shaped keys raise a `ValueError` that lists them.
    """
    state_dict = load_official_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    config_kwargs, converted = convert_rar_state_dict(state_dict)
    model = RARForImageGeneration(RARConfig(**{**config_kwargs, **config_overrides}))
    model.load_state_dict(converted, strict=True)
    return model.eval()


def add_arguments(parser):
    parser.add_argument("--generator", required=True, help="Official RAR generator state dict (rar_b.bin, ...).")
    parser.add_argument(
        "--tokenizer", default=None, help="Official MaskGIT-VQGAN state dict; with it a full RARPipeline is written."
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write (created if needed).")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="Upload the folder to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--fold_target_aware_position_embedding",
        action="store_true",
        help="Fold the target-aware table into the position table (raster-order inference only).",
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def push_folder_to_hub(folder, repo_id: str, private: bool = False, commit_message: str = "Upload RAR") -> str:
    """Create the Hub repo if needed and upload `folder` with huggingface_hub; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    return upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


def main(argv=None):
    """Run the converter on command-line arguments (a list) or parsed ones (an `argparse.Namespace`)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():  # save_pretrained would only log this and write nothing
        raise FileExistsError(f"--output_dir {output_dir} is an existing file, expected a folder (new or existing)")
    transformer = rar_from_official_checkpoint(args.generator)
    if args.fold_target_aware_position_embedding:
        transformer.fold_target_aware_position_embedding()
    if args.tokenizer is None:
        transformer.save_pretrained(output_dir)
    else:
        from .modeling_maskgit_vqgan import MaskGITVQModel
        from .pipeline_rar import RARPipeline

        vqvae = MaskGITVQModel.from_official_checkpoint(args.tokenizer)
        pipeline = RARPipeline(transformer=transformer, vqvae=vqvae)
        pipeline.save_pretrained(output_dir)
        from .model_card import write_model_card

        write_model_card(output_dir, transformer.config, repo_id=args.push_to_hub)
    print(f"Wrote {output_dir}")
    if args.push_to_hub:
        url = push_folder_to_hub(output_dir, args.push_to_hub, private=args.private)
        print(f"Pushed to {url}")


if __name__ == "__main__":
    import sys

    from .cli import run_script

    run_script(sys.modules[__name__], prog="python -m rar_hf.convert")
