"""The shipped tiny-digits pipeline: it loads offline, is deterministic, and draws digits of the asked class."""

from pathlib import Path

import numpy as np
import pytest
import torch

import rar_hf
from rar_hf import RARPipeline

SHIPPED = Path(rar_hf.__file__).parent / "pretrained" / "tiny-digits"


@pytest.fixture(scope="module")
def pipe():
    if not (SHIPPED / "model_index.json").is_file():
        pytest.fail(f"the shipped pipeline is missing from {SHIPPED}: run `make tiny-digits`")
    pipe = RARPipeline.from_pretrained(SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_pipeline_is_small_safetensors_with_a_card(pipe):
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    weights = [f.name for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    card = (SHIPPED / "README.md").read_text()
    assert "make tiny-digits" in card and "accuracy" in card
    assert pipe.get_label_ids(["seven", 3]) == [7, 3]


def test_generation_is_deterministic_for_a_seed(pipe):
    def draw(seed):
        return pipe(class_labels=[3, 8], generator=torch.Generator().manual_seed(seed), output_type="tokens").tokens

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_generated_digits_are_recognised_as_their_class(pipe):
    from sklearn.svm import SVC

    from rar_hf.data.digits import images_to_digits, split_digits

    train_x, train_y = split_digits()["train"]
    classifier = SVC(gamma=0.001).fit(train_x.reshape(len(train_x), -1), train_y)
    labels = list(range(10))
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (10, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    predicted = classifier.predict(images_to_digits(images.float()))
    correct = int((predicted == np.array(labels)).sum())
    assert correct >= 7, f"only {correct}/10 generated digits classified as their class: {predicted.tolist()}"


def test_packaging_never_replaces_the_shipped_model_unless_told(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    from rar_hf.arguments import UserError

    script = Path(__file__).resolve().parents[1] / "examples" / "tiny_digits" / "package_pipeline.py"
    spec = importlib.util.spec_from_file_location("package_pipeline", script)
    package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in SHIPPED.rglob("*"))
    with pytest.raises(UserError, match="is the shipped default model: pass --replace_shipped"):
        package.main(package.parse_args(["--pipeline", str(SHIPPED), "--output_dir", str(SHIPPED)]))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in SHIPPED.rglob("*")) == before
    # Elsewhere (make tiny-digits: outputs/tiny-digits/package) it writes; a run's folder it would delete is refused.
    package.main(package.parse_args(["--pipeline", str(SHIPPED), "--output_dir", str(tmp_path / "package")]))
    assert RARPipeline.from_pretrained(tmp_path / "package").get_label_ids(["seven"]) == [7]
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "package", run)
    (run / "checkpoint-5").mkdir()
    with pytest.raises(UserError, match="is a training run's folder"):
        package.main(package.parse_args(["--pipeline", str(SHIPPED), "--output_dir", str(run)]))
    # Told to (make tiny-digits INSTALL=1), it replaces the shipped folder: here a stand-in for it.
    stand_in = tmp_path / "shipped"
    shutil.copytree(SHIPPED, stand_in)
    monkeypatch.setattr(package, "SHIPPED", stand_in.resolve())
    with pytest.raises(UserError, match="--replace_shipped"):
        package.main(package.parse_args(["--pipeline", str(tmp_path / "package"), "--output_dir", str(stand_in)]))
    package.main(package.parse_args(["--pipeline", str(tmp_path / "package"), "--output_dir", str(stand_in), "--replace_shipped"]))
    assert (stand_in / "model_index.json").is_file()
