#!/usr/bin/env python
r"""Pre-tokenise an image dataset with a MaskGIT-VQGAN tokenizer into parquet shards of `tokens` + `label`.

    accelerate launch examples/pretokenize.py --dataset_name ILSVRC/imagenet-1k --vqvae org/maskgit-vqgan \
        --output_dir imagenet-tokens --augmentation ten_crop --num_shards 256
    python examples/pretokenize.py --official_jsonl maskgitvq.jsonl --output_dir imagenet-tokens

Output shards are `OUTPUT_DIR/data/{split}-{i:05d}-of-{n:05d}.parquet`, which `datasets.load_dataset(OUTPUT_DIR)`
and `train_rar.py --pretokenized_dataset OUTPUT_DIR` read. Shard i is written by process i % num_processes, atomically
(a temporary file renamed when complete), and existing shards are skipped: re-running the command resumes.
Augmentations: `center` (ADM centre crop), `center_flip` (centre crop and its mirror, the paper's ablations) and
`ten_crop` (resize the short side to 1.1x, then four corners + centre and their mirrors, the paper's final models).
"""

import argparse
import os
from pathlib import Path

import datasets
import torch
from PIL import ImageOps
from tqdm.auto import tqdm

from rar_hf.data import center_crop_arr, read_official_jsonl, ten_crop_arr, to_tensor

AUGMENTATIONS = ("center", "center_flip", "ten_crop")
FEATURES = datasets.Features({"tokens": datasets.List(datasets.Value("int32")), "label": datasets.Value("int32")})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_name", default=None, help="Image dataset: Hub id, local folder or parquet files.")
    p.add_argument("--official_jsonl", default=None, help="Import the official maskgitvq.jsonl instead of tokenising.")
    p.add_argument("--split", default="train", help="Split to tokenise (also the shard name prefix).")
    p.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it first.")
    p.add_argument("--image_column", default="image", help="Image column ('jpg' for timm/imagenet-1k-wds).")
    p.add_argument("--label_column", default="label", help="Label column ('cls' for timm/imagenet-1k-wds).")
    p.add_argument("--vqvae", default=None, help="MaskGITVQModel folder or Hub id (needed with --dataset_name).")
    p.add_argument("--resolution", type=int, default=256, help="Crop size fed to the tokenizer.")
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


def write_shard(rows: dict, path: Path):
    tmp = path.with_name("." + path.name + ".tmp")
    datasets.Dataset.from_dict(rows, features=FEATURES).to_parquet(str(tmp))
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


def main(args):
    from accelerate import PartialState

    state = PartialState()
    output_dir = Path(args.output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(args.num_shards) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not shard_path(output_dir, args.split, i, args.num_shards).exists()]
    if len(todo) < len(mine):
        print(f"[rank {state.process_index}] {len(mine) - len(todo)} shards already written: resuming")

    if args.official_jsonl is not None:
        if todo:
            rows = list(read_official_jsonl(args.official_jsonl))
            for i in tqdm(todo, desc="shards", disable=not state.is_main_process):
                part = rows[i :: args.num_shards]
                write_shard({"tokens": [r["tokens"] for r in part], "label": [r["label"] for r in part]},
                            shard_path(output_dir, args.split, i, args.num_shards))  # fmt: skip
    else:
        from rar_hf.data import SkipCounter, load_image_dataset
        from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

        dataset = load_image_dataset(
            args.dataset_name,
            split=args.split,
            streaming=args.streaming,
            image_column=args.image_column,
            label_column=args.label_column,
        )
        vqvae = MaskGITVQModel.from_pretrained(args.vqvae).to(state.device).eval()
        skip_counter = SkipCounter()
        for i in tqdm(todo, desc="shards", disable=not state.is_main_process):
            rows = tokenize_shard(args, dataset, i, vqvae, state.device, skip_counter)
            write_shard(rows, shard_path(output_dir, args.split, i, args.num_shards))
        if skip_counter.count:
            print(f"[rank {state.process_index}] skipped {skip_counter.count} undecodable images")
    state.wait_for_everyone()

    if state.is_main_process:
        total = datasets.load_dataset(str(output_dir), split=args.split).num_rows
        print(f"Wrote {args.num_shards} shards, {total} rows, to {output_dir / 'data'}")
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            create_repo(args.push_to_hub, repo_type="dataset", exist_ok=True)
            upload_folder(repo_id=args.push_to_hub, repo_type="dataset", folder_path=str(output_dir), allow_patterns=["data/*.parquet"])


if __name__ == "__main__":
    main(parse_args())
