r"""Sample class-conditional images for FID evaluation (ADM protocol: 50 per class, uint8 NHWC under `arr_0`).

    accelerate launch --num_processes 8 -m rar_hf sample --model DIR_OR_HUB_ID --output_dir samples/rar-xl
    rar-hf evaluate --samples samples/rar-xl/samples.npz --reference VIRTUAL_imagenet256_labeled.npz ...

(`rar-hf sample` runs it in one process; `accelerate launch examples/sample_imagenet.py` is the same command.)

Work list: every (class, index) with index < --num_images_per_class, for every class (or --class_labels). Process p of
P takes items p, p + P, p + 2P, ... of that list. Every image has its own random generator seeded from (--seed,
class, index) and the pipeline draws each image's tokens from its own generator, so an image does not depend on the
number of processes, the batch size or the other images of its batch (up to floating-point differences between
batch shapes, which can flip a rare near-tie; generators on CPU and CUDA give different streams).

Outputs in --output_dir: images/{class:04d}_{index:03d}.png (written atomically; existing ones are skipped, so an
interrupted run resumes where it stopped), sampling_fingerprint.json (everything that determines the images: the
models' configs and weight hashes, the sampling settings, seed, classes, count, dtype, rar-hf version; a re-run into
the same folder resumes only if it matches exactly, and otherwise stops naming the settings that differ), then, once every process is done, samples.npz (all images sorted by class
then index, uint8 NHWC under `arr_0`; it is built in memory: about 9.8 GB for 50,000 256px images) and
sampling_settings.json. Sampling settings default to the model's `generation_config` (the paper's values for
the official sizes). Pixels become uint8 as the official RAR sampler does, by truncation: `uint8(clamp(x, 0, 1) * 255)`
(`--uint8_rounding round` rounds instead); TF32 matmuls are on by default on CUDA, as in the official sampler.
"""

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..arguments import check_writable, finite_float, positive_int
from ..weights import weights_sha256
from ._loading import load_pipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FINGERPRINT_FILE = "sampling_fingerprint.json"
# Config entries that say where or with what a model was saved, not what it computes.
_CONFIG_BOOKKEEPING = ("_name_or_path", "_commit_hash", "transformers_version", "_diffusers_version", "dtype", "torch_dtype")


def add_arguments(p):
    p.add_argument("--model", required=True, help="RARPipeline folder or Hub id.")
    p.add_argument("--output_dir", required=True, help="Where images/, samples.npz and sampling_settings.json go.")
    p.add_argument("--num_images_per_class", type=positive_int, default=50, help="Images per class (ADM protocol: 50).")
    p.add_argument("--num_classes", type=positive_int, default=None, help="Use classes 0..N-1 (default: all of the model's).")
    p.add_argument("--class_labels", type=int, nargs="+", default=None, help="Only these class ids (a subset).")
    p.add_argument("--batch_size", type=positive_int, default=64, help="Images per pipeline call per process.")
    p.add_argument("--guidance_scale", type=finite_float, default=None, help="Default: the model's generation_config.")
    p.add_argument("--guidance_scale_pow", type=finite_float, default=None, help="Default: the model's generation_config.")
    p.add_argument("--guidance_schedule", default="pow-cosine", help="pow-cosine (official), linear or constant.")
    p.add_argument("--temperature", type=finite_float, default=None, help="Default: the model's generation_config.")
    p.add_argument("--seed", type=int, default=0, help="Seed from which every image's seed is derived.")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Compute dtype of both models.")
    p.add_argument("--cache_implementation", default=None, help="transformers KV cache, e.g. 'static'.")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA.")
    p.add_argument("--uint8_rounding", default="truncate", choices=["truncate", "round"],
                   help="How [0, 1] pixels become uint8 (official RAR: truncate).")


