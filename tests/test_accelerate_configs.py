"""examples/accelerate_configs/multi_cpu.yaml really trains with two processes, and training ends with a model card."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, codebook_size=16,
            num_classes=4, image_seq_len=16, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    import datasets
    import torch

    from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

    root = tmp_path_factory.mktemp("multi-cpu")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=128)
    rows = {"tokens": [[(int(c) * 3 + p) % 16 for p in range(16)] for c in labels], "label": [int(c) for c in labels]}
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "train.parquet"))
    (root / "config.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8).save_pretrained(root / "vqvae")
    return root


def test_multi_cpu_config_runs_two_processes_and_writes_the_training_card(tiny_run_inputs, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples" / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port", port,
        str(REPO / "examples" / "train_rar.py"),
        "--pretokenized_dataset", str(tiny_run_inputs / "train.parquet"),
        "--model_config", str(tiny_run_inputs / "config.json"),
        "--vqvae", str(tiny_run_inputs / "vqvae"), "--resolution", "8",
        "--train_batch_size", "8", "--max_train_steps", "4", "--logging_steps", "2", "--checkpointing_steps", "100",
        "--lr_warmup_steps", "1", "--anneal_start", "1", "--anneal_end", "3",
        "--validation_steps", "4", "--validation_class_labels", "0", "1", "2",
        "--report_to", "none", "--output_dir", str(output_dir),
    ]  # fmt: skip
    # The README's command line: ACCELERATE_USE_CPU=true, one thread per process.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert len(summary["parameter_checksums"]) == 2, "world size must be 2"
    assert summary["first_batch_fingerprints"][0] != summary["first_batch_fingerprints"][1]  # each rank its own data

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    final_loss = json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert "- **steps**: 4" in card.text
    assert "- **batch size**: 16 (8 per process x 1 accumulation steps x 2 processes)" in card.text
    assert "r = 1 until step 1, then linearly to 0 at step 3" in card.text
    assert f"- **final loss**: {final_loss:.4f}" in card.text
    assert "![validation samples](validation.png)" in card.text and (output_dir / "validation.png").is_file()
    assert str(tmp_path) not in card.text  # no build-machine paths
