"""Checkpoint and metrics-file helpers shared by the training scripts (examples/train_rar.py, train_vqgan.py)."""

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir) -> list[Path]:
    """Complete `checkpoint-N` folders, oldest first (a save in progress is a hidden `.checkpoint-N.tmp`)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(d.name))]
    return [d for _, d in sorted(found)]


def checkpoint_step(checkpoint) -> int:
    """The optimizer step a `checkpoint-N` folder was saved at."""
    match = CHECKPOINT_PATTERN.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a complete checkpoint folder (expected a name like checkpoint-1000).")
    return int(match.group(1))


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
        raise FileNotFoundError(f"Checkpoint folder not found: {checkpoint}")
    checkpoint_step(checkpoint)  # a half-written `.checkpoint-N.tmp` is refused here
    return checkpoint


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into a temporary folder renamed to `checkpoint-{step}` once complete.

    A killed save therefore never leaves a `checkpoint-N` that "latest" would pick up half-written, and old
    checkpoints beyond `total_limit` are removed only after the new one is complete. Every process must call it.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # A checkpoint of the same step exists when a run was resumed from an earlier one: replace it.
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def truncate_metrics(path, last_step: int):
    """Drop the JSON lines of `path` logged after `last_step`: by an interrupted run, or all of a fresh run's."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= last_step), encoding="utf-8")


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
