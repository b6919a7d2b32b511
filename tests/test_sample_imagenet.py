"""`rar-hf sample` / examples/sample_imagenet.py: the ADM npz, settings, fingerprinted resume, and per-image seeds
independent of batching. In-process, except the 2-process launch of the example script."""

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import torchrun

from rar_hf import RARConfig, RARForImageGeneration, cli
from rar_hf.arguments import command_parser
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
from rar_hf.pipeline_rar import RARPipeline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "sample_imagenet.py"
NUM_CLASSES, PER_CLASS = 3, 2


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = RARConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       codebook_size=16, num_classes=NUM_CLASSES, image_seq_len=16, dropout=0.0, attention_dropout=0.0,
                       sampling_defaults=dict(guidance_scale=3.0, guidance_scale_pow=1.0, temperature=1.0))
    transformer = RARForImageGeneration(config).eval()
    with torch.no_grad():  # adaLN-zero makes a fresh model ignore its input: randomise so tokens depend on it
        for parameter in transformer.parameters():
            parameter.normal_(0, 0.3)
    vqvae = MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8)
    path = tmp_path_factory.mktemp("tiny-rar-pipeline")
    RARPipeline(transformer=transformer, vqvae=vqvae.eval()).save_pretrained(path)
    return path


def run_sampler(model_dir, output_dir, *extra, capsys=None):
    """`rar-hf sample` in this process; returns its stdout (with `capsys`)."""
    argv = ["sample", "--model", str(model_dir), "--output_dir", str(output_dir),
            "--num_images_per_class", str(PER_CLASS), "--seed", "3", *map(str, extra)]  # fmt: skip
    cli.main(argv)
    return capsys.readouterr().out if capsys is not None else None


