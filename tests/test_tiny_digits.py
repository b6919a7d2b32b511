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
