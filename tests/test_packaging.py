"""The package builds without setuptools warnings and installs the `rar-hf` command with its data files."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_warnings_and_ships_command_and_data(tmp_path):
    # What `pip install -e .` / `pip install .` run (build_py, egg_info), without network: the installed setuptools.
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Warning" not in output and "would be ignored" not in output, output
    (wheel,) = tmp_path.glob("rar_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "rar-hf = rar_hf.cli:main" in entry_points
    for name in (
        "rar_hf/cli.py",
        "rar_hf/commands/sample.py",
        "rar_hf/model_cards/rar-generic.md",
        "rar_hf/metrics/rar_fid/rar_fid.py",
        "rar_hf/pretrained/tiny-digits/model_index.json",
        "rar_hf/pretrained/tiny-digits/transformer/model.safetensors",
        "rar_hf/pretrained/tiny-digits/vqvae/config.json",
    ):
        assert name in names, name
