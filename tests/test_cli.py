"""The `rar-hf` command: help texts, the legible generate grid, speculative options, and one-line errors (exit status 2)
for every user mistake, checked before anything is loaded. Run in-process (`cli.main(argv)`), except two smoke tests of
the installed command."""

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rar_hf import cli
from rar_hf.commands import generate
from rar_hf.commands.generate import DEFAULT_MODEL, labelled_grid
from rar_hf.pipeline_rar import RARPipeline, RARPipelineOutput

REPO = Path(__file__).resolve().parents[1]
INSTALLED = Path(sys.executable).with_name("rar-hf")
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


def assert_one_line_error(code, err, *fragments, prog="rar-hf"):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"{prog}") and ": error: " in err[0], err
    for fragment in fragments:
        assert fragment in err[0], err[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Make loading a pipeline a test failure: for errors that must be found before any compute."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the bad input was reported")

    monkeypatch.setattr(generate, "load_pipeline", refuse)


# ---- the installed command (the only subprocesses) ----


def test_installed_command_generates_a_grid(tmp_path):
    command = [str(INSTALLED), "generate", "--class_labels", "1", "--num_images_per_label", "1"]
    result = subprocess.run([*command, "--output_path", str(tmp_path / "one.png")], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "one.png").height == 64 + 2 * 4


