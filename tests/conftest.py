import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("RAR_HF_REFERENCE_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "reference"))


def _require(subdir: str) -> Path:
    path = FIXTURES / subdir
    if not path.is_dir():
        pytest.skip(
            f"reference fixtures not found at {path}; set RAR_HF_REFERENCE_FIXTURES to the folder holding "
            "rar/ and maskgit_vqgan/ (the shared/fixtures/reference folder beside the repository)"
        )
    return path


@pytest.fixture(scope="session")
def rar_fixture_dir() -> Path:
    return _require("rar")


@pytest.fixture(scope="session")
def vqgan_fixture_dir() -> Path:
    return _require("maskgit_vqgan")


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
