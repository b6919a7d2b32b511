#!/usr/bin/env python
r"""Pre-tokenise an image dataset with a MaskGIT-VQGAN tokenizer into parquet shards of `tokens` + `label`.

    accelerate launch examples/pretokenize.py --dataset_name ILSVRC/imagenet-1k --vqvae org/maskgit-vqgan \
        --output_dir imagenet-tokens --augmentation ten_crop --num_shards 256
    python examples/pretokenize.py --official_jsonl maskgitvq.jsonl --output_dir imagenet-tokens

Output shards are `OUTPUT_DIR/data/{split}-{i:05d}-of-{n:05d}.parquet`, which `datasets.load_dataset(OUTPUT_DIR)`
and `train_rar.py --pretokenized_dataset OUTPUT_DIR` read. Shard i is written by process i % num_processes, atomically
(a temporary file renamed when complete), and existing shards are skipped: re-running the command resumes.
`OUTPUT_DIR/rar_pretokenized-{split}.json` records what the shards were made from (source, tokenizer hashes,
resolution, augmentation, shard count, code version) and what train_rar.py needs (sequence length, codebook size,
class names); a re-run with any of them changed is refused rather than mixed with the old shards.
Augmentations: `center` (ADM centre crop), `center_flip` (centre crop and its mirror, the paper's ablations) and
`ten_crop` (resize the short side to 1.1x, then four corners + centre and their mirrors, the paper's final models).
"""

import json
import os
from pathlib import Path

import datasets
import torch
from PIL import ImageOps
from tqdm.auto import tqdm

import rar_hf
from rar_hf.arguments import ArgumentParser, run_script
from rar_hf.data import center_crop_arr, pretokenized_metadata_path, read_official_jsonl, ten_crop_arr, to_tensor
from rar_hf.training_utils import UserInputError, describe_load_error, load_pretrained, vqvae_resolution

AUGMENTATIONS = ("center", "center_flip", "ten_crop")
FEATURES = datasets.Features({"tokens": datasets.List(datasets.Value("int32")), "label": datasets.Value("int32")})


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dataset_name", default=None, help="Image dataset: Hub id, local folder or parquet files.")
    p.add_argument("--official_jsonl", default=None, help="Import the official maskgitvq.jsonl instead of tokenising.")
    p.add_argument("--split", default="train", help="Split to tokenise (also the shard name prefix).")
    p.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it first.")
    p.add_argument("--image_column", default="image", help="Image column ('jpg' for timm/imagenet-1k-wds).")
    p.add_argument("--label_column", default="label", help="Label column ('cls' for timm/imagenet-1k-wds).")
    p.add_argument("--vqvae", default=None, help="MaskGITVQModel folder or Hub id (needed with --dataset_name).")
    p.add_argument("--resolution", type=int, default=None, help="Crop size fed to the tokenizer; default: the --vqvae model's sample_size, which it must match.")
    p.add_argument("--augmentation", default="center_flip", choices=AUGMENTATIONS, help="Crops per image (see above).")
    p.add_argument("--batch_size", type=int, default=64, help="Images per tokenizer forward (before augmentation).")
    p.add_argument("--num_shards", type=int, default=16, help="Number of output parquet shards.")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="Image decoding workers per process.")
    p.add_argument("--output_dir", required=True, help="Folder to write data/*.parquet into.")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="Upload the shards as a Hub dataset repo.")
    args = p.parse_args(argv)
    if (args.dataset_name is None) == (args.official_jsonl is None):
        p.error("give exactly one of --dataset_name and --official_jsonl")
    if args.dataset_name is not None and args.vqvae is None:
        p.error("--dataset_name needs --vqvae")
    return args


class Crops:
    """PIL image -> (num_crops, 3, resolution, resolution) tensor in [0, 1]."""

    def __init__(self, resolution: int, augmentation: str):
        self.resolution, self.augmentation = resolution, augmentation

    def __call__(self, image):
        if self.augmentation == "ten_crop":
            crops = ten_crop_arr(image, self.resolution)
        else:
            crops = [center_crop_arr(image, self.resolution)]
            if self.augmentation == "center_flip":
                crops.append(ImageOps.mirror(crops[0]))
        return torch.stack([to_tensor(crop) for crop in crops])


