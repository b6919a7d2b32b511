"""Model cards on RARPipeline.save_pretrained / push_to_hub, the user's README kept, no build-machine paths saved."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.commands.generate import DEFAULT_MODEL
from rar_hf.convert import main as convert
from rar_hf.model_card import GENERATED_MARKER
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
from rar_hf.pipeline_rar import RARPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_pipeline():
    config = RARConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       codebook_size=16, num_classes=3, image_seq_len=16)
    vqvae = MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8)
    return RARPipeline(transformer=RARForImageGeneration(config), vqvae=vqvae)


def test_save_pretrained_writes_a_card_and_no_local_paths(tmp_path):
    # Loaded from a folder (as every fine-tuning or re-saving does), then saved elsewhere.
    source = tmp_path / "build-machine" / "outputs" / "tiny-digits"
    shutil.copytree(DEFAULT_MODEL, source)
    RARPipeline.from_pretrained(source).save_pretrained(tmp_path / "saved")
    for config_path in (tmp_path / "saved").rglob("*.json"):
        text = config_path.read_text()
        assert "_name_or_path" not in json.loads(text) and "build-machine" not in text, config_path
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "diffusers"
    assert {"rar", "rar-hf", "class-conditional"} <= set(card.data.tags)
    assert GENERATED_MARKER in card.text and "| classes | 10 |" in card.text


def test_shipped_configs_hold_no_build_paths():
    for config_path in DEFAULT_MODEL.rglob("*.json"):
        config = json.loads(config_path.read_text())
        assert "_name_or_path" not in config, config_path
        assert not any(isinstance(v, str) and ("outputs/" in v or v.startswith("/")) for v in config.values()), config_path


def test_push_to_hub_uploads_our_card(tiny_pipeline, tmp_path, monkeypatch):
    calls = []

    def fake_create_repo(repo_id, exist_ok=False, private=None, token=None, **kwargs):
        calls.append(("create_repo", repo_id, private))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_upload_folder(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False):
        calls.append(("upload", repo_id, (Path(working_dir) / "README.md").read_text()))

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(RARPipeline, "_upload_folder", fake_upload_folder)
    tiny_pipeline.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="org/tiny-rar", private=True)
    assert calls[0] == ("create_repo", "org/tiny-rar", True)
    name, repo_id, readme = calls[1]
    assert (name, repo_id) == ("upload", "org/tiny-rar")
    # Ours, not diffusers' generic "This is the model card of a diffusers pipeline...".
    assert 'RARPipeline.from_pretrained("org/tiny-rar")' in readme and "library_name: diffusers" in readme


def test_a_users_readme_is_kept(tiny_pipeline, tmp_path, rar_fixture_dir, vqgan_fixture_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("# My RAR notes\n\nDo not lose this.\n")
    convert(["--generator", str(rar_fixture_dir / "generator.bin"), "--tokenizer",
             str(vqgan_fixture_dir / "tokenizer.bin"), "--output_dir", str(folder)])  # fmt: skip
    card = ModelCard.load(folder / "README.md")
    assert "# My RAR notes" in card.text and "Do not lose this." in card.text and GENERATED_MARKER not in card.text
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0" and "rar-hf" in card.data.tags
    # A card that rar-hf wrote is ours to rewrite: saving another model replaces it.
    tiny_pipeline.save_pretrained(tmp_path / "ours")
    tiny_pipeline.save_pretrained(tmp_path / "ours")
    assert "| classes | 3 |" in (tmp_path / "ours" / "README.md").read_text()


def test_the_training_card_states_the_annealing_that_ran():
    from rar_hf.model_card import describe_annealing

    assert describe_annealing(10, 15, 20, "raster") == "r = 1 until step 10, then linearly to 0 at step 15 (final order: raster)"
    # A schedule that starts at or after the run's end is not promised: r stayed 1.
    assert describe_annealing(20, 20, 20, "raster").startswith("r = 1 throughout (random orders only")
    assert describe_annealing(0, 0, 20, "raster") == "r = 0 throughout (raster order only)"
    assert describe_annealing(5, 5, 20, "spiral_in") == "r = 1 until step 5, then 0 (spiral_in order)"
