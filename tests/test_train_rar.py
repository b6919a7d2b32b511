"""End-to-end tests of examples/train_rar.py: learning, the annealing schedule, exact resume, two processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torchrun
from rar_hf.data import randomness_ratio

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_rar.py"
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    codebook_size=16,
    num_classes=4,
    image_seq_len=16,
    dropout=0.1,
    attention_dropout=0.0,
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Pre-tokenised rows whose tokens depend on the class, so that a model can learn them."""
    import datasets

    root = tmp_path_factory.mktemp("pretokenized")
    rng = np.random.default_rng(0)
    rows = {"tokens": [], "label": []}
    for _ in range(256):
        label = int(rng.integers(0, 4))
        rows["tokens"].append([(label * 3 + p) % 16 if rng.random() > 0.1 else int(rng.integers(0, 16)) for p in range(16)])
        rows["label"].append(label)
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "train.parquet"))
    (root / "config.json").write_text(json.dumps(TINY))
    return root


def launch(data_dir, output_dir, *extra, launcher=None, env=None):
    args = [
        "--pretokenized_dataset", str(data_dir / "train.parquet"),
        "--model_config", str(data_dir / "config.json"),
        "--train_batch_size", "16",
        "--learning_rate", "3e-3",
        "--lr_warmup_steps", "2",
        "--output_dir", str(output_dir),
        "--report_to", "none",
        "--seed", "7",
        *extra,
    ]  # fmt: skip
    command = (launcher or [sys.executable]) + [str(SCRIPT)] + args
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def run_training(data_dir, output_dir, *extra, launcher=None, env=None):
    result = launch(data_dir, output_dir, *extra, launcher=launcher, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(output_dir)


def assert_refused(result, *fragments):
    """A user error: exit status 2 and one line on stderr (no traceback) holding every fragment."""
    assert result.returncode == 2, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_rar.py: error: ") and "Traceback" not in result.stderr, result.stderr[-4000:]
    for fragment in fragments:
        assert fragment in last, last


def test_training_learns_and_follows_the_annealing_schedule(tiny_data, tmp_path):
    out = tmp_path / "run"
    records = run_training(
        tiny_data, out, "--max_train_steps", "40", "--anneal_start", "10", "--anneal_end", "30",
        "--logging_steps", "1", "--checkpointing_steps", "100", "--use_ema", "--ema_decay", "0.9",
    )  # fmt: skip
    assert [r["step"] for r in records] == list(range(1, 41))
    # The logged r is that of the batch of the step just completed (0-based step index = step - 1).
    for record in records:
        assert record["randomness_ratio"] == pytest.approx(randomness_ratio(record["step"] - 1, 10, 30), abs=1e-6)
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < first - 0.3, (first, last)
    assert records[-1]["lr"] == pytest.approx(1e-5)
    from rar_hf import RARForImageGeneration

    model = RARForImageGeneration.from_pretrained(out / "transformer")
    assert model.config.codebook_size == 16 and model.config.num_classes == 4


RESUME_ARGS = ["--max_train_steps", "8", "--anneal_start", "2", "--anneal_end", "6", "--logging_steps", "1",
               "--checkpointing_steps", "4", "--use_ema", "--ema_decay", "0.9"]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8: the reference of every resume test."""
    out = tmp_path_factory.mktemp("full") / "run"
    run_training(tiny_data, out, *RESUME_ARGS)
    return out


def interrupted_copy(full_run, folder, last_step):
    """The folder of a run killed after its step-4 checkpoint, having logged up to `last_step`."""
    folder.mkdir()
    shutil.copytree(full_run / "checkpoint-4", folder / "checkpoint-4")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(full_run)[:last_step]))
    return folder


def assert_same_run(full_run, resumed_dir):
    full, resumed = read_metrics(full_run), read_metrics(resumed_dir)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full[4:], resumed[4:]):
        assert a["loss"] == b["loss"] and a["randomness_ratio"] == b["randomness_ratio"] and a["lr"] == b["lr"]
    from safetensors.torch import load_file

    expected = load_file(full_run / "transformer" / "model.safetensors")  # the EMA weights
    for name, value in load_file(resumed_dir / "transformer" / "model.safetensors").items():
        assert torch.equal(value, expected[name]), name


def test_resume_reproduces_the_uninterrupted_run(tiny_data, full_run, tmp_path):
    resumed_dir = interrupted_copy(full_run, tmp_path / "resumed", 5)  # logged one step past its checkpoint
    shutil.copytree(full_run / "checkpoint-4", resumed_dir / ".checkpoint-8.tmp")  # an interrupted save
    run_training(tiny_data, resumed_dir, *RESUME_ARGS, "--resume_from_checkpoint", "latest")
    assert_same_run(full_run, resumed_dir)
    assert not list(resumed_dir.glob("checkpoint-*/custom_checkpoint_*"))  # nothing pickled


@pytest.mark.parametrize("stage", ["state", "replace"])
def test_a_run_killed_while_saving_resumes_exactly(tiny_data, full_run, tmp_path, stage):
    # The run resumed from checkpoint-4 is SIGKILLed while it saves checkpoint-8: after accelerate's files are
    # written (its EMA state not yet), or, replacing an older checkpoint-8, with that one set aside and the new one
    # not yet in place. It had also just begun a metrics line.
    folder = interrupted_copy(full_run, tmp_path / "run", 4)
    if stage == "replace":
        shutil.copytree(full_run / "checkpoint-8", folder / "checkpoint-8")
    killed = launch(tiny_data, folder, *RESUME_ARGS, "--resume_from_checkpoint", str(folder / "checkpoint-4"),
                    env={"RAR_HF_TEST_KILL_DURING_SAVE": f"8:{stage}"})  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-4"]
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')
    run_training(tiny_data, folder, *RESUME_ARGS, "--resume_from_checkpoint", "latest")
    assert_same_run(full_run, folder)


def test_a_fresh_run_never_mixes_with_the_run_in_its_folder(tiny_data, full_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(full_run, folder)
    before = (folder / "metrics.jsonl").read_text()
    refused = launch(tiny_data, folder, "--max_train_steps", "3", "--checkpointing_steps", "3")
    assert_refused(refused, f"--output_dir {folder} is not empty", "--resume_from_checkpoint latest", "--overwrite_output_dir")
    assert (folder / "metrics.jsonl").read_text() == before and (folder / "checkpoint-8").is_dir()
    records = run_training(tiny_data, folder, "--max_train_steps", "3", "--checkpointing_steps", "3", "--logging_steps", "1",
                           "--overwrite_output_dir")  # fmt: skip
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((folder / "train_summary.json").read_text())["global_step"] == 3


def test_a_planted_payload_in_a_checkpoint_stops_the_resume_and_runs_nothing(tiny_data, full_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(full_run / "checkpoint-8", folder / "checkpoint-8")
    marker = tmp_path / "pwned"
    payload = f"import os, pickle\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
    payload += f"open({str(folder / 'checkpoint-8' / 'ema.safetensors')!r}, 'wb').write(pickle.dumps(P()))"
    subprocess.run([sys.executable, "-c", payload], check=True)
    result = launch(tiny_data, folder, *RESUME_ARGS, "--resume_from_checkpoint", "latest")
    assert_refused(result, str(folder / "checkpoint-8" / "ema.safetensors"))
    assert not marker.exists()


def test_ranks_launched_without_a_process_group_are_refused(tiny_data, tmp_path):
    # Two ranks on a CPU-only machine without ACCELERATE_USE_CPU: accelerate sees one process in each, so each would
    # train alone on all the data into the same folder (library-notes "accelerate on CPU").
    result = launch(tiny_data, tmp_path / "run", "--max_train_steps", "2", launcher=torchrun(2), env={"ACCELERATE_USE_CPU": "false"})
    assert result.returncode != 0
    assert "error: WORLD_SIZE=2 but this process trains alone" in result.stderr and "ACCELERATE_USE_CPU=true" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_processes_train_in_sync_on_different_data(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    run_training(
        tiny_data, out, "--max_train_steps", "4", "--logging_steps", "2", "--checkpointing_steps", "100",
        launcher=torchrun(2), env={"ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    assert len(summary["parameter_checksums"]) == 2
    assert summary["parameter_checksums"][0] == summary["parameter_checksums"][1]
    assert summary["first_batch_fingerprints"][0] != summary["first_batch_fingerprints"][1]


# Runs train_rar.py with huggingface_hub's create_repo / upload_folder replaced by fakes that log each call (and the
# files of the uploaded folder, read after FAKE_HUB_DELAY seconds for background uploads, like a slow network).
FAKE_HUB = """
import json, os, runpy, sys, threading, time, types
from concurrent.futures import Future
from pathlib import Path
import huggingface_hub

log = Path(os.environ["FAKE_HUB_LOG"])

def record(**entry):
    with log.open("a") as f:
        f.write(json.dumps(entry) + "\\n")

def create_repo(repo_id, private=False, exist_ok=False, **kwargs):
    record(call="create_repo", repo_id=repo_id, private=private)
    return types.SimpleNamespace(repo_id="user/" + repo_id)

def upload_folder(repo_id, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
    def read():
        time.sleep(float(os.environ["FAKE_HUB_DELAY"]) if run_as_future else 0.0)
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        record(call="upload_folder", repo_id=repo_id, path_in_repo=path_in_repo, files=files, future=run_as_future,
               commit_message=kwargs.get("commit_message"), ignore_patterns=kwargs.get("ignore_patterns"))
    if not run_as_future:
        return read()
    future = Future()
    def run():
        try:
            read()
            future.set_result(None)
        except BaseException as error:
            future.set_exception(error)
    threading.Thread(target=run).start()
    return future

huggingface_hub.create_repo, huggingface_hub.upload_folder = create_repo, upload_folder
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_push_to_hub_uploads_every_checkpoint_before_rotation_deletes_it(tiny_data, tmp_path):
    log = tmp_path / "hub.jsonl"
    out = tmp_path / "run"
    run_training(
        tiny_data, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
        "--push_to_hub", "--hub_model_id", "rar-test", "--hub_private",
        launcher=[sys.executable, "-c", FAKE_HUB], env={"FAKE_HUB_LOG": str(log), "FAKE_HUB_DELAY": "1.0"},
    )  # fmt: skip
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0] == {"call": "create_repo", "repo_id": "rar-test", "private": True}
    checkpoints = [c for c in calls if c["call"] == "upload_folder" and c["future"]]
    assert [c["path_in_repo"] for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for upload in checkpoints:  # each slow upload still found its whole checkpoint although only one is kept
        assert upload["repo_id"] == "user/rar-test" and "model.safetensors" in upload["files"], upload
    final = calls[-1]
    assert not final["future"] and final["path_in_repo"] is None and final["commit_message"] == "Final model after 6 steps"
    assert {"transformer/config.json", "transformer/model.safetensors"} <= set(final["files"])
    assert "checkpoint-*" in final["ignore_patterns"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]


def test_labels_outside_the_model_and_corrupted_shards_stop_before_the_first_step(tiny_data, tmp_path):
    # tiny_data's labels are 0..3 (plain ints); a config of 3 classes cannot take them.
    config = {**TINY, "num_classes": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = launch(tiny_data, tmp_path / "run", "--max_train_steps", "2", "--model_config", str(tmp_path / "config.json"))
    assert_refused(result, f"--pretokenized_dataset {tiny_data / 'train.parquet'} has labels up to 3 but the model has 3 classes (0..2)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    data = (tiny_data / "train.parquet").read_bytes()
    shard = tmp_path / "shards" / "data" / "train-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(data[: len(data) // 2])
    result = launch(tmp_path / "shards", tmp_path / "run2", "--pretokenized_dataset", str(tmp_path / "shards"), "--max_train_steps", "2")
    assert_refused(result, f"{shard} is corrupted or not a parquet file")
