"""The `rar-hf` command: help texts, the legible generate grid, and one-line errors for every user mistake."""

import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rar_hf import cli
from rar_hf.commands.generate import DEFAULT_MODEL, labelled_grid

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv, capsys):
    """`rar-hf ARGV` in this process: (exit status, stdout, the stderr lines that are not progress bars)."""
    code = 0
    try:
        cli.main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "?it/s" not in line]


def assert_one_line_error(code, err, *fragments, status=1):
    assert code == status, err
    assert len(err) == 1 and " error: " in err[0], err
    assert "Traceback" not in err[0]
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_help_lists_the_commands_and_keeps_line_continuations():
    result = subprocess.run([sys.executable, "-m", "rar_hf", "--help"], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0
    for command in ("generate", "sample", "evaluate", "convert"):
        assert f"\n    {command} " in result.stdout
    # The shell continuation of a multi-line example must survive in the rendered help (a plain docstring ate it).
    convert = subprocess.run([sys.executable, "-m", "rar_hf", "convert", "--help"], capture_output=True, text=True, env=ENV)
    assert "maskgit-vqgan-imagenet-f16-256.bin \\\n        --output_dir rar-xl" in convert.stdout
    pretokenize = subprocess.run(
        [sys.executable, str(REPO / "examples" / "pretokenize.py"), "--help"], capture_output=True, text=True, env=ENV
    )
    assert "--vqvae org/maskgit-vqgan \\\n        --output_dir imagenet-tokens" in pretokenize.stdout


def test_labelled_grid_upscales_separates_and_labels():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(4)]
    rows = [[Image.fromarray(a) for a in arrays[:2]], [Image.fromarray(a) for a in arrays[2:]]]
    grid = np.asarray(labelled_grid(rows, ["3, three", "unconditional"]))
    cell, gap = 64, 4  # 8 px images become 64 px cells (factor 8, nearest neighbour)
    label_width = grid.shape[1] - 2 * (cell + gap) - gap
    assert grid.shape[0] == 2 * (cell + gap) + gap and label_width > 40
    for r in range(2):
        top = gap + r * (cell + gap)
        for c in range(2):
            left = label_width + c * (cell + gap)
            expected = np.kron(arrays[2 * r + c], np.ones((8, 8, 1), np.uint8))
            np.testing.assert_array_equal(grid[top : top + cell, left : left + cell], expected)
            assert (grid[top : top + cell, left + cell : left + cell + gap] == 255).all()  # separator
        assert (grid[top : top + cell, :label_width] < 128).any(), f"row {r} has no label text"
    assert (grid[gap + cell : 2 * gap + cell] == 255).all()  # separator between the rows


