import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Produced by the official code (bytedance/1d-tokenizer) with random weights; README.md there specifies every tensor.
OFFICIAL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
# The larger set with the same layout and case names (e.g. ../shared/fixtures/reference) runs too when this is set.
EXTRA_FIXTURES_ENV = "RAR_HF_REFERENCE_FIXTURES"


def _fixture_sets() -> list:
    sets = [pytest.param(OFFICIAL_FIXTURES, id="official-small")]
    if os.environ.get(EXTRA_FIXTURES_ENV):
        sets.append(pytest.param(Path(os.environ[EXTRA_FIXTURES_ENV]), id="reference"))
    return sets


def _require(root: Path, subdir: str) -> Path:
    # A parity test never skips: a missing fixture means the claim of parity is unchecked, which is a failure.
    path = root / subdir
    for name in ("config.json", "cases.safetensors"):
        if not (path / name).is_file():
            pytest.fail(f"official reference fixture {path / name} is missing (see {OFFICIAL_FIXTURES / 'README.md'})")
    return path


@pytest.fixture(scope="session", params=_fixture_sets())
def official_fixture_root(request) -> Path:
    """The committed small set, and the set named by $RAR_HF_REFERENCE_FIXTURES when that is set."""
    return request.param


@pytest.fixture(scope="session")
def rar_fixture_dir(official_fixture_root) -> Path:
    return _require(official_fixture_root, "rar")


@pytest.fixture(scope="session")
def vqgan_fixture_dir(official_fixture_root) -> Path:
    return _require(official_fixture_root, "maskgit_vqgan")


def official_rar_layout(rar_fixture_dir: Path) -> tuple[int, int, int]:
    """`(codebook_size V, num_classes C, image_seq_len L)` of a fixture generator, from its config.json."""
    config = json.loads((rar_fixture_dir / "config.json").read_text())
    return config["codebook_size"], config["condition_num_classes"], config["image_seq_len"]


def official_vqgan_config(vqgan_fixture_dir: Path) -> dict:
    return json.loads((vqgan_fixture_dir / "config.json").read_text())


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: a second thread gains nothing there, and when other processes
    hold the shared cores a spinning OpenMP team slows the runs down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(num_processes: int) -> list[str]:
    """A `torch.distributed.run` launcher on a free port (a fixed port collides with a lingering run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_port", str(port)]
