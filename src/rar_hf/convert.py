r"""Convert official RAR checkpoints (bytedance/1d-tokenizer) into Hugging Face folders.

    rar-hf convert --generator rar_b.bin --output_dir rar-b
    rar-hf convert --generator rar_xl.bin --tokenizer maskgit-vqgan-imagenet-f16-256.bin \
        --output_dir rar-xl --push_to_hub org/rar-xl

With `--generator` alone the output is a `RARForImageGeneration` folder; with `--tokenizer` too it is a complete
`RARPipeline` folder (transformer/, vqvae/, model_index.json, ImageNet labels, sampling defaults and a model card;
a README.md of your own already in the folder is kept, only its metadata is completed). `python -m rar_hf.convert`
is the same command.

In Python, the one way to load an official checkpoint of either model (a path, or a state dict already loaded):

    from rar_hf.convert import maskgit_vqgan_from_official_checkpoint, rar_from_official_checkpoint
    transformer = rar_from_official_checkpoint("rar_xl.bin")
    vqvae = maskgit_vqgan_from_official_checkpoint("maskgit-vqgan-imagenet-f16-256.bin")
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from .arguments import check_writable, command_parser, run_script
from .configuration_rar import RAR_SAMPLING_DEFAULTS, RARConfig, match_preset
from .modeling_maskgit_vqgan import MaskGITVQModel
from .modeling_rar import RARForImageGeneration
from .weights import load_state_dict_file

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
    _check_keys(converted, expected, unexpected, f"the RAR architecture inferred from its shapes ({config_kwargs})")
    return config_kwargs, converted


def _check_keys(state_dict: dict, expected: dict, unexpected: list, layout: str) -> None:
    """Raise a `ValueError` listing every missing, unexpected and mis-shaped key of `state_dict` (against `expected`)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = unexpected + [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"The checkpoint does not match {layout}:\n  missing: {missing}\n  unexpected: {unexpected}\n"
            f"  mis-shaped: {mis_shaped}"
        )


def rar_from_official_checkpoint(checkpoint, **config_overrides) -> RARForImageGeneration:
    """Build a model from an official RAR generator state dict (`rar_b.bin`, ...) or a path to one.

    The whole config is inferred from the tensor shapes; keyword arguments override config fields (e.g. sampling
    settings). Missing, unexpected or mis-shaped keys raise a `ValueError` that lists them.
    """
    state_dict = _read(checkpoint, "official RAR generator checkpoint")
    config_kwargs, converted = convert_rar_state_dict(state_dict)
    model = RARForImageGeneration(RARConfig(**{**config_kwargs, **config_overrides}))
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _read(checkpoint, what: str) -> dict:
    return load_state_dict_file(checkpoint, what) if isinstance(checkpoint, (str, Path)) else checkpoint


def infer_maskgit_vqgan_config(state_dict: dict) -> dict:
    """MaskGITVQModel config entries (widths, levels, blocks, codebook) from the shapes of an official state dict."""
    required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight", "quantize.embedding.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"Not an official MaskGIT-VQGAN checkpoint: it lacks {missing} "
            f"(found {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})."
        )
    conv_in = state_dict["encoder.conv_in.weight"]
    # Keys look like encoder.down.{level}.block.{block}.conv1.weight; level widths give channel_mult.
    parts = [key.split(".") for key in state_dict if key.startswith("encoder.down.")]
    levels = sorted({int(p[2]) for p in parts if p[2].isdigit()})
    blocks = {p[4] for p in parts if p[2] == "0" and len(p) > 4 and p[3] == "block"}
    level_convs = [f"encoder.down.{i}.block.0.conv1.weight" for i in levels]
    missing = [key for key in level_convs if key not in state_dict]
    if missing:
        raise ValueError(f"Cannot infer channel_mult: the MaskGIT-VQGAN checkpoint lacks {missing}.")
    return {
        "in_channels": conv_in.shape[1],
        "out_channels": state_dict["decoder.conv_out.weight"].shape[0],
        "hidden_channels": conv_in.shape[0],
        "channel_mult": [state_dict[key].shape[0] // conv_in.shape[0] for key in level_convs],
        "num_res_blocks": len(blocks),
        "latent_channels": state_dict["encoder.conv_out.weight"].shape[0],
        "codebook_size": state_dict["quantize.embedding.weight"].shape[0],
    }


def maskgit_vqgan_from_official_checkpoint(checkpoint, **config_overrides) -> MaskGITVQModel:
    """Build a `MaskGITVQModel` from an official MaskGIT-VQGAN state dict (e.g. `maskgit-vqgan-imagenet-f16-256.bin`)
    or a path to one.

    Parameter names equal the official keys (a `module.` prefix from DataParallel/DDP is stripped); the config is
    inferred from the shapes, and keyword arguments set what shapes cannot tell (e.g. `sample_size`,
    `norm_num_groups`). Missing, unexpected or mis-shaped keys raise a `ValueError` that lists them.
    """
    state_dict = _read(checkpoint, "official MaskGIT-VQGAN checkpoint")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("the checkpoint must be a state dict mapping parameter names to tensors")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    config = {**infer_maskgit_vqgan_config(state_dict), **config_overrides}
    model = MaskGITVQModel(**config)
    _check_keys(state_dict, model.state_dict(), [], f"the MaskGIT-VQGAN layout inferred from its shapes ({config})")
    model.load_state_dict(state_dict, strict=True)
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


def push_folder_to_hub(folder, repo_id: str, private: bool = False, commit_message: str = "Upload RAR") -> str:
    """Create the Hub repo if needed and upload `folder` with huggingface_hub; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    return upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


def main(args=None):
    """Run the converter on parsed arguments (an `argparse.Namespace`) or a list of command-line arguments."""
    if not isinstance(args, argparse.Namespace):
        args = command_parser(sys.modules[__name__]).parse_args(args)
    output_dir = Path(args.output_dir)
    # Every file and folder is checked before anything is converted or written.
    check_writable(output_dir, "--output_dir", folder=True)
    generator = load_state_dict_file(args.generator, "official RAR generator checkpoint (--generator)")
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = load_state_dict_file(args.tokenizer, "official MaskGIT-VQGAN checkpoint (--tokenizer)")

    transformer = rar_from_official_checkpoint(generator)
    if args.fold_target_aware_position_embedding:
        transformer.fold_target_aware_position_embedding()
    if tokenizer is None:
        transformer.save_pretrained(output_dir)
    else:
        from .model_card import write_model_card
        from .pipeline_rar import RARPipeline

        pipeline = RARPipeline(transformer=transformer, vqvae=maskgit_vqgan_from_official_checkpoint(tokenizer))
        pipeline.save_pretrained(output_dir)
        write_model_card(output_dir, transformer.config, repo_id=args.push_to_hub)
    print(f"Wrote {output_dir}")
    if args.push_to_hub:
        url = push_folder_to_hub(output_dir, args.push_to_hub, private=args.private)
        print(f"Pushed to {url}")


if __name__ == "__main__":
    prog = "python -m rar_hf.convert"
    run_script(main, command_parser(sys.modules[__name__], prog=prog).parse_args(), prog)
