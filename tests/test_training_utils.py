import json
import os
import pickle
import shutil
from concurrent.futures import Future

import pytest
import torch

from rar_hf import training_utils
from rar_hf.training_utils import (
    UserInputError,
    check_distributed_launch,
    check_output_dir,
    checkpoint_step,
    clear_output_dir,
    finish_uploads,
    list_checkpoints,
    load_checkpoint,
    lock_output_dir,
    resolve_checkpoint,
    save_checkpoint,
    truncate_metrics,
)


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    for name in ["checkpoint-9", "checkpoint-10", ".checkpoint-20.tmp", "checkpoint-x", "logs"]:
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-10"
    assert resolve_checkpoint("latest", tmp_path / "missing") is None
    assert resolve_checkpoint(None, tmp_path) is None
    assert checkpoint_step(tmp_path / "checkpoint-10") == 10
    with pytest.raises(UserInputError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / ".checkpoint-20.tmp"), tmp_path)
    with pytest.raises(UserInputError, match="checkpoint-30"):
        resolve_checkpoint(str(tmp_path / "checkpoint-30"), tmp_path)


def test_truncate_metrics_drops_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_metrics(tmp_path / "absent.jsonl", 4)  # nothing to do, no error


def test_truncate_metrics_survives_a_line_cut_short_by_a_killed_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 4)) + '{"step": 4, "lo')
    truncate_metrics(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left


def test_finish_uploads_waits_and_reports_failures_without_raising(caplog):
    done, failed = Future(), Future()
    done.set_result(None)
    failed.set_exception(OSError("403 Forbidden"))
    pending = [done, failed]
    with caplog.at_level("WARNING"):
        finish_uploads(pending)
    assert pending == []
    assert "checkpoint upload to the Hub failed" in caplog.text and "403 Forbidden" in caplog.text


# ---- one run per output folder ----


def test_a_fresh_run_is_refused_in_a_folder_holding_another_run(tmp_path):
    check_output_dir(tmp_path / "new", None, False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", None, False)
    run = tmp_path / "run"
    (run / "checkpoint-6").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserInputError, match=r"--output_dir .*run is not empty \(checkpoint-6, metrics.jsonl\).*--overwrite_output_dir"):
        check_output_dir(run, None, False)
    check_output_dir(run, "latest", False)
    check_output_dir(run, None, True)
    with pytest.raises(UserInputError, match="give one"):
        check_output_dir(run, "latest", True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserInputError, match="not a folder"):
        check_output_dir(tmp_path / "afile", "latest", False)
    lock = lock_output_dir(run)
    clear_output_dir(run)
    assert [p.name for p in run.iterdir()] == [training_utils.LOCK_NAME]
    check_output_dir(run, None, False)  # the lock file alone does not make a folder "not empty"
    lock.close()


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    lock = lock_output_dir(tmp_path)
    with pytest.raises(UserInputError, match=f"in use by a training run that is still going \\(pid {os.getpid()}\\)"):
        lock_output_dir(tmp_path)
    lock.close()
    lock_output_dir(tmp_path).close()  # released with its holder


def test_ranks_that_did_not_join_a_distributed_job_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match="WORLD_SIZE=2 but this process trains alone.*ACCELERATE_USE_CPU=true"):
        check_distributed_launch(1)
    check_distributed_launch(2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed_launch(1)


# ---- checkpoints: interrupted saves and untrusted files ----


class Payload:
    """Unpickling this creates `marker`: a stand-in for code planted in a downloaded checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def training_state(tmp_path):
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = EMAModel(model.parameters(), decay=0.5)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
    yield accelerator, model, ema
    accelerator.free_memory()


def test_custom_states_round_trip_through_safetensors(training_state, tmp_path):
    from diffusers.training_utils import EMAModel

    accelerator, model, ema = training_state
    path = save_checkpoint(accelerator, tmp_path, 2, custom_states={"ema": ema})
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"
    ]  # fmt: skip
    expected_rng = torch.get_rng_state()
    torch.manual_seed(123)
    fresh = EMAModel([torch.nn.Parameter(torch.zeros_like(p)) for p in model.parameters()], decay=0.9)
    assert load_checkpoint(accelerator, path, {"ema": fresh}) == 2
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert fresh.decay == 0.5 and fresh.optimization_step == ema.optimization_step == 2
    for a, b in zip(fresh.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)


CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "ema.safetensors"]


@pytest.mark.parametrize("name", CHECKPOINT_FILES + ["custom_checkpoint_0.pkl"])
def test_a_planted_payload_in_any_checkpoint_file_runs_nothing(training_state, tmp_path, name):
    accelerator, model, ema = training_state
    path = save_checkpoint(accelerator, tmp_path / "run", 2, custom_states={"ema": ema})
    marker = tmp_path / "pwned"
    (path / name).write_bytes(pickle.dumps({"state": Payload(marker)}))
    with pytest.raises(UserInputError, match=rf"{path / name}: "):
        load_checkpoint(accelerator, path, {"ema": ema})
    torch.save({"state": Payload(marker)}, path / name)  # the same in torch's zip format
    with pytest.raises(UserInputError, match=rf"{path / name}: "):
        load_checkpoint(accelerator, path, {"ema": ema})
    assert not marker.exists()


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_truncated_checkpoint_file_is_an_error_naming_it(training_state, tmp_path, name):
    accelerator, model, ema = training_state
    path = save_checkpoint(accelerator, tmp_path, 2, custom_states={"ema": ema})
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=rf"{path / name}: "):
        load_checkpoint(accelerator, path, {"ema": ema})


class Killed(BaseException):
    """Raised by the kill hook in place of SIGKILL: like it, it skips everything after the kill point."""


@pytest.mark.parametrize("stage", ["state", "complete", "discard", "replace", "renamed"])
def test_a_save_interrupted_at_any_stage_leaves_latest_complete(training_state, tmp_path, monkeypatch, stage):
    accelerator, model, ema = training_state
    states = {"ema": ema}
    save_checkpoint(accelerator, tmp_path, 2, custom_states=states)
    save_checkpoint(accelerator, tmp_path, 4, custom_states=states)
    (tmp_path / "checkpoint-4" / "marker").write_text("old")

    def kill(step, at):
        if at == stage:
            raise Killed

    monkeypatch.setattr(training_utils, "_test_kill_point", kill)
    # Re-saving checkpoint-4 (a run resumed from checkpoint-2) and rotating checkpoint-2 out with a limit of 1.
    with pytest.raises(Killed):
        save_checkpoint(accelerator, tmp_path, 4, total_limit=1, custom_states=states)
    monkeypatch.undo()
    latest = resolve_checkpoint("latest", tmp_path)
    assert latest is not None
    load_checkpoint(accelerator, latest, states)  # complete: every file there and readable
    # The next save cleans up what the killed one left behind.
    save_checkpoint(accelerator, tmp_path, 6, total_limit=1, custom_states=states)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]


def test_unloadable_tokenizers_are_one_line_errors_naming_them(tmp_path):
    from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
    from rar_hf.training_utils import load_pretrained

    # HF_HUB_OFFLINE=1 in the tests (conftest): a Hub id absent from the cache is refused before from_pretrained.
    with pytest.raises(UserInputError, match="--vqvae nobody/no-such-tokenizer: no such folder, and as a Hub id it is not in the local Hugging Face cache; offline: set HF_HUB_OFFLINE=0 or pass a local folder"):
        load_pretrained(MaskGITVQModel, "nobody/no-such-tokenizer", "--vqvae")
    MaskGITVQModel(hidden_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, codebook_size=8, norm_num_groups=4).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserInputError, match=f"--vqvae {tmp_path}: cannot load a MaskGITVQModel: .*") as info:
        load_pretrained(MaskGITVQModel, str(tmp_path), "--vqvae")
    assert "\n" not in str(info.value)


def test_the_wrong_folder_for_vqvae_says_what_it_is_and_what_to_pass(tmp_path, caplog):
    from rar_hf import RARConfig, RARForImageGeneration
    from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
    from rar_hf.pipeline_rar import RARPipeline
    from rar_hf.training_utils import load_pretrained

    config = RARConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, codebook_size=8,
                       num_classes=2, image_seq_len=4)  # fmt: skip
    vqvae = MaskGITVQModel(hidden_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, codebook_size=8,
                           norm_num_groups=4, sample_size=4)  # fmt: skip
    RARPipeline(transformer=RARForImageGeneration(config), vqvae=vqvae).save_pretrained(tmp_path / "pipe")
    pipe = tmp_path / "pipe"

    def refusal(path):
        with pytest.raises(UserInputError) as info:
            load_pretrained(MaskGITVQModel, str(path), "--vqvae")
        assert "\n" not in str(info.value)
        return str(info.value)

    with caplog.at_level("WARNING"):
        line = refusal(pipe / "transformer")  # used to warn "Defaulting to unsafe serialization" and ask for a .bin
    assert line == (f"--vqvae {pipe / 'transformer'} is a RAR transformer folder (RARForImageGeneration), not what --vqvae "
                    "takes: pass a MaskGITVQModel folder (a pipeline's vqvae/ subfolder).")  # fmt: skip
    assert "unsafe" not in caplog.text
    assert refusal(pipe) == f"--vqvae {pipe} is a RARPipeline folder: pass its vqvae/ subfolder (--vqvae {pipe / 'vqvae'})."
    missing = tmp_path / "no" / "such" / "vqvae"
    assert refusal(missing) == f"--vqvae {missing}: no such folder; pass a MaskGITVQModel folder (a pipeline's vqvae/ subfolder)."
    assert "Hugging Face cache" not in refusal("./vqgan-typo")
    (tmp_path / "empty").mkdir()
    assert "holds no model (no config.json or model_index.json)" in refusal(tmp_path / "empty")
    assert load_pretrained(MaskGITVQModel, str(pipe / "vqvae"), "--vqvae").config.codebook_size == 8
    # The generator's flag, the other way round.
    with pytest.raises(UserInputError, match="--pretrained_model .*pipe is a RARPipeline folder: pass its transformer/ subfolder"):
        load_pretrained(RARForImageGeneration, str(pipe), "--pretrained_model")


def test_deterministic_algorithms_are_restored_after_the_block():
    assert not torch.are_deterministic_algorithms_enabled()
    with training_utils.deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
