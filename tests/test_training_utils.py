import json
from concurrent.futures import Future

import pytest

from rar_hf.training_utils import (
    checkpoint_step,
    finish_uploads,
    list_checkpoints,
    resolve_checkpoint,
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
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / ".checkpoint-20.tmp"), tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint-30"):
        resolve_checkpoint(str(tmp_path / "checkpoint-30"), tmp_path)


def test_truncate_metrics_drops_lines_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_metrics(tmp_path / "absent.jsonl", 4)  # nothing to do, no error


def test_finish_uploads_waits_and_reports_failures_without_raising(caplog):
    done, failed = Future(), Future()
    done.set_result(None)
    failed.set_exception(OSError("403 Forbidden"))
    pending = [done, failed]
    with caplog.at_level("WARNING"):
        finish_uploads(pending)
    assert pending == []
    assert "checkpoint upload to the Hub failed" in caplog.text and "403 Forbidden" in caplog.text
