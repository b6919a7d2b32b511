"""Checkpoint, output-folder and metrics-file helpers shared by the training scripts (examples/train_rar.py,
train_vqgan.py, pretokenize.py).

Nothing here unpickles code: custom training state is written as safetensors, and every pickle-format file that
accelerate writes (optimizer, scheduler, RNG states) is read with `torch.load(weights_only=True)`.
"""

import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from .arguments import HUB_OFFLINE_HINT, UserError
from .run_folder import checkpoint_step, describe_folder, folder_kind, list_checkpoints, looks_like_hub_id
from .weights import torch_load_weights_only

logger = logging.getLogger(__name__)

LOCK_NAME = ".rar_hf_run.lock"
# Test hook: "STEP:STAGE" SIGKILLs the process at STAGE of the save of checkpoint-STEP (see save_checkpoint).
KILL_HOOK_ENV = "RAR_HF_TEST_KILL_DURING_SAVE"


# A mistake in what the user handed a script (flag, folder, file): one line, no traceback, exit status 2 under
# `rar_hf.arguments.run_script`, which every script runs its `main` with.
UserInputError = UserError


def describe_load_error(error: BaseException) -> str:
    """One line on why loading failed, saying so plainly when it was a download refused by HF_HUB_OFFLINE."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)) for e in chain) or (
        os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and "offline" in str(error).lower()
    ):
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]


# The folder each class loads from, and how to point at it from the folders users mistake for it.
_EXPECTED_FOLDER = {
    "MaskGITVQModel": ("vqvae", "a MaskGITVQModel folder (a pipeline's vqvae/ subfolder)"),
    "RARForImageGeneration": ("transformer", "a RARForImageGeneration folder (a pipeline's transformer/ subfolder)"),
}


def check_model_source(cls, name_or_path, what: str) -> None:
    """One line for the folders users hand a flag by mistake, before anything is loaded: a missing path, a pipeline
    root or training run (name its subfolder), the other component's folder, a file or a folder without a model."""
    if cls.__name__ not in _EXPECTED_FOLDER:
        return
    subfolder, expected = _EXPECTED_FOLDER[cls.__name__]
    name = str(name_or_path)
    path = Path(name).expanduser()
    kind = folder_kind(path)
    if kind == subfolder or (kind == "checkpoint" and subfolder == "transformer"):
        return
    if kind == "missing":
        if not looks_like_hub_id(name):
            raise UserInputError(f"{what} {name}: no such folder; pass {expected}.")
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise UserInputError(
                f"{what} {name}: no such folder, and as a Hub id it is not in the local Hugging Face cache; "
                f"{HUB_OFFLINE_HINT}."
            )
        return  # a Hub id: from_pretrained fetches it
    if kind in ("pipeline", "run") and folder_kind(path / subfolder) == subfolder:
        raise UserInputError(f"{what} {name} {describe_folder(path)}: pass its {subfolder}/ subfolder ({what} {path / subfolder}).")
    if kind == "checkpoint" and folder_kind(path.parent / subfolder) == subfolder:
        raise UserInputError(f"{what} {name} {describe_folder(path)}: pass its run's {subfolder}/ subfolder ({what} {path.parent / subfolder}).")
    raise UserInputError(f"{what} {name} {describe_folder(path)}, not what {what} takes: pass {expected}.")


def load_pretrained(cls, name_or_path, what: str, **kwargs):
    """`cls.from_pretrained(name_or_path)`, with any failure (missing, corrupted, offline, the wrong kind of folder)
    as a one-line `UserInputError` naming `what` (the flag) and the folder or Hub id."""
    check_model_source(cls, name_or_path, what)
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except Exception as error:
        raise UserInputError(f"{what} {name_or_path}: cannot load a {cls.__name__}: {describe_load_error(error)}") from error


# ---- the output folder: one run per folder ----


