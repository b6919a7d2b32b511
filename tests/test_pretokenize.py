"""examples/pretokenize.py and the on-the-fly tokenising path of examples/train_rar.py on a made-up image dataset, run
in this process as their `__main__` runs them."""

import importlib.util
import io
import json
import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from rar_hf.arguments import run_script
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 24


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"example_{name.removesuffix('.py')}", REPO / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _no_stream_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s after each streamed pass over parquet shards (a guard for arrow's reader threads at
    # interpreter exit, apache/arrow#45214); in-process, the interpreter goes on, and the runs here cross many passes.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in ("pretokenize.py", "train_rar.py")}


@pytest.fixture
def run(scripts, capsys, caplog):
    """Run an example script in this process as its `__main__` does; return what it printed and logged."""

    def run(script, *args):
        module = scripts[script]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run_script(module.main, module.parse_args([str(a) for a in args]), script)
        out, err = capsys.readouterr()
        return out + err + caplog.text

    return run


@pytest.fixture
def refused(scripts, capsys):
    """The error line of a run that must stop on a user error: exit status 2, one line `SCRIPT: error: ...`."""

    def refused(script, *args):
        module = scripts[script]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            run_script(module.main, module.parse_args([str(a) for a in args]), script)
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert exit.value.code == 2 and len(errors) == 1 and errors[0].startswith(f"{script}: error: "), errors
        return errors[0]

    return refused


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """A parquet image dataset (one corrupted image among them) and a tiny tokenizer (16x16 px -> 4x4 tokens)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(NUM_IMAGES):
        label = i % 3
        pixels = np.full((20, 18, 3), 60 * label, dtype=np.uint8) + rng.integers(0, 40, (20, 18, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(label)
    images.append({"bytes": b"not an image", "path": None})
    labels.append(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(root / "train.parquet"))
    torch.manual_seed(0)
    vqvae = MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=8, codebook_size=16, sample_size=16)
    vqvae.save_pretrained(root / "vqvae")
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_classes=3, dropout=0.0)
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_pretokenize_writes_resumable_shards(image_data, tmp_path, run, refused):
    out = tmp_path / "tokens"
    args = ["--dataset_name", image_data / "train.parquet", "--vqvae", image_data / "vqvae", "--resolution", 16,
            "--augmentation", "center_flip", "--num_shards", 3, "--batch_size", 4, "--output_dir", out]  # fmt: skip
    log = run("pretokenize.py", *args)
    assert "skipped 1 undecodable images" in log
    shards = sorted((out / "data").glob("*.parquet"))
    assert [p.name for p in shards] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    rows = datasets.load_dataset(str(out), split="train")
    assert rows.num_rows == 2 * NUM_IMAGES  # the centre crop and its mirror of every decodable image
    assert all(len(t) == 16 and 0 <= min(t) and max(t) < 16 for t in rows["tokens"])
    assert sorted(set(rows["label"])) == [0, 1, 2]
    # Shard 0 starts with image 0: its centre crop, then the mirror, through the tokenizer.
    from rar_hf.data import center_crop_arr, to_tensor

    vqvae = MaskGITVQModel.from_pretrained(image_data / "vqvae").eval()
    first = datasets.load_dataset("parquet", data_files=str(image_data / "train.parquet"), split="train")[0]["image"]
    crop = to_tensor(center_crop_arr(first, 16))
    with torch.no_grad():
        expected = vqvae.encode(torch.stack([crop, crop.flip(-1)])).indices.tolist()
    shard0 = datasets.load_dataset("parquet", data_files=str(shards[0]), split="train")
    assert shard0["tokens"][:2] == expected and shard0["label"][:2] == [0, 0]
    # Resume: a missing shard is rewritten, the others are left alone.
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    log = run("pretokenize.py", *args)
    assert "2 shards already written" in log
    assert shards[1].exists() and shards[0].stat().st_mtime_ns == mtimes[shards[0].name]
    assert datasets.load_dataset(str(out), split="train").num_rows == 2 * NUM_IMAGES
    # What the shards were made from, for resuming and for train_rar.py.
    metadata = json.loads((out / "rar_pretokenized-train.json").read_text())
    made = metadata["fingerprint"]
    assert metadata["complete"] and metadata["num_rows"] == 2 * NUM_IMAGES
    assert (made["resolution"], made["augmentation"], made["num_shards"]) == (16, "center_flip", 3)
    assert (made["image_seq_len"], made["latent_size"], made["codebook_size"]) == (16, [4, 4], 16)
    assert made["class_names"] == ["0", "1", "2"] and len(made["tokenizer"]["weights_sha256"]) == 64
    assert rows.features["label"].names == ["0", "1", "2"]  # the shards keep the ClassLabel
    # A re-run with other settings is refused and leaves the shards alone.
    args[args.index("--num_shards") + 1] = 2
    line = refused("pretokenize.py", *args)
    assert f"--output_dir {out} holds train shards made with other settings (num_shards: 3 then, 2 now)" in line
    args[args.index("--num_shards") + 1] = 3
    args[args.index("--augmentation") + 1] = "center"
    assert 'augmentation: "center_flip" then, "center" now' in refused("pretokenize.py", *args)
    assert sorted((out / "data").glob("*.parquet")) == shards


def test_pretokenize_imports_the_official_jsonl(tmp_path, run, refused):
    lines = [json.dumps({"class_id": i % 5, "tokens": [(i + j) % 1024 for j in range(256)]}) for i in range(10)]
    (tmp_path / "maskgitvq.jsonl").write_text("\n".join(lines) + "\n")
    run("pretokenize.py", "--official_jsonl", tmp_path / "maskgitvq.jsonl", "--num_shards", 2, "--output_dir", tmp_path / "out")
    rows = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert rows.num_rows == 10 and sorted(rows["label"]) == sorted(i % 5 for i in range(10))
    assert sorted(r[0] for r in rows["tokens"]) == list(range(10))
    line = refused("pretokenize.py", "--official_jsonl", tmp_path / "maskgitvq.jsonl", "--num_shards", 3, "--output_dir", tmp_path / "out")
    assert "num_shards: 2 then, 3 now" in line
    # Shards from before the metadata existed are not resumed blindly either.
    (tmp_path / "out" / "rar_pretokenized-train.json").unlink()
    line = refused("pretokenize.py", "--official_jsonl", tmp_path / "maskgitvq.jsonl", "--num_shards", 2, "--output_dir", tmp_path / "out")
    assert "holds 2 train shards but no rar_pretokenized-train.json" in line


def test_a_corrupted_official_jsonl_is_an_error_naming_the_file_and_line(tmp_path, run, refused):
    good = json.dumps({"class_id": 1, "tokens": [1, 2, 3, 4]})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + good[:20] + "\n")
    line = refused("pretokenize.py", "--official_jsonl", tmp_path / "bad.jsonl", "--output_dir", tmp_path / "out")
    assert f"{tmp_path / 'bad.jsonl'}:2: not valid JSON" in line
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    line = refused("pretokenize.py", "--official_jsonl", tmp_path / "binary.jsonl", "--output_dir", tmp_path / "out2")
    assert f"{tmp_path / 'binary.jsonl'}: not a text jsonl file" in line


def test_training_on_streamed_images_tokenised_on_the_fly(image_data, tmp_path, run, refused):
    out = tmp_path / "run"
    run(
        "train_rar.py", "--dataset_name", image_data / "train.parquet", "--streaming", "--vqvae", image_data / "vqvae",
        "--resolution", 16, "--model_config", image_data / "config.json", "--train_batch_size", 8,
        "--max_train_steps", 12, "--learning_rate", "3e-3", "--lr_warmup_steps", 1, "--anneal_start", 0,
        "--anneal_end", 6, "--logging_steps", 3, "--checkpointing_steps", 100, "--report_to", "tensorboard",
        "--validation_steps", 12, "--validation_class_labels", 0, 1, 2, "--output_dir", out,
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["skipped_images"] >= 1
    # Validation grids: a PNG of one sample per requested class, and tensorboard events.
    from PIL import Image as PILImage

    assert PILImage.open(out / "samples" / "step-12.png").size == (3 * 16, 16)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    from rar_hf.pipeline_rar import RARPipeline

    pipe = RARPipeline.from_pretrained(out)
    assert pipe.transformer.config.codebook_size == 16 and pipe.transformer.config.latent_size == [4, 4]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 2], generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def test_resuming_streamed_training_with_flips_reproduces_the_uninterrupted_run(image_data, tmp_path, run, refused):
    # 24 decodable images, batches of 8: the 8 steps cross two epoch boundaries, the resume happens mid-epoch.
    common = [
        "--dataset_name", image_data / "train.parquet", "--streaming", "--random_flip", "--vqvae", image_data / "vqvae",
        "--resolution", 16, "--model_config", image_data / "config.json", "--train_batch_size", 8,
        "--max_train_steps", 8, "--learning_rate", "3e-3", "--lr_warmup_steps", 1, "--anneal_start", 0,
        "--anneal_end", 6, "--logging_steps", 1, "--checkpointing_steps", 4, "--report_to", "none", "--seed", 3,
    ]  # fmt: skip
    run("train_rar.py", *common, "--output_dir", tmp_path / "full")
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", resumed_dir / "checkpoint-4")
    (resumed_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:4]))
    run("train_rar.py", *common, "--output_dir", resumed_dir, "--resume_from_checkpoint", "latest")
    resumed = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full[4:], resumed[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)


def test_pretokenize_takes_the_resolution_from_the_vq_model_and_refuses_another(image_data, tmp_path, run, refused):
    # The tokenizer is made for 16-px images (4x4 tokens); the old default of 256 px made 64x64 = 4096 tokens each.
    out = tmp_path / "tokens"
    common = ["--dataset_name", image_data / "train.parquet", "--vqvae", image_data / "vqvae", "--augmentation", "center",
              "--num_shards", 1]  # fmt: skip
    line = refused("pretokenize.py", *common, "--resolution", 256, "--output_dir", out)
    assert line == (f"pretokenize.py: error: --resolution 256 but --vqvae {image_data / 'vqvae'} is made for 16-px images "
                    "(its sample_size): leave --resolution out or pass --resolution 16.")  # fmt: skip
    assert not out.exists()
    run("pretokenize.py", *common, "--output_dir", out)
    made = json.loads((out / "rar_pretokenized-train.json").read_text())["fingerprint"]
    assert (made["resolution"], made["image_seq_len"]) == (16, 16)
    assert {len(t) for t in datasets.load_dataset(str(out), split="train")["tokens"]} == {16}


def test_training_on_pretokenized_shards_takes_sizes_and_names_from_their_metadata(image_data, tmp_path, run, refused):
    tokens = tmp_path / "tokens"
    run("pretokenize.py", "--dataset_name", image_data / "train.parquet", "--vqvae", image_data / "vqvae", "--resolution", 16,
        "--augmentation", "center", "--num_shards", 2, "--output_dir", tokens)  # fmt: skip
    # No --resolution (its default, 256, would mean 64x64 tokens with this tokenizer): the metadata says 4x4.
    common = ["--pretokenized_dataset", tokens, "--model_config", image_data / "config.json", "--train_batch_size", 4,
              "--max_train_steps", 2, "--lr_warmup_steps", 1, "--report_to", "none"]  # fmt: skip
    run("train_rar.py", *common, "--vqvae", image_data / "vqvae", "--output_dir", tmp_path / "run")
    from rar_hf.pipeline_rar import RARPipeline

    pipe = RARPipeline.from_pretrained(tmp_path / "run")
    config = pipe.transformer.config
    assert (config.codebook_size, config.image_seq_len, list(config.latent_size)) == (16, 16, [4, 4])
    assert pipe.id2label == {0: "0", 1: "1", 2: "2"}
    # Another tokenizer of the same shape would decode these tokens into other images.
    torch.manual_seed(1)
    MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=8, codebook_size=16,
                   sample_size=16).save_pretrained(tmp_path / "other")  # fmt: skip
    line = refused("train_rar.py", *common, "--vqvae", tmp_path / "other", "--output_dir", tmp_path / "run2")
    assert f"--vqvae {tmp_path / 'other'} is not the tokenizer --pretokenized_dataset {tokens} was made with" in line


def test_class_names_and_count_come_from_an_image_folder(image_data, tmp_path, run, refused):
    rng = np.random.default_rng(1)
    for name, level in (("cat", 40), ("dog", 200)):
        (tmp_path / "pets" / "train" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.full((16, 16, 3), level, dtype=np.uint8) + rng.integers(0, 30, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pets" / "train" / name / f"{i}.png")
    broken = tmp_path / "pets" / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG cut short
    config = {k: v for k, v in json.loads((image_data / "config.json").read_text()).items() if k != "num_classes"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    log = run("train_rar.py", "--dataset_name", tmp_path / "pets", "--vqvae", image_data / "vqvae", "--resolution", 16,
              "--model_config", tmp_path / "config.json", "--train_batch_size", 4, "--max_train_steps", 2,
              "--lr_warmup_steps", 1, "--report_to", "none", "--output_dir", tmp_path / "run")  # fmt: skip
    assert f"skipping an undecodable image (1 so far): {broken}" in log
    from rar_hf.pipeline_rar import RARPipeline

    pipe = RARPipeline.from_pretrained(tmp_path / "run")
    assert pipe.transformer.config.num_classes == 2 and pipe.id2label == {0: "cat", 1: "dog"}
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=["cat"], generator=torch.Generator().manual_seed(0), output_type="np").images.shape == (1, 16, 16, 3)
