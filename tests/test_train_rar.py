"""End-to-end tests of examples/train_rar.py: learning, the schedule, bit-exact determinism and resume, resuming at the
end, two processes, sampling from checkpoints. In-process (`main(parse_args(argv))`) but for one SIGKILL test and
one two-process run."""

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun
from PIL import Image
from safetensors.torch import load_file

from rar_hf import training_utils
from rar_hf.data import randomness_ratio
from rar_hf.training_utils import UserInputError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_rar.py"
SHIPPED_VQVAE = REPO / "src" / "rar_hf" / "pretrained" / "tiny-digits" / "vqvae"
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
def train_rar():
    spec = importlib.util.spec_from_file_location("train_rar", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def torch_threads(count):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def two_threads():
    """Two torch threads: the order in which threads accumulate the gradient of indexed position tables is what
    made seeded CPU runs differ (batches of 64 rows are enough to split that work between threads)."""
    with torch_threads(2):
        yield


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
    from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

    torch.manual_seed(0)  # a VQ model of the data's codebook (16 codes, 4x4 tokens of 8-px images)
    MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8).save_pretrained(root / "vqvae")
    return root


def arguments(data_dir, output_dir, *extra):
    return [
        "--pretokenized_dataset", str(data_dir / "train.parquet"),
        "--model_config", str(data_dir / "config.json"),
        "--train_batch_size", "16",
        "--learning_rate", "3e-3",
        "--lr_warmup_steps", "2",
        "--output_dir", str(output_dir),
        "--report_to", "none",
        "--seed", "7",
        *map(str, extra),
    ]  # fmt: skip


def run_training(train_rar, data_dir, output_dir, *extra):
    train_rar.main(train_rar.parse_args(arguments(data_dir, output_dir, *extra)))
    return read_metrics(output_dir)


def refusal(train_rar, data_dir, output_dir, *extra) -> str:
    """A user error: one line (what run_script prints after "error: ")."""
    with pytest.raises(UserInputError) as caught:
        train_rar.main(train_rar.parse_args(arguments(data_dir, output_dir, *extra)))
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a, b):
    """Every tensor of two checkpoints (weights, EMA, optimizer moments, loss window) bit for bit."""
    for name in ("model.safetensors", "ema.safetensors", "loss_window.safetensors"):
        first, second = load_file(a / name), load_file(b / name)
        assert first.keys() == second.keys(), name
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key}"
    first, second = (torch.load(d / "optimizer.bin", weights_only=True)["state"] for d in (a, b))
    assert first.keys() == second.keys()
    for index in first:
        for key, value in first[index].items():
            assert torch.equal(value, second[index][key]), f"optimizer state {index}.{key}"