def shard_path(output_dir: Path, split: str, index: int, num_shards: int) -> Path:
    return output_dir / "data" / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"


def write_shard(rows: dict, path: Path, features=FEATURES):
    tmp = path.with_name("." + path.name + ".tmp")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp))
    os.replace(tmp, path)  # a killed run leaves only the temporary file, which the next run overwrites


def tokenize_shard(args, dataset, index, vqvae, device, skip_counter) -> dict:
    from torch.utils.data import DataLoader

    from datasets.distributed import split_dataset_by_node

    from rar_hf.data import decode_images

    part = split_dataset_by_node(dataset, rank=index, world_size=args.num_shards)
    rows = decode_images(part, Crops(args.resolution, args.augmentation), skip_counter=skip_counter)
    loader = DataLoader(rows, batch_size=args.batch_size, num_workers=args.dataloader_num_workers)
    tokens, labels = [], []
    for batch in tqdm(loader, desc=f"shard {index}", leave=False):
        crops = batch["pixel_values"]  # (B, num_crops, 3, H, W)
        with torch.no_grad():
            indices = vqvae.encode(crops.flatten(0, 1).to(device, vqvae.dtype)).indices
        tokens += indices.cpu().tolist()
        labels += batch["label"].repeat_interleave(crops.shape[1]).tolist()
    return {"tokens": tokens, "label": labels}


def fingerprint(args, vqvae=None, dataset=None, first_row=None) -> dict:
    """Everything that determines the shards' contents, and what train_rar.py reads back."""
    common = {"rar_hf_version": rar_hf.__version__, "split": args.split, "num_shards": args.num_shards}
    if args.official_jsonl is not None:
        path = os.path.abspath(args.official_jsonl)
        return {
            **common,
            "source": {"official_jsonl": path, "size": os.path.getsize(path)},
            "tokenizer": {"official": "MaskGIT-VQGAN tokens of the official maskgitvq.jsonl"},
            "resolution": 256,
            "augmentation": "official",
            "image_seq_len": len(first_row["tokens"]) if first_row else 0,
            "latent_size": None,
            "codebook_size": 1024,
            "class_names": None,
        }
    from rar_hf.data import class_names, tokenizer_fingerprint

    name = args.dataset_name
    side = args.resolution // vqvae.downsample_factor
    return {
        **common,
        "source": {
            "dataset_name": os.path.abspath(name) if os.path.exists(name) else name,
            "image_column": args.image_column,
            "label_column": args.label_column,
            "streaming": args.streaming,  # streamed and downloaded datasets are split into shards differently
        },
        "tokenizer": {"name_or_path": args.vqvae, **tokenizer_fingerprint(vqvae)},
        "resolution": args.resolution,
        "augmentation": args.augmentation,
        "image_seq_len": side * side,
        "latent_size": [side, side],
        "codebook_size": vqvae.config.codebook_size,
        "class_names": class_names(dataset),
    }


def check_resumable(output_dir: Path, split: str, expected: dict) -> None:
    """Refuse to add shards to an output folder whose existing `split` shards were made differently."""
    path = Path(pretokenized_metadata_path(output_dir, split))
    written = sorted((output_dir / "data").glob(f"{split}-*.parquet"))
    if not path.is_file():
        if written:
            raise UserInputError(
                f"--output_dir {output_dir} holds {len(written)} {split} shards but no {path.name} saying how they were "
                "made: use another --output_dir or delete them."
            )
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"{path}: unreadable ({type(error).__name__}: {error}); delete {output_dir} to start again.") from None
    changed = [key for key in sorted(set(previous) | set(expected)) if previous.get(key) != expected.get(key)]
    if changed:
        details = "; ".join(f"{key}: {_short(previous.get(key))} then, {_short(expected.get(key))} now" for key in changed)
        raise UserInputError(
            f"--output_dir {output_dir} holds {split} shards made with other settings ({details}): resuming would mix "
            "them. Use another --output_dir or delete that one."
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def write_metadata(output_dir: Path, split: str, fingerprint_: dict, num_rows=None) -> None:
    path = Path(pretokenized_metadata_path(output_dir, split))
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint_, "complete": num_rows is not None, "num_rows": num_rows}, indent=2))
    os.replace(tmp, path)