def test_installed_command_refuses_in_one_line_with_status_2(tmp_path):
    result = subprocess.run(
        [str(INSTALLED), "generate", "--model", str(REPO / "README.md")], capture_output=True, text=True, env=ENV
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines == [f"rar-hf generate: error: --model {REPO / 'README.md'} is a file; expected a RARPipeline folder "
                     "(model_index.json, transformer/, vqvae/) or a Hub id"], lines  # fmt: skip


# ---- help ----


def test_help_lists_the_commands_and_keeps_line_continuations(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("generate", "sample", "evaluate", "convert"):
        assert f"\n    {command} " in out
    assert "Exit status" in out
    # The shell continuation of a multi-line example must survive in the rendered help (a plain docstring ate it).
    code, out, _ = run_cli(["convert", "--help"], capsys)
    assert code == 0 and "maskgit-vqgan-imagenet-f16-256.bin \\\n        --output_dir rar-xl" in out
    code, out, _ = run_cli(["generate", "--help"], capsys)
    assert "(default: pow-cosine)" in out and "--jacobi_window" in out and "--assistant_model" in out


def test_example_scripts_share_the_parser(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretokenize_script", REPO / "examples" / "pretokenize.py")
    pretokenize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretokenize)
    with pytest.raises(SystemExit) as exit:
        pretokenize.parse_args(["--help"])
    assert exit.value.code == 0
    assert "--vqvae org/maskgit-vqgan \\\n        --output_dir imagenet-tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        pretokenize.parse_args(["--output_dir", "x"])  # neither --dataset_name nor --official_jsonl
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and "give exactly one of --dataset_name and --official_jsonl" in err[0]


# ---- generate ----


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
    argv = ["generate", "--class_labels", "seven", "3", "--num_images_per_label", "2", "--seed", "1"]
    code, out, err = run_cli([*argv, "--output_path", str(tmp_path / "grid.png"), "--output_dir", str(tmp_path / "pngs")], capsys)
    assert code == 0, err
    assert "7 (7, seven), 3 (3, three)" in out
    names = sorted(p.name for p in (tmp_path / "pngs").glob("*.png"))
    assert names == ["00_7_000.png", "00_7_001.png", "01_3_000.png", "01_3_001.png"]
    pipe = RARPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(["seven", 3], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1)).images
    for name, image in zip(names, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pngs" / name)), np.asarray(image))
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height == 2 * (64 + 4) + 4  # 32 px digits in 64 px cells, two labelled rows


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Record the labels given to `get_label_ids` and the keyword arguments of the pipeline call (which returns
    blank images instead of generating)."""
    calls = {"labels": [], "kwargs": []}

    def record_labels(self, labels):
        calls["labels"].append(list(labels))
        return [0] * len(labels)

    def record_call(self, class_labels, **kwargs):
        calls["kwargs"].append(kwargs)
        images = [Image.new("RGB", (32, 32))] * (len(class_labels) * kwargs["num_images_per_prompt"])
        return RARPipelineOutput(images=images, tokens=None)

    monkeypatch.setattr(RARPipeline, "get_label_ids", record_labels)
    monkeypatch.setattr(RARPipeline, "__call__", record_call)
    return calls


def test_generate_passes_class_labels_to_the_pipeline_as_python_would(tmp_path, capsys, pipeline_calls):
    labels = ["seven", "3", "none", "-1", "Unconditional", "white shark"]
    code, _, err = run_cli(["generate", "--class_labels", *labels, "--output_path", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    # Ints become ints, every other string is the pipeline's to interpret (names, "none", "unconditional").
    assert pipeline_calls["labels"] == [["seven", 3, "none", -1, "Unconditional", "white shark"]]


def test_generate_passes_speculative_options_under_their_names(tmp_path, capsys, pipeline_calls):
    out = ["--class_labels", "1", "--output_path", str(tmp_path / "g.png")]
    assert run_cli(["generate", *out], capsys)[0] == 0
    plain = pipeline_calls["kwargs"][-1]
    assert not set(generate.SPECULATIVE_OPTIONS) & set(plain)  # nothing passed that the user did not ask for

    code, _, err = run_cli(["generate", *out, "--jacobi_window", "4", "--acceptance", "relaxed", "--relax", "1.5"], capsys)
    assert code == 0, err
    assert {k: pipeline_calls["kwargs"][-1].get(k) for k in generate.SPECULATIVE_OPTIONS} == {
        "jacobi_window": 4, "assistant_model": None, "num_assistant_tokens": None, "acceptance": "relaxed", "relax": 1.5,
    }  # fmt: skip

    # A pipeline folder as assistant: its transformer/ is loaded and passed as the model it is.
    code, _, err = run_cli(
        ["generate", *out, "--assistant_model", str(DEFAULT_MODEL), "--num_assistant_tokens", "3"], capsys
    )
    assert code == 0, err
    kwargs = pipeline_calls["kwargs"][-1]
    assert kwargs["num_assistant_tokens"] == 3 and "jacobi_window" not in kwargs
    assistant = kwargs["assistant_model"]
    reference = RARPipeline.from_pretrained(DEFAULT_MODEL).transformer
    assert type(assistant) is type(reference) and assistant.config.to_dict() == reference.config.to_dict()
    torch.testing.assert_close(assistant.lm_head.weight, reference.lm_head.weight)


def test_generate_with_jacobi_decoding_end_to_end(tmp_path, capsys):
    argv = ["generate", "--class_labels", "4", "--num_images_per_label", "2", "--jacobi_window", "4"]
    code, out, err = run_cli([*argv, "--output_dir", str(tmp_path)], capsys)
    assert code == 0, err
    images = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in images] == ["00_4_000.png", "00_4_001.png"]
    assert Image.open(images[0]).size == (32, 32)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--jacobi_window", "2", "--assistant_model", "x"], ["--jacobi_window and --assistant_model", "pass one"]),
        (["--num_assistant_tokens", "2"], ["--num_assistant_tokens needs --assistant_model"]),
        (["--acceptance", "relaxed"], ["--acceptance applies to speculative decoding", "--jacobi_window"]),
        (["--jacobi_window", "2", "--relax", "2"], ["--relax applies to --acceptance relaxed only"]),
        (["--jacobi_window", "2", "--acceptance", "relaxed", "--relax", "0.5"], ["--relax must be >= 1"]),
        (["--jacobi_window", "0"], ["--jacobi_window", "expected a positive integer"]),
        (["--acceptance", "strict"], ["--acceptance", "invalid choice"]),
        (["--guidance_scale", "nan"], ["--guidance_scale", "finite"]),
    ],
)
def test_generate_flag_mistakes_are_refused_before_loading(argv, fragments, capsys, nothing_loads):
    code, _, err = run_cli(["generate", *argv], capsys)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize("flag", ["--output_path", "--output_dir"])
def test_unwritable_outputs_are_refused_before_loading(tmp_path, capsys, nothing_loads, monkeypatch, flag):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = run_cli(["generate", flag, str(afile / "inside")], capsys)
    assert_one_line_error(code, err, f"{flag} {afile / 'inside'}", f"{afile} is a file")
    if flag == "--output_dir":
        code, _, err = run_cli(["generate", flag, str(afile)], capsys)
        assert_one_line_error(code, err, f"--output_dir {afile} is a file, expected a folder")
    else:
        code, _, err = run_cli(["generate", flag, str(tmp_path)], capsys)
        assert_one_line_error(code, err, f"--output_path {tmp_path} is a folder, expected a file path")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, _, err = run_cli(["generate", flag, str(tmp_path / "new" / "x.png")], capsys)
    assert_one_line_error(code, err, f"cannot write in {tmp_path} (Permission denied)")
    assert afile.read_text() == "mine" and not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def corrupted_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupted") / "tiny-digits"
    shutil.copytree(DEFAULT_MODEL, folder)
    weights = folder / "transformer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return folder


def test_generate_and_sample_model_errors_are_one_line(tmp_path, capsys, corrupted_pipeline):
    code, _, err = run_cli(["generate", "--class_labels", "sevn", "--output_path", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, "Unknown class name 'sevn'", "seven")  # the pipeline's ValueError
    code, _, err = run_cli(["generate", "--model", str(tmp_path / "absent")], capsys)
    assert_one_line_error(code, err, f"--model {tmp_path / 'absent'}: no such folder; expected a RARPipeline folder")
    weights = corrupted_pipeline / "transformer" / "model.safetensors"
    code, _, err = run_cli(["generate", "--model", str(weights)], capsys)
    assert_one_line_error(code, err, f"--model {weights} is a file; expected a RARPipeline folder")
    code, _, err = run_cli(["generate", "--model", str(corrupted_pipeline)], capsys)
    assert_one_line_error(code, err, str(weights), "not a readable safetensors file")
    code, _, err = run_cli(["sample", "--model", str(corrupted_pipeline), "--output_dir", str(tmp_path / "s")], capsys)
    assert_one_line_error(code, err, str(weights))
    code, _, err = run_cli(["generate", "--assistant_model", str(tmp_path), "--output_path", str(tmp_path / "x.png")], capsys)
    assert_one_line_error(code, err, f"--assistant_model {tmp_path}: no config.json", "RARForImageGeneration folder")


def test_hub_ids_offline_say_how_to_go_online(capsys, monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants

    hint = "offline: set HF_HUB_OFFLINE=0 or pass a local folder"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(["generate", "--model", "rar-hf-tests/not-in-the-cache"], capsys)
    assert_one_line_error(code, err, "--model rar-hf-tests/not-in-the-cache", hint)
    code, _, err = run_cli(["generate", "--assistant_model", "rar-hf-tests/draft", "--output_dir", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "--assistant_model rar-hf-tests/draft", hint)
    # Past the cache check (a stale or partial cache entry), diffusers' own failure ("Please check out the root cause in
    # the stacktrace above", with no stacktrace shown) becomes the same line.
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: "/cached/model_index.json")
    code, _, err = run_cli(["generate", "--model", "rar-hf-tests/not-in-the-cache"], capsys)
    assert_one_line_error(code, err, "--model rar-hf-tests/not-in-the-cache", hint)
    assert "stacktrace" not in err[0]


def test_assistant_model_from_a_cached_hub_pipeline_repo(tmp_path, capsys, monkeypatch, pipeline_calls):
    import huggingface_hub.constants

    # A pipeline repo in the Hub cache (offline): its transformer/ subfolder is the assistant.
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--rar-hf-tests--digits"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(DEFAULT_MODEL, repo / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = ["generate", "--assistant_model", "rar-hf-tests/digits", "--output_path", str(tmp_path / "g.png")]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assistant = pipeline_calls["kwargs"][-1]["assistant_model"]
    assert assistant.config.num_classes == 10 and assistant.config.codebook_size > 0


# ---- convert (more in test_convert.py) ----


def test_convert_user_errors_are_one_line_and_write_nothing(tmp_path, capsys, rar_fixture_dir, vqgan_fixture_dir):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    generator = str(rar_fixture_dir / "generator.bin")
    code, out, err = run_cli(["convert", "--generator", generator, "--output_dir", str(afile)], capsys)
    assert_one_line_error(code, err, f"--output_dir {afile} is a file, expected a folder")
    assert "Wrote" not in out and afile.read_text() == "mine"
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((rar_fixture_dir / "generator.bin").read_bytes()[:5000])
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["convert", "--generator", str(truncated), "--output_dir", str(out_dir)], capsys)
    assert_one_line_error(code, err, str(truncated), "not a readable official RAR generator checkpoint", "truncated")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes about RAR\n")
    code, _, err = run_cli(["convert", "--generator", str(notes), "--output_dir", str(out_dir)], capsys)
    assert_one_line_error(code, err, str(notes), "it is a text file (it starts with 'my notes about RAR')")
    # A bad --tokenizer is found before the generator is converted or anything is written.
    code, _, err = run_cli(["convert", "--generator", generator, "--tokenizer", str(notes), "--output_dir", str(out_dir)], capsys)
    assert_one_line_error(code, err, str(notes), "official MaskGIT-VQGAN checkpoint (--tokenizer)", "text file")
    code, _, err = run_cli(["convert", "--generator", str(tmp_path), "--output_dir", str(out_dir)], capsys)
    assert_one_line_error(code, err, f"{tmp_path} is a folder; expected the official RAR generator checkpoint")
    assert not out_dir.exists()


def test_rar_hf_convert_alias_and_module_entry(tmp_path, capsys, rar_fixture_dir):
    with pytest.raises(SystemExit) as exit:
        cli.convert_main(["--generator", str(tmp_path / "nope.bin"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err == [f"rar-hf-convert: error: official RAR generator checkpoint (--generator) not "
                                            f"found: {tmp_path / 'nope.bin'}"]  # fmt: skip
    cli.convert_main(["--generator", str(rar_fixture_dir / "generator.bin"), "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "config.json").is_file()


# ---- evaluate (more in test_metrics.py) ----


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
    code, _, err = evaluate(samples, reference, "--random_inception_weights", "--output_json", str(tmp_path))
    assert_one_line_error(code, err, f"--output_json {tmp_path} is a folder")

    # Without weights: the message says where to put them for offline use (torch.hub's checkpoint folder).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    code, _, err = evaluate(samples, reference)
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert_one_line_error(code, err, "no FID Inception weights", "pt_inception-2015-12-05-6726825d.pth", str(folder))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, _, err = evaluate(samples, reference, "--download_inception_weights")
    assert_one_line_error(code, err, "could not download the FID Inception weights", "offline?", str(folder))


def test_corrupted_pth_is_loaded_weights_only(tmp_path):
    """A pickle that would run code is refused by the weights-only loader, and reported naming the file."""
    from rar_hf.metrics.inception import FIDInceptionV3

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"fc.weight": Payload()}, tmp_path / "planted.pth")
    with pytest.raises(ValueError, match="planted.pth is not a readable FID Inception weights file.*weights-only loader refused"):
        FIDInceptionV3.from_pretrained(tmp_path / "planted.pth")
    assert not (tmp_path / "ran").exists()


def test_traceback_on_request(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAR_HF_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["convert", "--generator", str(tmp_path / "nope.bin"), "--output_dir", str(tmp_path / "out")])


def test_digits_module_command_refuses_bad_paths_and_sizes(tmp_path, capsys):
    from rar_hf.arguments import command_parser, run_script
    from rar_hf.data import digits

    afile = tmp_path / "afile"
    afile.write_text("mine")
    parser = command_parser(digits, prog=digits.PROG)
    with pytest.raises(SystemExit) as exit:
        run_script(digits.main, parser.parse_args(["--output_dir", str(afile)]), digits.PROG)
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"python -m rar_hf.data.digits: error: --output_dir {afile} is a file, expected a folder\n"
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--output_dir", str(tmp_path), "--image_size", "0"])
    assert exit.value.code == 2 and "--image_size: expected a positive integer" in capsys.readouterr().err