def image_seed(seed: int, class_id: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, class, index); hashing keeps nearby triples apart."""
    digest = hashlib.blake2b(f"rar-sample-imagenet/{seed}/{class_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def image_path(output_dir: Path, class_id: int, index: int) -> Path:
    return output_dir / "images" / f"{class_id:04d}_{index:03d}.png"


def to_uint8(images: np.ndarray, rounding: str) -> np.ndarray:
    images = np.clip(images, 0.0, 1.0) * 255.0
    return (np.round(images) if rounding == "round" else images).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)  # a killed process never leaves a truncated PNG that a resumed run would skip


def config_sha256(config) -> str:
    config = {k: v for k, v in dict(config).items() if k not in _CONFIG_BOOKKEEPING}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sampling_fingerprint(pipe, settings: dict, args, classes: list[int], device: torch.device) -> dict:
    """Everything that determines the images (not the batch size or process count, which do not change them)."""
    from .. import __version__

    return {
        "transformer_config_sha256": config_sha256(pipe.transformer.config.to_dict()),
        "transformer_weights_sha256": weights_sha256(pipe.transformer),
        "vqvae_config_sha256": config_sha256(pipe.vqvae.config),
        "vqvae_weights_sha256": weights_sha256(pipe.vqvae),
        **settings,
        "seed": args.seed,
        "class_labels": classes,
        "num_images_per_class": args.num_images_per_class,
        "dtype": args.dtype,
        "uint8_rounding": args.uint8_rounding,
        "cache_implementation": args.cache_implementation,
        "tf32": bool(args.tf32 and device.type == "cuda"),
        "generator_device": device.type,  # CPU and CUDA generators give different streams
        "rar_hf_version": __version__,
    }


def _describe(key, stored, current) -> str:
    if key.endswith("_sha256"):
        return f"{key.removesuffix('_sha256').replace('_', ' ')} differ"
    if key == "class_labels" and isinstance(stored, list) and isinstance(current, list):
        return f"class_labels ({len(stored)} classes {_span(stored)} there, {len(current)} classes {_span(current)} now)"
    return f"{key} ({stored!r} there, {current!r} now)"


def _span(classes: list) -> str:
    return str(classes) if len(classes) <= 6 else f"[{classes[0]}, {classes[1]}, ..., {classes[-1]}]"


def check_fingerprint(output_dir: Path, fingerprint: dict) -> None:
    """Resume only into a folder sampled with exactly these settings; otherwise name every setting that differs."""
    path = output_dir / FINGERPRINT_FILE
    if not path.is_file():
        raise ValueError(
            f"{output_dir} holds sampled images but no {FINGERPRINT_FILE}, so they cannot be matched to these "
            "settings (written by an older rar-hf?); use another --output_dir or remove its images/"
        )
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}); remove the folder's images/ and {FINGERPRINT_FILE}") from error
    keys = [*fingerprint, *(key for key in stored if key not in fingerprint)]
    differing = [_describe(k, stored.get(k), fingerprint.get(k)) for k in keys if stored.get(k) != fingerprint.get(k)]
    if differing:
        raise ValueError(
            f"{output_dir} holds images sampled with other settings, refusing to mix them: {'; '.join(differing)}. "
            "Use another --output_dir, re-run with the stored settings, or remove its images/ to start over"
        )


def main(args):
    from accelerate import Accelerator

    accelerator = Accelerator()
    if args.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    output_dir = Path(args.output_dir)
    check_writable(output_dir, "--output_dir", folder=True)

    pipe = load_pipeline(args.model)
    config = pipe.transformer.config
    if args.class_labels is not None:
        classes = sorted(set(args.class_labels))
    else:
        classes = list(range(args.num_classes if args.num_classes is not None else config.num_classes))
    bad = [c for c in classes if not 0 <= c < config.num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are outside this model's classes 0..{config.num_classes - 1}")
    defaults = pipe.transformer.generation_config
    settings = {
        "guidance_scale": defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        "guidance_scale_pow": defaults.guidance_scale_pow if args.guidance_scale_pow is None else args.guidance_scale_pow,
        "guidance_schedule": args.guidance_schedule,
        "temperature": defaults.temperature if args.temperature is None else args.temperature,
    }

    # Hashed before the weights move or change dtype; every process computes it, so every process can check it.
    fingerprint = sampling_fingerprint(pipe, settings, args, classes, accelerator.device)
    pipe.to(accelerator.device)
    if args.dtype != "float32":
        pipe.transformer.to(dtype=DTYPES[args.dtype])  # the VQ model decodes in float32 (see MaskGITVQModel)
    pipe.set_progress_bar_config(disable=True)
    if accelerator.is_main_process:
        existing = (output_dir / "images").is_dir() and any((output_dir / "images").glob("[0-9]*.png"))
        if not existing and not (output_dir / FINGERPRINT_FILE).exists():
            (output_dir / "images").mkdir(parents=True, exist_ok=True)
            tmp = output_dir / f".{FINGERPRINT_FILE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
            os.replace(tmp, output_dir / FINGERPRINT_FILE)
    accelerator.wait_for_everyone()
    check_fingerprint(output_dir, fingerprint)

    work = [(c, i) for c in classes for i in range(args.num_images_per_class)]  # sorted by class, then index
    mine = work[accelerator.process_index :: accelerator.num_processes]
    todo = [(c, i) for c, i in mine if not image_path(output_dir, c, i).exists()]
    print(f"process {accelerator.process_index}/{accelerator.num_processes}: {len(mine) - len(todo)} of {len(mine)} "
          f"images already exist, generating {len(todo)}", flush=True)

    start = time.perf_counter()
    progress = tqdm(total=len(todo), desc="images (main process)", disable=not accelerator.is_local_main_process)
    for offset in range(0, len(todo), args.batch_size):
        batch = todo[offset : offset + args.batch_size]
        generators = [torch.Generator(accelerator.device).manual_seed(image_seed(args.seed, c, i)) for c, i in batch]
        images = pipe(
            class_labels=[c for c, _ in batch],
            guidance_scale=settings["guidance_scale"],
            guidance_scale_pow=settings["guidance_scale_pow"],
            guidance_schedule=settings["guidance_schedule"],
            temperature=settings["temperature"],
            generator=generators,
            output_type="np",
            cache_implementation=args.cache_implementation,
        ).images
        for (c, i), image in zip(batch, to_uint8(images, args.uint8_rounding)):
            save_png(image, image_path(output_dir, c, i))
        progress.update(len(batch))
    progress.close()
    if todo:
        print(f"process {accelerator.process_index}: {len(todo)} images in {time.perf_counter() - start:.1f} s", flush=True)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [image_path(output_dir, c, i).name for c, i in work if not image_path(output_dir, c, i).exists()]
        if missing:
            raise RuntimeError(f"{len(missing)} images are missing (e.g. {missing[:3]}); run the script again")
        first = np.asarray(Image.open(image_path(output_dir, *work[0])).convert("RGB"))
        samples = np.empty((len(work), *first.shape), dtype=np.uint8)
        for k, (c, i) in enumerate(tqdm(work, desc="samples.npz")):
            samples[k] = np.asarray(Image.open(image_path(output_dir, c, i)).convert("RGB"))
        np.savez(output_dir / "samples.npz", arr_0=samples)
        record = {
            "model": args.model,
            "fingerprint": fingerprint,
            **settings,
            "seed": args.seed,
            "seeding": "one torch.Generator per image on the sampling device, seeded with "
            "blake2b('rar-sample-imagenet/{seed}/{class}/{index}') (first 8 bytes, little-endian, 63 bits)",
            "num_classes": len(classes),
            "class_labels": classes if args.class_labels is not None else None,
            "num_images_per_class": args.num_images_per_class,
            "num_images": len(work),
            "image_shape": list(first.shape),
            "uint8_rounding": args.uint8_rounding,
            "dtype": args.dtype,
            "tf32": bool(args.tf32 and torch.cuda.is_available()),
            "cache_implementation": args.cache_implementation,
            "batch_size": args.batch_size,
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "torch": torch.__version__,
        }
        (output_dir / "sampling_settings.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {output_dir / 'samples.npz'} {samples.shape} and sampling_settings.json", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()