def check_output_dir(output_dir, resume_from_checkpoint, overwrite_output_dir: bool) -> None:
    """Refuse to start a fresh run in a folder that holds another run's files: a new run would mix its metrics and
    checkpoints with the old ones (and "latest" would resume the old run). Call on every process before any writes."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"--output_dir {output_dir} exists and is not a folder.")
    if resume_from_checkpoint is not None and overwrite_output_dir:
        raise UserInputError("--overwrite_output_dir deletes the run that --resume_from_checkpoint would continue: give one.")
    if resume_from_checkpoint is not None or overwrite_output_dir or not output_dir.is_dir():
        return
    entries = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_NAME)
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserInputError(
            f"--output_dir {output_dir} is not empty ({shown}): pass --resume_from_checkpoint latest to continue "
            "that run, --overwrite_output_dir to delete it and start again, or choose another folder."
        )


def check_distributed_launch(num_processes: int) -> None:
    """Refuse processes that were launched as a distributed job but did not join one: each would train alone on all
    the data and write into the same output folder."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and num_processes == 1:
        raise UserInputError(
            f"WORLD_SIZE={world_size} but this process trains alone (accelerate sees 1 process), so {world_size} "
            "independent runs would write into one output folder. Without GPUs, launch with ACCELERATE_USE_CPU=true "
            "in the environment (torchrun or `accelerate launch --multi_gpu`); with GPUs, check that they are visible."
        )