def test_training_learns_and_follows_the_annealing_schedule(train_rar, tiny_data, tmp_path):
    out = tmp_path / "run"
    records = run_training(
        train_rar, tiny_data, out, "--max_train_steps", 40, "--anneal_start", 10, "--anneal_end", 30,
        "--logging_steps", 1, "--checkpointing_steps", 100, "--use_ema", "--ema_decay", 0.9,
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


# Batches of 64 on two threads: what made seeded runs differ before deterministic kernels (see two_threads).
EXACT_ARGS = ["--train_batch_size", 64, "--max_train_steps", 8, "--anneal_start", 2, "--anneal_end", 6,
              "--logging_steps", 3, "--checkpointing_steps", 4, "--use_ema", "--ema_decay", 0.9]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(train_rar, tiny_data, tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8: the reference of every resume test."""
    out = tmp_path_factory.mktemp("full") / "run"
    with torch_threads(2):
        run_training(train_rar, tiny_data, out, *EXACT_ARGS)
    return out


def test_seeded_cpu_runs_are_bit_identical(train_rar, tiny_data, full_run, tmp_path, two_threads):
    again = tmp_path / "again"
    run_training(train_rar, tiny_data, again, *EXACT_ARGS)
    def without_speed(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]

    assert without_speed(read_metrics(again)) == without_speed(read_metrics(full_run))
    for step in (4, 8):
        assert_same_tensors(full_run / f"checkpoint-{step}", again / f"checkpoint-{step}")


def interrupted_copy(full_run, folder, last_step):
    """The folder of a run killed after its step-4 checkpoint, having logged up to `last_step`."""
    folder.mkdir()
    shutil.copytree(full_run / "checkpoint-4", folder / "checkpoint-4")
    lines = [r for r in read_metrics(full_run) if r["step"] <= last_step]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def assert_same_run(full_run, resumed_dir):
    full, resumed = read_metrics(full_run), read_metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [3, 6, 8]
    # Step 6 is the first log after the resume from step 4: it averages steps 4-6 like the uninterrupted run.
    for a, b in zip(full, resumed):
        assert (a["loss"], a["randomness_ratio"], a["lr"]) == (b["loss"], b["randomness_ratio"], b["lr"]), a["step"]
    assert_same_tensors(full_run / "checkpoint-8", resumed_dir / "checkpoint-8")
    expected = load_file(full_run / "transformer" / "model.safetensors")  # the EMA weights
    for name, value in load_file(resumed_dir / "transformer" / "model.safetensors").items():
        assert torch.equal(value, expected[name]), name


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(train_rar, tiny_data, full_run, tmp_path, two_threads):
    resumed_dir = interrupted_copy(full_run, tmp_path / "resumed", 5)  # logged past its checkpoint
    shutil.copytree(full_run / "checkpoint-4", resumed_dir / ".checkpoint-8.tmp")  # an interrupted save
    run_training(train_rar, tiny_data, resumed_dir, *EXACT_ARGS, "--resume_from_checkpoint", "latest")
    assert_same_run(full_run, resumed_dir)
    assert not list(resumed_dir.glob("checkpoint-*/custom_checkpoint_*"))  # nothing pickled


class Killed(BaseException):
    """Stands in for a SIGKILL in-process (a BaseException: nothing on the way catches it)."""


def test_a_run_killed_while_replacing_a_checkpoint_resumes_exactly(train_rar, tiny_data, full_run, tmp_path, two_threads, monkeypatch):
    # Resumed from checkpoint-4, the run dies while replacing an older checkpoint-8: that one set aside, the new one
    # not yet in place. It had also just begun a metrics line.
    folder = interrupted_copy(full_run, tmp_path / "run", 3)
    shutil.copytree(full_run / "checkpoint-8", folder / "checkpoint-8")

    def kill_point(step, stage):
        if (step, stage) == (8, "replace"):
            raise Killed

    monkeypatch.setattr(training_utils, "_test_kill_point", kill_point)
    with pytest.raises(Killed):
        run_training(train_rar, tiny_data, folder, *EXACT_ARGS, "--resume_from_checkpoint", folder / "checkpoint-4")
    gc.collect()  # the dead run's frames hold its lock on the folder
    monkeypatch.undo()
    assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-4"]
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')
    run_training(train_rar, tiny_data, folder, *EXACT_ARGS, "--resume_from_checkpoint", "latest")
    assert_same_run(full_run, folder)


def test_a_run_sigkilled_while_saving_resumes_exactly(train_rar, tiny_data, full_run, tmp_path, two_threads):
    # The one real SIGKILL: after accelerate's files are written, before the EMA state and the rename.
    folder = interrupted_copy(full_run, tmp_path / "run", 3)
    env = {**os.environ, "OMP_NUM_THREADS": "2", training_utils.KILL_HOOK_ENV: "8:state"}
    command = [sys.executable, str(SCRIPT), *arguments(tiny_data, folder, *EXACT_ARGS, "--resume_from_checkpoint", "latest")]
    killed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-4"]
    run_training(train_rar, tiny_data, folder, *EXACT_ARGS, "--resume_from_checkpoint", "latest")
    assert_same_run(full_run, folder)


def test_resuming_a_finished_run_writes_only_what_is_missing(train_rar, tiny_data, full_run, tmp_path, capsys):
    # Killed after its last checkpoint, before the final model: resuming writes it, and says so in one line.
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copytree(full_run / "checkpoint-8", folder / "checkpoint-8")
    shutil.copy(full_run / "metrics.jsonl", folder / "metrics.jsonl")
    capsys.readouterr()
    run_training(train_rar, tiny_data, folder, *EXACT_ARGS, "--resume_from_checkpoint", "latest")
    assert capsys.readouterr().out.splitlines() == [f"run already at step 8 of 8; writing its final model to {folder}"]
    expected = load_file(full_run / "transformer" / "model.safetensors")  # the EMA weights, as at the end of training
    final = load_file(folder / "transformer" / "model.safetensors")
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    assert read_metrics(folder) == read_metrics(full_run)
    # Again: nothing to do.
    written = (folder / "transformer" / "model.safetensors").stat().st_mtime_ns
    run_training(train_rar, tiny_data, folder, *EXACT_ARGS, "--resume_from_checkpoint", "latest")
    assert capsys.readouterr().out.splitlines() == [f"run already at step 8 of 8; its final model is in {folder}"]
    assert (folder / "transformer" / "model.safetensors").stat().st_mtime_ns == written


def test_a_changed_schedule_is_refused_unless_allowed_and_then_applied(train_rar, tiny_data, full_run, tmp_path):
    folder = interrupted_copy(full_run, tmp_path / "run", 3)
    changed = [*EXACT_ARGS, "--max_train_steps", 10, "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest"]
    line = refusal(train_rar, tiny_data, folder, *changed)
    assert f"resuming {folder / 'checkpoint-4'} would change the run's settings" in line
    assert "--max_train_steps 8 -> 10" in line and "--learning_rate 0.003 -> 0.001" in line
    assert "--allow_schedule_change" in line
    assert not (folder / "checkpoint-8").exists()

    run_training(train_rar, tiny_data, folder, *changed, "--allow_schedule_change", "--vqvae", tiny_data / "vqvae")
    # From step 4 on, the learning rate is that of the new schedule (10 steps, peak 1e-3), not a stretched old one.
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=2, num_training_steps=10,
                              scheduler_specific_kwargs={"min_lr": 1e-5})  # fmt: skip
    expected_lr = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        expected_lr.append(scheduler.get_last_lr()[0])
    logged = {r["step"]: r["lr"] for r in read_metrics(folder)}
    assert logged[6] == pytest.approx(expected_lr[5], rel=1e-6) and logged[10] == pytest.approx(1e-5)
    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["schedule_changes"] == [{"step": 4, "changes": ["--max_train_steps 8 -> 10", "--learning_rate 0.003 -> 0.001"]}]
    card = (folder / "README.md").read_text()
    assert "at step 4: --max_train_steps 8 -> 10, --learning_rate 0.003 -> 0.001" in card
    assert "0.001 after 2 warm-up steps, then cosine_with_min_lr to 1e-05 at step 10" in card
    # The run recorded its VQ model: another one would decode its tokens into other images.
    from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel

    torch.manual_seed(1)
    MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8).save_pretrained(tmp_path / "other")
    line = refusal(train_rar, tiny_data, folder, *changed, "--vqvae", tmp_path / "other")
    assert line == f"--vqvae {tmp_path / 'other'} is not the VQ model this run was trained with ({folder / 'vqvae'}): leave --vqvae out to resume with the recorded one."


def test_the_schedule_defaults_to_the_papers_proportions_and_must_fit_the_run(train_rar, tiny_data, tmp_path):
    out = tmp_path / "run"
    records = run_training(train_rar, tiny_data, out, "--max_train_steps", 8, "--lr_warmup_steps", 2, "--logging_steps", 1,
                           "--vqvae", tiny_data / "vqvae", "--checkpointing_steps", 100)  # fmt: skip
    # 8 steps: annealing from step 4 to 6 (50% and 75%), as the paper's 125,000 and 187,500 of 250,000.
    assert [r["randomness_ratio"] for r in records] == [randomness_ratio(s, 4, 6) for s in range(8)]
    assert "r = 1 until step 4, then linearly to 0 at step 6 (final order: raster)" in (out / "README.md").read_text()
    line = refusal(train_rar, tiny_data, tmp_path / "a", "--max_train_steps", 20, "--lr_warmup_steps", 62500)
    assert line.startswith("--lr_warmup_steps 62500 does not fit in the run (--max_train_steps 20)") and "(25% of the run: 5)" in line
    line = refusal(train_rar, tiny_data, tmp_path / "b", "--max_train_steps", 20, "--anneal_start", 125000, "--anneal_end", 187500)
    assert line.startswith("--anneal_start 125000 does not fit in the run (--max_train_steps 20)") and "(50% to 75% of the run: 10 to 15)" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_help_shows_every_default(train_rar):
    parser = train_rar.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._get_help_string(action)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "(default: %(default)s)" in text or "default:" in text, action.dest
    # Defaults worked out at run time say what they are.
    for dest in ("resolution", "vqvae", "lr_warmup_steps", "anneal_start", "anneal_end", "checkpoints_total_limit"):
        action = next(a for a in parser._actions if a.dest == dest)
        assert "default:" in action.help, dest
    text = " ".join(parser.format_help().split())
    assert "(default: 250000)" in text and "default: 25% of --max_train_steps" in text


def test_a_fresh_run_never_mixes_with_the_run_in_its_folder(train_rar, tiny_data, full_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(full_run, folder)
    before = (folder / "metrics.jsonl").read_text()
    line = refusal(train_rar, tiny_data, folder, "--max_train_steps", 3, "--checkpointing_steps", 3)
    assert f"--output_dir {folder} is not empty" in line and "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line
    assert (folder / "metrics.jsonl").read_text() == before and (folder / "checkpoint-8").is_dir()
    records = run_training(train_rar, tiny_data, folder, "--max_train_steps", 3, "--checkpointing_steps", 3,
                           "--logging_steps", 1, "--overwrite_output_dir")  # fmt: skip
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((folder / "train_summary.json").read_text())["global_step"] == 3


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_payload_in_a_checkpoint_stops_the_resume_and_runs_nothing(train_rar, tiny_data, full_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(full_run / "checkpoint-8", folder / "checkpoint-8")
    marker = tmp_path / "pwned"
    (folder / "checkpoint-8" / "ema.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    line = refusal(train_rar, tiny_data, folder, *EXACT_ARGS, "--resume_from_checkpoint", "latest")
    assert str(folder / "checkpoint-8" / "ema.safetensors") in line
    assert not marker.exists()


def test_ranks_launched_without_a_process_group_are_refused(train_rar, tiny_data, tmp_path, monkeypatch):
    # Two ranks on a CPU-only machine without ACCELERATE_USE_CPU: accelerate sees one process in each, so each would
    # train alone on all the data into the same folder (library-notes "accelerate on CPU").
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    line = refusal(train_rar, tiny_data, tmp_path / "run", "--max_train_steps", 2)
    assert line.startswith("WORLD_SIZE=2 but this process trains alone") and "ACCELERATE_USE_CPU=true" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# The one two-process run: 4 steps, then the finished run's final model is deleted and the run resumed at its end.
TWO_PROCESSES = """
import importlib.util, json, shutil, sys
from pathlib import Path
from accelerate.state import PartialState
spec = importlib.util.spec_from_file_location("train_rar", sys.argv[1])
train_rar = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_rar)
argv = sys.argv[2:]
out = Path(argv[argv.index("--output_dir") + 1])
# Both runs in one process group: the first run's end_training must not close it.
destroy = PartialState.destroy_process_group
PartialState.destroy_process_group = lambda self, group=None: None
train_rar.main(train_rar.parse_args(argv))
state = PartialState()
if state.is_main_process:
    shutil.copy(out / "train_summary.json", out.parent / "first_summary.json")
    shutil.rmtree(out / "transformer")
    for name in ("model_index.json", "train_summary.json", "README.md"):
        (out / name).unlink()
state.wait_for_everyone()
PartialState.destroy_process_group = destroy
train_rar.main(train_rar.parse_args(argv + ["--resume_from_checkpoint", "latest"]))
"""


def test_two_processes_train_in_sync_and_resume_at_the_end(tiny_data, tmp_path):
    out = tmp_path / "ddp" / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_PROCESSES)
    argv = arguments(tiny_data, out, "--max_train_steps", 4, "--logging_steps", 2, "--checkpointing_steps", 4, "--vqvae", tiny_data / "vqvae")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*torchrun(2), str(driver), str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "ddp" / "first_summary.json").read_text())
    assert len(summary["parameter_checksums"]) == 2
    assert summary["parameter_checksums"][0] == summary["parameter_checksums"][1]
    assert summary["first_batch_fingerprints"][0] != summary["first_batch_fingerprints"][1]
    assert result.stdout.count("run already at step 4 of 4; writing its final model to") == 1, result.stdout
    assert "Traceback" not in result.stderr
    from rar_hf.pipeline_rar import RARPipeline

    pipe = RARPipeline.from_pretrained(out)
    trained = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(value, trained[name]) for name, value in pipe.transformer.state_dict().items())


# Runs train_rar.py with huggingface_hub's create_repo / upload_folder replaced by fakes that log each call (and the
# files of the uploaded folder, read after a delay for background uploads, like a slow network).
class FakeHub:
    def __init__(self, delay):
        self.calls, self.delay = [], delay

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        import types

        self.calls.append({"call": "create_repo", "repo_id": repo_id, "private": private})
        return types.SimpleNamespace(repo_id="user/" + repo_id)

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
        import threading
        import time
        from concurrent.futures import Future

        def read():
            time.sleep(self.delay if run_as_future else 0.0)
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            self.calls.append(dict(call="upload_folder", repo_id=repo_id, path_in_repo=path_in_repo, files=files,
                                   future=run_as_future, commit_message=kwargs.get("commit_message"),
                                   ignore_patterns=kwargs.get("ignore_patterns")))  # fmt: skip

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


def test_push_to_hub_uploads_every_checkpoint_before_rotation_deletes_it(train_rar, tiny_data, tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(delay=0.5)
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    out = tmp_path / "run"
    run_training(train_rar, tiny_data, out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1,
                 "--push_to_hub", "--hub_model_id", "rar-test", "--hub_private")  # fmt: skip
    calls = hub.calls
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


def test_labels_outside_the_model_and_corrupted_shards_stop_before_the_first_step(train_rar, tiny_data, tmp_path):
    # tiny_data's labels are 0..3 (plain ints); a config of 3 classes cannot take them.
    config = {**TINY, "num_classes": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = refusal(train_rar, tiny_data, tmp_path / "run", "--max_train_steps", 2, "--model_config", tmp_path / "config.json")
    assert f"--pretokenized_dataset {tiny_data / 'train.parquet'} has labels up to 3 but the model has 3 classes (0..2)" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    data = (tiny_data / "train.parquet").read_bytes()
    shard = tmp_path / "shards" / "data" / "train-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(data[: len(data) // 2])
    line = refusal(train_rar, tmp_path / "shards", tmp_path / "run2", "--pretokenized_dataset", tmp_path / "shards", "--max_train_steps", 2)
    assert f"{shard} is corrupted or not a parquet file" in line


# ---- your own images: the README's recipe, and sampling from what a run wrote ----


def readme_command(section: str, script: str) -> list[str]:
    """The `script` command of the README section `section`, as argv (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if script in line:
                words = shlex.split(line.split("#", 1)[0])
                return words[words.index(script) + 1 :]
    raise AssertionError(f"no {script} command in the README section {section!r}")


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    """data/train/<class>/*.png: three classes of 32x32 PNGs (a shape per class on a noisy background)."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for index, name in enumerate(("circle", "square", "stripe")):
        folder = root / "data" / "train" / name
        folder.mkdir(parents=True)
        yy, xx = np.mgrid[:32, :32]
        shape = [(yy - 16) ** 2 + (xx - 16) ** 2 < 80, (abs(yy - 16) < 8) & (abs(xx - 16) < 8), (xx // 4) % 2 == 0][index]
        for i in range(12):
            pixels = rng.integers(0, 60, (32, 32, 3)) + shape[..., None] * np.array([200, 120 + 40 * index, 60])
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def own_run(train_rar, own_images):
    """The README's own-images command, run for 4 steps (and with an EMA) in a temporary folder."""
    argv = readme_command("Train on your own images", "examples/train_rar.py")
    out = own_images / "outputs" / "my-run"
    argv = [str(REPO / a) if a.startswith(("examples/", "src/")) else a for a in argv]
    argv[argv.index("--dataset_name") + 1] = str(own_images / "data")
    argv[argv.index("--output_dir") + 1] = str(out)
    argv += ["--max_train_steps", "4", "--train_batch_size", "8", "--checkpointing_steps", "2", "--logging_steps", "2",
             "--use_ema", "--report_to", "none"]  # fmt: skip
    train_rar.main(train_rar.parse_args(argv))
    return out


def generate(tmp_path, capsys, *argv):
    from rar_hf import cli

    capsys.readouterr()
    cli.main(["generate", "--class_labels", "stripe", "--num_images_per_label", "1", "--output_path", str(tmp_path / "grid.png"), *map(str, argv)])
    return capsys.readouterr().out


def test_training_on_a_folder_of_pngs_gives_a_pipeline_and_sampleable_checkpoints(own_run, tmp_path, capsys):
    from rar_hf.pipeline_rar import RARPipeline

    pipe = RARPipeline.from_pretrained(own_run)
    config = pipe.transformer.config
    # The resolution came from the shipped VQ model (32 px -> 8x8 tokens), the classes from the folder names.
    assert (config.num_classes, config.image_seq_len, list(config.latent_size)) == (3, 64, [8, 8])
    assert pipe.id2label == {0: "circle", 1: "square", 2: "stripe"}
    assert (own_run / "vqvae" / "config.json").is_file() and read_metrics(own_run)[-1]["step"] == 4
    assert "stripe" in generate(tmp_path, capsys, "--model", own_run)
    # A checkpoint of the run samples with its EMA weights and the run's VQ model, and says so.
    out = generate(tmp_path, capsys, "--model", own_run / "checkpoint-2")
    assert f"model: {own_run / 'checkpoint-2'} (step 2, EMA weights) with the VQ model {own_run / 'vqvae'}" in out
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    # A run killed before its end: its newest checkpoint.
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("checkpoint-2", "vqvae", "metrics.jsonl"):
        (shutil.copytree if (own_run / name).is_dir() else shutil.copy)(own_run / name, killed / name)
    assert f"model: {killed / 'checkpoint-2'} (step 2, EMA weights)" in generate(tmp_path, capsys, "--model", killed)


def test_a_run_without_a_vq_model_says_which_flag_records_one(full_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate(tmp_path, capsys, "--model", full_run / "checkpoint-8")
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "the run recorded no VQ model" in line and "train with --vqvae" in line, line


def test_the_resolution_must_match_the_vq_model(train_rar, own_images, tmp_path):
    argv = ["--dataset_name", own_images / "data", "--vqvae", SHIPPED_VQVAE, "--resolution", 256, "--max_train_steps", 2,
            "--model_config", REPO / "examples" / "tiny_digits" / "rar_config.json", "--output_dir", tmp_path / "run",
            "--report_to", "none"]  # fmt: skip
    with pytest.raises(UserInputError) as caught:
        train_rar.main(train_rar.parse_args([str(a) for a in argv]))
    assert str(caught.value) == (
        f"--resolution 256 but --vqvae {SHIPPED_VQVAE} is made for 32-px images (its sample_size): leave --resolution "
        "out or pass --resolution 32."
    )


def test_validation_samples_do_not_stop_the_linear_layers_from_training(train_rar, tiny_data, tmp_path):
    # On a CPU the pipeline packs the linear layers for the length of a call and unpacks them into new parameters:
    # validation used it as is, and the optimizer and the EMA then updated parameters the model no longer held.
    common = ["--max_train_steps", 4, "--checkpointing_steps", 100, "--vqvae", tiny_data / "vqvae", "--use_ema", "--ema_decay", 0.5]
    run_training(train_rar, tiny_data, tmp_path / "plain", *common)
    run_training(train_rar, tiny_data, tmp_path / "validated", *common, "--validation_steps", 2, "--validation_class_labels", 1, 2)
    assert (tmp_path / "validated" / "samples" / "step-2.png").is_file()
    expected = load_file(tmp_path / "plain" / "transformer" / "model.safetensors")
    final = load_file(tmp_path / "validated" / "transformer" / "model.safetensors")
    assert all(torch.equal(final[name], expected[name]) for name in expected)
