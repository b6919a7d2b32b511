"""End-to-end run of examples/train_vqgan.py on a tiny digits dataset: training, checkpoints, resume."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

datasets = pytest.importorskip("datasets")
pytest.importorskip("sklearn")

from rar_hf.data.digits import build_digits_dataset  # noqa: E402
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel  # noqa: E402

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_vqgan.py"
TINY_CONFIG = {
    "hidden_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "latent_channels": 16,
    "codebook_size": 32,
    "norm_num_groups": 4,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_vqgan():
    spec = importlib.util.spec_from_file_location("train_vqgan", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits16")
    build_digits_dataset(folder, image_size=16, cache_dir=str(folder / "cache"))
    return folder


def run(train_vqgan, digits_dir, output_dir, *extra):
    args = train_vqgan.parse_args(
        [
            "--dataset_name", str(digits_dir),
            "--cache_dir", str(digits_dir / "cache"),
            "--model_config", json.dumps(TINY_CONFIG),
            "--resolution", "16",
            "--max_train_samples", "64",
            "--train_batch_size", "16",
            "--max_train_steps", "20",
            "--learning_rate", "3e-3",
            "--lr_warmup_steps", "2",
            "--logging_steps", "5",
            "--checkpointing_steps", "10",
            "--codebook_restart_steps", "5",
            "--validation_split", "test",
            "--report_to", "none",
            "--output_dir", str(output_dir),
            *extra,
        ]
    )  # fmt: skip
    train_vqgan.main(args)


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(train_vqgan, digits_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("vqgan")
    run(train_vqgan, digits_dir, output_dir)
    return output_dir


def test_training_logs_and_learns(trained):
    metrics = read_metrics(trained)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    for m in metrics:
        assert {"loss", "recon_mse", "quantizer_loss", "codebook_usage", "perplexity", "lr"} <= set(m)
        assert 0 < m["codebook_usage"] <= 1
    assert metrics[-1]["recon_mse"] < 0.5 * metrics[0]["recon_mse"]
    evaluation = json.loads((trained / "eval.json").read_text())
    assert evaluation["split"] == "test" and evaluation["num_images"] == 360
    assert 0 < evaluation["mse"] < metrics[0]["recon_mse"]


def test_saves_a_loadable_tokenizer_and_atomic_checkpoints(trained):
    assert sorted(p.name for p in trained.glob("*checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    model = MaskGITVQModel.from_pretrained(trained).eval()
    assert model.config.sample_size == 16 and model.codebook_size == 32
    images = torch.rand(2, 3, 16, 16)
    indices = model.encode(images).indices
    assert indices.shape == (2, 64)
    assert model.decode(indices).sample.shape == (2, 3, 16, 16)


def test_resume_from_latest_continues_at_the_right_step(train_vqgan, digits_dir, trained, tmp_path):
    # Interrupt the run after step 10 (mid-epoch: 4 batches per epoch): copy its state up to there,
    # including metric lines the interrupted run wrote after its last checkpoint.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(trained / "checkpoint-10", resumed / "checkpoint-10")
    shutil.copy(trained / "metrics.jsonl", resumed / "metrics.jsonl")
    run(train_vqgan, digits_dir, resumed, "--resume_from_checkpoint", "latest")

    metrics = read_metrics(resumed)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert (resumed / "checkpoint-20").is_dir()
    # Same batches, RNG, optimizer, scheduler and codebook-usage state: the resumed run ends where the
    # uninterrupted one did.
    assert metrics == read_metrics(trained)
    expected = MaskGITVQModel.from_pretrained(trained).state_dict()
    for name, value in MaskGITVQModel.from_pretrained(resumed).state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_ema_weights_are_saved(train_vqgan, digits_dir, tmp_path):
    run(train_vqgan, digits_dir, tmp_path, "--use_ema", "--max_train_steps", "10")
    saved = MaskGITVQModel.from_pretrained(tmp_path)
    raw = load_file(tmp_path / "checkpoint-10" / "model.safetensors")
    ema = load_file(tmp_path / "checkpoint-10" / "ema.safetensors")
    assert not list((tmp_path / "checkpoint-10").glob("custom_checkpoint_*"))  # nothing pickled
    for i, (name, value) in enumerate(saved.named_parameters()):
        torch.testing.assert_close(value, ema[f"shadow_params.{i}"], msg=name)
    assert not torch.equal(saved.quantize.embedding.weight, raw["quantize.embedding.weight"])


def test_a_second_run_into_the_folder_is_refused_and_a_corrupted_png_is_named(train_vqgan, digits_dir, trained, tmp_path):
    from rar_hf.training_utils import UserInputError

    before = (trained / "metrics.jsonl").read_text()
    with pytest.raises(UserInputError, match=f"--output_dir {trained} is not empty"):
        run(train_vqgan, digits_dir, trained)
    assert (trained / "metrics.jsonl").read_text() == before
    for name in ("eight", "seven"):  # an image folder of two classes
        folder = tmp_path / "pngs" / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    args = ["--dataset_name", str(tmp_path / "pngs"), "--model_config", json.dumps(TINY_CONFIG), "--resolution", "16",
            "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(UserInputError, match=f"{folder / '2.png'}: not a decodable image"):
        train_vqgan.main(train_vqgan.parse_args(args))