def main(args):
    from accelerate import PartialState

    state = PartialState()
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"--output_dir {output_dir} exists and is not a folder.")
    if args.num_shards < 1:
        raise UserInputError(f"--num_shards must be >= 1, got {args.num_shards}.")

    if args.official_jsonl is not None:
        try:
            rows = list(read_official_jsonl(args.official_jsonl))
        except FileNotFoundError:
            raise UserInputError(f"--official_jsonl {args.official_jsonl}: no such file.") from None
        except UnicodeDecodeError as error:
            raise UserInputError(f"{args.official_jsonl}: not a text jsonl file ({error.reason} at byte {error.start}).") from None
        except ValueError as error:
            raise UserInputError(f"--official_jsonl: {error}") from None
        if not rows:
            raise UserInputError(f"--official_jsonl {args.official_jsonl} holds no rows.")
        expected, features = fingerprint(args, first_row=rows[0]), FEATURES
    else:
        from rar_hf.data import SkipCounter, load_image_dataset
        from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

        try:
            dataset = load_image_dataset(
                args.dataset_name,
                split=args.split,
                streaming=args.streaming,
                image_column=args.image_column,
                label_column=args.label_column,
            )
        except Exception as error:
            raise UserInputError(f"--dataset_name {args.dataset_name}: cannot load split {args.split!r} ({describe_load_error(error)}).") from error
        vqvae = load_pretrained(MaskGITVQModel, args.vqvae, "--vqvae").to(state.device).eval()
        args.resolution = vqvae_resolution(args.resolution, vqvae, args.vqvae)
        expected = fingerprint(args, vqvae=vqvae, dataset=dataset)
        features = FEATURES
        if expected["class_names"] is not None:  # kept in the shards, so that train_rar.py can name the classes
            features = datasets.Features({**FEATURES, "label": datasets.ClassLabel(names=expected["class_names"])})

    check_resumable(output_dir, args.split, expected)  # every process, before any of them writes
    state.wait_for_everyone()
    if state.is_main_process:
        (output_dir / "data").mkdir(parents=True, exist_ok=True)
        write_metadata(output_dir, args.split, expected)
    state.wait_for_everyone()
    mine = [i for i in range(args.num_shards) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not shard_path(output_dir, args.split, i, args.num_shards).exists()]
    if len(todo) < len(mine):
        print(f"[rank {state.process_index}] {len(mine) - len(todo)} shards already written: resuming")

    if args.official_jsonl is not None:
        for i in tqdm(todo, desc="shards", disable=not state.is_main_process):
            part = rows[i :: args.num_shards]
            write_shard({"tokens": [r["tokens"] for r in part], "label": [r["label"] for r in part]},
                        shard_path(output_dir, args.split, i, args.num_shards))  # fmt: skip
    else:
        skip_counter = SkipCounter()
        for i in tqdm(todo, desc="shards", disable=not state.is_main_process):
            rows = tokenize_shard(args, dataset, i, vqvae, state.device, skip_counter)
            write_shard(rows, shard_path(output_dir, args.split, i, args.num_shards), features)
        if skip_counter.count:
            print(f"[rank {state.process_index}] skipped {skip_counter.count} undecodable images")
    state.wait_for_everyone()

    if state.is_main_process:
        total = datasets.load_dataset(str(output_dir), split=args.split).num_rows
        write_metadata(output_dir, args.split, expected, num_rows=total)
        print(f"Wrote {args.num_shards} shards, {total} rows, to {output_dir / 'data'}")
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            create_repo(args.push_to_hub, repo_type="dataset", exist_ok=True)
            upload_folder(
                repo_id=args.push_to_hub,
                repo_type="dataset",
                folder_path=str(output_dir),
                allow_patterns=["data/*.parquet", "rar_pretokenized-*.json"],
            )


if __name__ == "__main__":
    run_script(main, parse_args())