def launch_two_processes(model_dir, output_dir, *extra):
    """The example script under a 2-process launch, as `accelerate launch` runs it on CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["ACCELERATE_USE_CPU"] = "true"
    command = [*torchrun(2), str(SCRIPT), "--model", str(model_dir), "--output_dir", str(output_dir),
               "--num_images_per_class", str(PER_CLASS), "--seed", "3", *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read_images(output_dir):
    return {path.name: np.asarray(Image.open(path)) for path in sorted((output_dir / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def batch4_run(pipeline_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("samples-b4")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run_sampler(pipeline_dir, output_dir, "--batch_size", "4")
    return output_dir, stdout.getvalue()


def test_npz_and_settings(batch4_run, pipeline_dir):
    output_dir, stdout = batch4_run
    assert "0 of 6 images already exist, generating 6" in stdout
    names = sorted(p.name for p in (output_dir / "images").glob("*.png"))
    assert names == [f"{c:04d}_{i:03d}.png" for c in range(NUM_CLASSES) for i in range(PER_CLASS)]
    with np.load(output_dir / "samples.npz") as npz:
        assert list(npz.keys()) == ["arr_0"]
        samples = npz["arr_0"]
    assert samples.shape == (NUM_CLASSES * PER_CLASS, 8, 8, 3) and samples.dtype == np.uint8
    images = read_images(output_dir)
    for k, name in enumerate(names):  # sorted by class then index
        np.testing.assert_array_equal(samples[k], images[name])
    assert len({samples[k].tobytes() for k in range(len(samples))}) == len(samples), "seeds must differ per image"

    settings = json.loads((output_dir / "sampling_settings.json").read_text())
    assert settings["model"] == str(pipeline_dir)
    assert (settings["guidance_scale"], settings["guidance_scale_pow"], settings["temperature"]) == (3.0, 1.0, 1.0)
    assert settings["seed"] == 3 and settings["num_images"] == 6 and settings["num_images_per_class"] == PER_CLASS
    assert settings["num_classes"] == NUM_CLASSES


def test_resume_regenerates_only_missing(batch4_run, pipeline_dir, capsys):
    output_dir, _ = batch4_run
    before = read_images(output_dir)
    paths = sorted((output_dir / "images").glob("*.png"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in paths}
    victim = output_dir / "images" / "0001_001.png"
    victim.unlink()
    stdout = run_sampler(pipeline_dir, output_dir, "--batch_size", "4", capsys=capsys)
    assert "5 of 6 images already exist, generating 1" in stdout
    for path in paths:
        if path != victim:
            assert path.stat().st_mtime_ns == mtimes[path.name], f"{path.name} was rewritten"
    # Regenerated alone (a batch of one instead of four) from its own seed: the same image.
    assert np.abs(np.asarray(Image.open(victim), dtype=int) - before[victim.name].astype(int)).max() <= 1


def test_images_do_not_depend_on_batch_size_or_process_count(batch4_run, pipeline_dir, tmp_path):
    output_dir, _ = batch4_run
    stdout = launch_two_processes(pipeline_dir, tmp_path, "--batch_size", "1")
    assert "process 1/2: 0 of 3 images already exist" in stdout
    assert json.loads((tmp_path / "sampling_settings.json").read_text())["num_processes"] == 2
    batch4, batch1 = read_images(output_dir), read_images(tmp_path)
    assert batch4.keys() == batch1.keys()
    for name in batch4:
        # Same tokens; the VQ decoder's float rounding may differ by one level between batch shapes.
        assert np.abs(batch4[name].astype(int) - batch1[name].astype(int)).max() <= 1, name


def test_class_subset(batch4_run, pipeline_dir, tmp_path):
    run_sampler(pipeline_dir, tmp_path / "subset", "--class_labels", "2", "--batch_size", "2")
    subset, full = read_images(tmp_path / "subset"), read_images(batch4_run[0])
    assert sorted(subset) == ["0002_000.png", "0002_001.png"]
    for name, image in subset.items():  # the same images as in the full run
        assert np.abs(image.astype(int) - full[name].astype(int)).max() <= 1, name
    settings = json.loads((tmp_path / "subset" / "sampling_settings.json").read_text())
    assert settings["class_labels"] == [2] and settings["num_images"] == PER_CLASS
    with np.load(tmp_path / "subset" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (PER_CLASS, 8, 8, 3)


def _snapshot(output_dir):
    return {p.relative_to(output_dir).as_posix(): p.stat().st_mtime_ns for p in sorted(output_dir.rglob("*"))}


def test_rerun_with_other_settings_is_refused_naming_them(batch4_run, pipeline_dir, capsys):
    output_dir, _ = batch4_run
    # Images do not depend on the batch size: another batch size is the same run, resumed.
    assert "6 of 6 images already exist, generating 0" in run_sampler(pipeline_dir, output_dir, "--batch_size", "3", capsys=capsys)
    before = _snapshot(output_dir)
    with pytest.raises(SystemExit) as exit:
        run_sampler(pipeline_dir, output_dir, "--guidance_scale", "2.0", "--temperature", "0.9", "--class_labels", "0", "1")
    stderr = capsys.readouterr().err
    # One error line (the loading progress bars aside), named for the command, exit status 2.
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert exit.value.code == 2 and errors == [stderr.strip().splitlines()[-1]], stderr
    assert errors[0].startswith("rar-hf sample: error: ")
    assert "guidance_scale (3.0 there, 2.0 now)" in stderr and "temperature (1.0 there, 0.9 now)" in stderr
    assert "class_labels (3 classes [0, 1, 2] there, 2 classes [0, 1] now)" in stderr
    assert "seed" not in stderr.split("refusing")[1]  # only what differs is named
    assert _snapshot(output_dir) == before, "a refused run must not touch the folder"


def test_rerun_with_other_seed_count_or_weights_is_refused(batch4_run, pipeline_dir, tmp_path):
    from rar_hf.commands import sample

    output_dir, _ = batch4_run
    before = _snapshot(output_dir)

    def run(model, *extra):
        args = ["--model", str(model), "--output_dir", str(output_dir), "--num_images_per_class", str(PER_CLASS)]
        sample.main(command_parser(sample).parse_args([*args, "--seed", "3", *extra]))

    with pytest.raises(ValueError, match=r"seed \(3 there, 4 now\)"):
        run(pipeline_dir, "--seed", "4")
    with pytest.raises(ValueError, match=r"num_images_per_class \(2 there, 3 now\)"):
        run(pipeline_dir, "--num_images_per_class", "3")
    # Same config, one weight changed: another model under the same architecture.
    pipe = RARPipeline.from_pretrained(pipeline_dir)
    with torch.no_grad():
        pipe.transformer.lm_head.weight[0, 0] += 1.0
    pipe.save_pretrained(tmp_path / "other-weights")
    with pytest.raises(ValueError, match="transformer weights differ") as error:
        run(tmp_path / "other-weights")
    assert "vqvae" not in str(error.value)
    assert _snapshot(output_dir) == before


def test_images_without_fingerprint_are_not_resumed(pipeline_dir, tmp_path):
    from rar_hf.commands import sample

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "0000_000.png")
    with pytest.raises(ValueError, match="holds sampled images but no sampling_fingerprint.json"):
        sample.main(command_parser(sample).parse_args(["--model", str(pipeline_dir), "--output_dir", str(tmp_path)]))