def test_generate_writes_the_pipelines_images_for_the_seed(tmp_path, capsys):
    from rar_hf import RARPipeline

    argv = ["generate", "--class_labels", "seven", "3", "none", "--num_images_per_label", "2", "--seed", "1"]
    code, out, err = run_cli([*argv, "--output_path", str(tmp_path / "grid.png"), "--output_dir", str(tmp_path / "pngs")], capsys)
    assert code == 0, err
    assert "7 (7, seven), 3 (3, three), unconditional" in out
    names = sorted(p.name for p in (tmp_path / "pngs").glob("*.png"))
    assert names == ["00_7_000.png", "00_7_001.png", "01_3_000.png", "01_3_001.png", "02_none_000.png", "02_none_001.png"]
    pipe = RARPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(["seven", 3, None], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1)).images
    for name, image in zip(names, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pngs" / name)), np.asarray(image))
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height == 3 * (64 + 4) + 4  # 32 px digits in 64 px cells, three labelled rows


def test_examples_generate_still_runs(tmp_path):
    command = [sys.executable, str(REPO / "examples" / "generate.py"), "--class_labels", "1", "--num_images_per_label", "1"]
    result = subprocess.run([*command, "--output_path", str(tmp_path / "one.png")], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "one.png").height == 64 + 2 * 4


@pytest.fixture(scope="module")
def corrupted_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupted") / "tiny-digits"
    shutil.copytree(DEFAULT_MODEL, folder)
    weights = folder / "transformer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return folder


def test_generate_and_sample_user_errors_are_one_line(tmp_path, capsys, corrupted_pipeline, monkeypatch):
    code, _, err = run_cli(["generate", "--guidance_scale", "nan"], capsys)
    assert_one_line_error(code, err, "--guidance_scale", "finite", status=2)
    code, _, err = run_cli(["generate", "--class_labels", "sevn", "--output_path", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "Unknown class name 'sevn'", "seven")  # the pipeline's ValueError
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "absent")], capsys)
    assert_one_line_error(code, err, "absent", "no such pipeline folder")
    weights = str(corrupted_pipeline / "transformer" / "model.safetensors")
    code, _, err = run_cli(["generate", "--model", str(corrupted_pipeline)], capsys)
    assert_one_line_error(code, err, weights, "not a readable safetensors file")
    code, _, err = run_cli(["sample", "--model", str(corrupted_pipeline), "--output_dir", str(tmp_path / "s")], capsys)
    assert_one_line_error(code, err, weights)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(["generate", "--model", "rar-hf-tests/not-in-the-cache"], capsys)
    assert_one_line_error(code, err, "rar-hf-tests/not-in-the-cache", "HF_HUB_OFFLINE=1", "not in the Hub cache")


def test_convert_user_errors_are_one_line(tmp_path, capsys, rar_fixture_dir):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    generator = str(rar_fixture_dir / "generator.bin")
    code, out, err = run_cli(["convert", "--generator", generator, "--output_dir", str(afile)], capsys)
    assert_one_line_error(code, err, str(afile), "is an existing file")
    assert "Wrote" not in out and afile.read_text() == "mine"
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((rar_fixture_dir / "generator.bin").read_bytes()[:5000])
    code, _, err = run_cli(["convert", "--generator", str(truncated), "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, str(truncated), "not a readable PyTorch checkpoint")


@pytest.fixture
def npz_inputs(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "reference.npz", rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8))
    return tmp_path / "samples.npz", tmp_path / "reference.npz"


def test_evaluate_user_errors_name_the_file(tmp_path, capsys, npz_inputs, rar_fixture_dir, monkeypatch):
    samples, reference = npz_inputs
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all" * 10)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(reference.read_bytes()[:300])
    bad_pth = tmp_path / "pt_inception.pth"
    bad_pth.write_bytes(b"\x80\x04garbage")

    def evaluate(samples, reference, *weights):
        return run_cli(["evaluate", "--samples", str(samples), "--reference", str(reference), *weights], capsys)

    code, _, err = evaluate(garbage, reference, "--random_inception_weights")
    assert_one_line_error(code, err, str(garbage), "not a readable npz file")
    code, _, err = evaluate(samples, truncated, "--random_inception_weights")
    assert_one_line_error(code, err, str(truncated))
    code, _, err = evaluate(samples, reference, "--inception_weights", str(bad_pth))
    assert_one_line_error(code, err, str(bad_pth), "not a readable FID Inception weights file")
    code, _, err = evaluate(samples, reference, "--inception_weights", str(rar_fixture_dir / "generator.bin"))
    assert_one_line_error(code, err, "generator.bin", "is not an FID Inception state dict")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code, _, err = evaluate(samples, reference, "--download_inception_weights")
    assert_one_line_error(code, err, "could not download the FID Inception weights", "offline?")


def test_corrupted_pth_is_loaded_weights_only(tmp_path):
    """A pickle that would run code is refused by the weights-only loader, and reported naming the file."""
    from rar_hf.metrics.inception import FIDInceptionV3

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"fc.weight": Payload()}, tmp_path / "planted.pth")
    with pytest.raises(ValueError, match="planted.pth is not a readable FID Inception weights file"):
        FIDInceptionV3.from_pretrained(tmp_path / "planted.pth")
    assert not (tmp_path / "ran").exists()