def lock_output_dir(output_dir):
    """Hold an exclusive lock on `output_dir` for the life of the process (main process only); a second run into the
    same folder (another job, or a mis-launched rank that trains alone) is refused. Returns the open lock file."""
    path = Path(output_dir) / LOCK_NAME
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserInputError(
            f"--output_dir {output_dir} is in use by a training run that is still going ({holder}); wait for it, or "
            "launch several processes as one job (see the script's docstring) instead of independent runs."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def clear_output_dir(output_dir) -> None:
    """Delete everything in `output_dir` but the lock (for --overwrite_output_dir)."""
    for entry in Path(output_dir).iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prepare_output_dir(accelerator, output_dir, overwrite_output_dir: bool):
    """Create, lock and (with --overwrite_output_dir) clear `output_dir` on the main process; every process must
    call it after `check_output_dir`. Returns the lock handle to keep (None on other processes)."""
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes into it
    lock = None
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        lock = lock_output_dir(output_dir)
        if overwrite_output_dir:
            clear_output_dir(output_dir)
    accelerator.wait_for_everyone()
    return lock


def resolve_checkpoint(resume_from_checkpoint, output_dir) -> Path | None:
    """What `--resume_from_checkpoint` names: None, the newest complete checkpoint for "latest" (None if there is
    none yet), or the given folder, which must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    checkpoint = Path(resume_from_checkpoint)
    if not checkpoint.is_dir():
        raise UserInputError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
    checkpoint_step(checkpoint)  # a half-written `.checkpoint-N.tmp` is refused here
    return checkpoint


def _test_kill_point(step: int, stage: str) -> None:
    if os.environ.get(KILL_HOOK_ENV) == f"{step}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def _discard(path: Path, step: int) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted `checkpoint-N`: hide it first (a rename is
    atomic), then delete the hidden copy, which a killed run leaves behind for the next save to remove."""
    hidden = path.with_name(f".{path.name}.old")
    if hidden.exists():
        shutil.rmtree(hidden)
    os.replace(path, hidden)
    _test_kill_point(step, "discard")
    shutil.rmtree(hidden)


def save_checkpoint(
    accelerator, output_dir, step: int, total_limit: int | None = None, custom_states=None, write_extra=None
) -> Path:
    """`accelerator.save_state` (plus `custom_states`, see `save_custom_states`, and whatever `write_extra(folder)`
    writes on the main process) into a hidden temporary folder that is renamed to `checkpoint-{step}` once complete.
    Every process must call it.

    A save killed at any point leaves every `checkpoint-N` either complete or absent: replaced and rotated-out
    checkpoints are renamed to hidden folders before they are deleted, and the new one appears by a single rename.
    "latest" therefore always finds a complete checkpoint (the previous one if this save did not finish).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        for stale in output_dir.glob(".checkpoint-*"):  # left by an interrupted save
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    _test_kill_point(step, "state")
    if accelerator.is_main_process and custom_states:
        save_custom_states(tmp, custom_states)
    if accelerator.is_main_process and write_extra is not None:
        write_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _test_kill_point(step, "complete")
        # A checkpoint of the same step exists when a run was resumed from an earlier one: replace it.
        if final.exists():
            _discard(final, step)
        _test_kill_point(step, "replace")
        os.replace(tmp, final)
        _test_kill_point(step, "renamed")
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                _discard(old, step)
    accelerator.wait_for_everyone()
    return final


# ---- custom training state as safetensors ----


def save_custom_states(folder, states: dict) -> None:
    """Write each `obj.state_dict()` of `states` (name -> object) to `folder/{name}.safetensors`.

    Tensors (also inside lists) become safetensors entries; ints, floats, bools, strings and None go to the header's
    JSON metadata. This replaces accelerate's `register_for_checkpointing`, whose `custom_checkpoint_N.pkl` is
    fully unpickled (not weights-only) on resume, so a planted pickle there runs code.
    """
    from safetensors.torch import save_file

    for name, obj in states.items():
        tensors, plain = {}, {}
        for key, value in obj.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
                plain[key] = {"tensor_list": len(value)}
                for i, v in enumerate(value):
                    tensors[f"{key}.{i}"] = v.detach().cpu().contiguous()
            elif value is None or isinstance(value, (bool, int, float, str)):
                plain[key] = {"value": value}
            else:
                raise TypeError(f"cannot save {name}.{key} of type {type(value).__name__} as safetensors")
        save_file(tensors, str(Path(folder) / f"{name}.safetensors"), metadata={"rar_hf_state": json.dumps(plain)})


def load_custom_states(folder, states: dict, device="cpu", optional=()) -> None:
    """Load what `save_custom_states` wrote into each object of `states` (name -> object); the names in `optional`
    are skipped when their file is absent (state that older checkpoints did not save)."""
    from safetensors import safe_open

    for name, obj in states.items():
        path = Path(folder) / f"{name}.safetensors"
        if not path.is_file() and name in optional:
            logger.warning("%s holds no %s state (saved by an older version): it starts afresh.", folder, name)
            continue
        if not path.is_file():
            raise UserInputError(f"{path}: missing from the checkpoint (was it saved without this option?).")
        try:
            # Read on the CPU, then moved: safetensors does not take every device name torch does (e.g. "cpu:0",
            # what a process of a multi-process CPU run has).
            with safe_open(str(path), framework="pt", device="cpu") as f:
                plain = json.loads((f.metadata() or {})["rar_hf_state"])
                tensors = {key: f.get_tensor(key).to(device) for key in f.keys()}
            state = {}
            for key, entry in plain.items():
                state[key] = [tensors.pop(f"{key}.{i}") for i in range(entry["tensor_list"])] if "tensor_list" in entry else entry["value"]
            state.update(tensors)
            obj.load_state_dict(state)
        except Exception as error:
            raise UserInputError(f"{path}: not a valid {name} state ({describe_load_error(error)}).") from error


# ---- resuming without running code from the checkpoint ----


def _load_weights_only(path: Path):
    # accelerate's allow-list: numpy arrays and dtypes and codecs.encode, which its RNG-state pickles need and which
    # build data, not code.
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    return torch_load_weights_only(path, TORCH_SAFE_GLOBALS)


def _check_checkpoint_file(path: Path) -> str | None:
    """Why `path` cannot be read safely, or None if it can."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        else:
            _load_weights_only(path)
    except Exception as error:
        return describe_load_error(error)
    return None


def _restore_rng_states(path: Path) -> None:
    """Set the RNG states of `random_states_{rank}.pkl` (what accelerate's load_state does, but an unreadable file is
    an error: accelerate only logs "Could not load random states" and goes on with a different random stream)."""
    try:
        states = _load_weights_only(path)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception as error:
        raise UserInputError(f"{path}: not a readable RNG state file ({describe_load_error(error)}); the resumed run would not be exact.") from error


def load_checkpoint(accelerator, checkpoint, custom_states=None, optional=()) -> int:
    """`accelerator.load_state(checkpoint)` plus `custom_states`; returns the checkpoint's step.

    Nothing in the folder can run code: model weights are safetensors, accelerate reads its pickle-format files with
    `weights_only=True` (checked here with planted payloads in the tests), custom states are safetensors and
    pickles of the old `register_for_checkpointing` format are refused. A corrupted file is a `UserInputError`
    naming it.
    """
    checkpoint = Path(checkpoint)
    step = checkpoint_step(checkpoint)
    legacy = sorted(checkpoint.glob("custom_checkpoint_*.pkl"))
    if legacy:
        raise UserInputError(
            f"{legacy[0]}: a pickled training state that resuming would have to unpickle (which can run code); this "
            "checkpoint was written by an older version and is not loaded."
        )
    rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise UserInputError(f"{rng_file}: missing from the checkpoint (saved by a different number of processes?).")
    try:
        accelerator.load_state(str(checkpoint))
    except UserInputError:
        raise
    except Exception as error:
        for path in sorted(checkpoint.iterdir()):
            if path.is_file() and path.suffix in (".safetensors", ".bin", ".pkl"):
                reason = _check_checkpoint_file(path)
                if reason is not None:
                    raise UserInputError(f"{path}: corrupted or not a checkpoint file ({reason}).") from error
        raise UserInputError(f"{checkpoint}: cannot resume from it ({describe_load_error(error)}).") from error
    _restore_rng_states(rng_file)
    if custom_states:
        load_custom_states(checkpoint, custom_states, device=accelerator.device, optional=optional)
    return step


def truncate_metrics(path, last_step: int):
    """Drop the JSON lines of `path` logged after `last_step`: by an interrupted run, or all of a fresh run's."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    # Rewritten through a temporary file: a run killed here keeps the old lines rather than none.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def finish_uploads(futures: list) -> None:
    """Wait for background Hub uploads (`upload_folder(..., run_as_future=True)`) and empty the list.

    A failed upload is logged, not raised: its checkpoint is still on disk and training can go on.
    """
    for future in futures:
        try:
            future.result()
        except Exception as error:
            logger.warning("A checkpoint upload to the Hub failed (the checkpoint is still on disk): %s", error)
    futures.clear()


class LossWindow:
    """The training loss summed over the steps since the last log, per process; saved with checkpoints (as a custom
    state) so that the first value logged after a resume averages the same steps as in an uninterrupted run.

    `gather(accelerator)` must run on every process before a checkpoint is saved: the main process saves the sums of
    all processes, and each process takes its own back on resume.
    """

    def __init__(self, device, rank: int = 0):
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.rank = rank
        self._gathered = None

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.count += 1

    def mean(self, accelerator) -> float:
        """The mean loss of the window, averaged over processes (every process must call it), and a new window."""
        value = accelerator.reduce(self.total / self.count, reduction="mean").item()
        self.total.zero_()
        self.count = 0
        return value

    def gather(self, accelerator) -> None:
        self._gathered = accelerator.gather(self.total.detach()[None])

    def state_dict(self) -> dict:
        if self._gathered is None:
            raise RuntimeError("LossWindow.gather must run on every process before its state is saved")
        return {"totals": self._gathered, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        totals = state["totals"]
        if self.rank >= len(totals):
            raise ValueError(f"the saved loss window holds {len(totals)} processes, not process {self.rank}")
        self.total = totals[self.rank].to(self.total.device, self.total.dtype).clone()
        self.count = int(state["count"])


def setting_changes(saved: dict, current: dict) -> list[str]:
    """`--name old -> new` for every setting of `current` whose value differs from `saved` (a key missing there
    counts as unchanged: a setting that older runs did not record)."""
    return [f"--{key} {saved[key]} -> {value}" for key, value in current.items() if key in saved and saved[key] != value]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """`torch.use_deterministic_algorithms` for the block, restored afterwards (the setting is process-wide).

    On CPU this makes seeded training bit-identical from run to run: the backward of indexing a table by a tensor
    (RAR's position embeddings, gathered by the scan order) otherwise accumulates in a thread-dependent order.
    `warn_only`: an op without a deterministic kernel warns rather than stopping a run.
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def vqvae_resolution(resolution: int | None, vqvae, vqvae_name) -> int:
    """The image size to tokenise at with `vqvae`: its `sample_size` when `resolution` is None; a `resolution` other
    than that is a `UserInputError` (a 32-px tokenizer fed 256-px images makes 64x as many tokens, and a model of
    the wrong sequence length)."""
    native = vqvae.config.sample_size
    native = native if isinstance(native, int) else (native[0] if native[0] == native[1] else None)
    if resolution is None:
        if native is None:
            raise UserInputError(f"--vqvae {vqvae_name} has a non-square sample_size {vqvae.config.sample_size}: pass --resolution.")
        logger.info("--resolution %d: the sample_size of --vqvae %s.", native, vqvae_name)
        return native
    if native is not None and resolution != native:
        raise UserInputError(
            f"--resolution {resolution} but --vqvae {vqvae_name} is made for {native}-px images (its sample_size): "
            f"leave --resolution out or pass --resolution {native}."
        )
    return resolution


def save_adapter(model, folder) -> None:
    """PEFT's `save_pretrained` of a RAR adapter: adapter_config.json, adapter_model.safetensors (and PEFT's
    README.md). `save_embedding_layers=False`: PEFT would otherwise save the whole embedding table because the class
    count differs from the base's, but the class rows are the adapter's trainable tokens and the others are the
    base's."""
    model.save_pretrained(str(folder), save_embedding_layers=False)


def register_adapter_checkpointing(accelerator) -> None:
    """Checkpoints of a PEFT model hold its adapter only: PEFT's `adapter_config.json` and
    `adapter_model.safetensors` (what `save_pretrained` writes) instead of accelerate's `model.safetensors` of the
    whole model, and resuming loads them back into the model (diffusers' LoRA scripts do the same with these hooks).
    The frozen base is rebuilt from `--pretrained_model` on resume."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from .finetuning import ADAPTER_WEIGHTS

    def adapters(models):
        return [(m, accelerator.unwrap_model(m)) for m in models if isinstance(accelerator.unwrap_model(m), PeftModel)]

    def save(models, weights, output_dir):
        for index in reversed(range(len(models))):
            unwrapped = accelerator.unwrap_model(models[index])
            if isinstance(unwrapped, PeftModel):
                if accelerator.is_main_process:
                    save_adapter(unwrapped, output_dir)
                weights.pop(index)

    def load(models, input_dir):
        for model, unwrapped in adapters(models):
            path = Path(input_dir) / ADAPTER_WEIGHTS
            if not path.is_file():
                raise UserInputError(f"{path}: missing from the checkpoint (was the run trained without --lora_rank?).")
            state = load_file(str(path))
            expected = set(get_peft_model_state_dict(unwrapped, save_embedding_layers=False))
            if set(state) != expected:
                difference = sorted(set(state) ^ expected)
                raise UserInputError(f"{path}: not the adapter of this model ({len(difference)} tensors differ, e.g. {difference[0]}).")
            set_peft_model_state_dict(unwrapped, state)
            models.remove(model)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
