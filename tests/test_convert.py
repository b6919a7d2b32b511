"""`python -m rar_hf.convert`: official checkpoints -> model / pipeline folders, errors, and the Hub upload."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.convert import main
from rar_hf.model_card import write_model_card
from rar_hf.weights import load_state_dict_file

from conftest import official_rar_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted_dir(rar_fixture_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("converted") / "rar-tiny"
    main(["--generator", str(rar_fixture_dir / "generator.bin"), "--output_dir", str(output_dir)])
    return output_dir


@pytest.fixture(scope="module")
def official_state_dict(rar_fixture_dir):
    return load_state_dict_file(rar_fixture_dir / "generator.bin")


@torch.no_grad()
def test_converted_folder_matches_official_train_logits(converted_dir, rar_fixture_dir):
    model = RARForImageGeneration.from_pretrained(converted_dir).eval()
    cases = load_file(str(rar_fixture_dir / "cases.safetensors"))
    V, _, _ = official_rar_layout(rar_fixture_dir)
    orders = cases["orders"]
    input_ids = torch.cat([(cases["class_labels"] + V + 1)[:, None], cases["tokens"].gather(1, orders)], dim=1)
    logits = model(input_ids=input_ids, orders=orders).logits
    assert (logits - cases["train_logits"]).abs().max().item() < 1e-5


def test_converted_config_is_inferred_from_shapes(converted_dir, rar_fixture_dir):
    config = json.loads((converted_dir / "config.json").read_text())
    official = json.loads((rar_fixture_dir / "config.json").read_text())
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_seq_len", "codebook_size"]
    expected = {key: official[key] for key in keys}
    expected["num_classes"] = official["condition_num_classes"]
    assert {key: config[key] for key in expected} == expected


def _save_modified(state_dict, path, edit):
    modified = dict(state_dict)
    edit(modified)
    torch.save(modified, path)
    return path


@pytest.mark.parametrize(
    "edit, listed",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "model.layers.1.mlp.fc2.bias"),
        (lambda sd: sd.__setitem__("blocks.0.attn.extra.weight", torch.zeros(3)), "blocks.0.attn.extra.weight"),
        (
            lambda sd: sd.__setitem__("blocks.1.norm2.weight", torch.zeros(7)),
            "model.layers.1.post_attention_layernorm.weight",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_bad_keys_are_listed(official_state_dict, tmp_path, edit, listed):
    path = _save_modified(official_state_dict, tmp_path / "bad.bin", edit)
    with pytest.raises(ValueError, match=listed.replace(".", r"\.")):
        main(["--generator", str(path), "--output_dir", str(tmp_path / "out")])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        main(["--generator", str(tmp_path / "nope.bin"), "--output_dir", str(tmp_path / "out")])


def test_truncated_file(rar_fixture_dir, tmp_path):
    data = (rar_fixture_dir / "generator.bin").read_bytes()
    path = tmp_path / "truncated.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        main(["--generator", str(path), "--output_dir", str(tmp_path / "out")])


def test_weights_files_are_read_by_content_and_never_run_code(official_state_dict, tmp_path):
    from safetensors.torch import save_file

    # safetensors is recognised by its header whatever the file is called; the legacy (non-zip) torch format loads.
    save_file(official_state_dict, tmp_path / "generator.bin")
    torch.save(official_state_dict, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for name in ("generator.bin", "legacy.bin"):
        loaded = load_state_dict_file(tmp_path / name)
        assert loaded.keys() == official_state_dict.keys()
        assert all(torch.equal(loaded[k], official_state_dict[k]) for k in loaded)

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"lm_head.weight": Payload()}, tmp_path / "planted.bin")
    with pytest.raises(ValueError, match="planted.bin is not a readable official RAR .* weights-only loader refused"):
        main(["--generator", str(tmp_path / "planted.bin"), "--output_dir", str(tmp_path / "out")])
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match=r"list.bin does not hold a state dict of tensors \(got list\)"):
        load_state_dict_file(tmp_path / "list.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin is not a readable weights file: the file is empty; expected a PyTorch"):
        load_state_dict_file(tmp_path / "empty.bin")
    (tmp_path / "page.bin").write_bytes(b"<html><body>404 Not Found</body></html>")
    with pytest.raises(ValueError, match=r"page.bin .*: it is a text file \(it starts with '<html><body>404 Not Found"):
        load_state_dict_file(tmp_path / "page.bin")
    assert not (tmp_path / "out").exists()


def test_tokenizer_given_as_generator(vqgan_fixture_dir, tmp_path):
    with pytest.raises(ValueError, match="Not an official RAR generator checkpoint"):
        main(["--generator", str(vqgan_fixture_dir / "tokenizer.bin"), "--output_dir", str(tmp_path / "out")])


def test_pipeline_folder_and_push_to_hub(rar_fixture_dir, vqgan_fixture_dir, tmp_path, monkeypatch):
    calls = []

    def fake_create_repo(repo_id, private=False, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private))

    def fake_upload_folder(repo_id, folder_path, commit_message=None, **kwargs):
        uploaded = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*"))
        calls.append(("upload_folder", repo_id, folder_path, uploaded))
        return f"https://huggingface.co/{repo_id}/commit/0"

    # convert imports these names from huggingface_hub when it pushes: nothing reaches the network.
    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    output_dir = tmp_path / "rar-tiny"
    main(
        [
            "--generator", str(rar_fixture_dir / "generator.bin"),
            "--tokenizer", str(vqgan_fixture_dir / "tokenizer.bin"),
            "--output_dir", str(output_dir),
            "--push_to_hub", "org/rar-tiny",
            "--private",
        ]
    )  # fmt: skip

    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "RARPipeline"
    assert index["transformer"] == ["rar_hf.modeling_rar", "RARForImageGeneration"]
    assert index["vqvae"] == ["rar_hf.modeling_maskgit_vqgan", "MaskGITVQModel"]
    _, C, _ = official_rar_layout(rar_fixture_dir)
    assert len(index["id2label"]) == C
    # ImageNet names for the 1000 ImageNet classes, the class ids as names otherwise.
    assert index["id2label"]["0"] == ("tench, Tinca tinca" if C == 1000 else "0")

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"image-generation", "autoregressive", "class-conditional", "rar"} <= set(card.data.tags)
    assert card.data.eval_results is None  # not an official size: no paper metrics
    assert 'RARPipeline.from_pretrained("org/rar-tiny")' in card.text
    assert "2411.00776" in card.text

    assert calls[0] == ("create_repo", "org/rar-tiny", True)
    name, repo_id, folder_path, uploaded = calls[1]
    assert (name, repo_id, folder_path) == ("upload_folder", "org/rar-tiny", str(output_dir))
    expected_files = {
        "README.md",
        "model_index.json",
        "pipeline_rar.py",
        "transformer/config.json",
        "transformer/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    }
    assert expected_files <= set(uploaded)


@pytest.mark.parametrize(
    "size, fid, inception_score, guidance",
    [
        ("rar-b", 1.95, 290.5, 16.0),
        ("rar-l", 1.70, 299.5, 15.5),
        ("rar-xl", 1.50, 306.9, 6.9),
        ("rar-xxl", 1.48, 326.0, 8.0),
    ],
)
def test_official_model_cards(tmp_path, size, fid, inception_score, guidance):
    path = write_model_card(tmp_path, RARConfig.from_preset(size), repo_id=f"org/{size}")
    card = ModelCard.load(path)
    assert card.data.datasets == ["ILSVRC/imagenet-1k"] and "imagenet" in card.data.tags
    assert card.data.model_name == size.upper()
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert metrics == {"fid": fid, "inception_score": inception_score}
    assert f'RARPipeline.from_pretrained("org/{size}")' in card.text
    assert f"| guidance scale | {guidance} |" in card.text
    assert "Randomized Autoregressive Visual Generation" in card.text and "Yu, Qihang" in card.text


def test_generic_model_card_records_training(tmp_path):
    config = RARConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_classes=10)
    training = {"dataset": "ylecun/mnist", "steps": 2000}
    card = ModelCard.load(write_model_card(tmp_path / "tiny-digits", config, training=training))
    assert card.data.datasets == ["ylecun/mnist"] and card.data.eval_results is None
    assert "# tiny-digits" in card.text and "- **steps**: 2000" in card.text
    assert 'RARPipeline.from_pretrained("path/to/tiny-digits")' in card.text
    # An official size trained here is not the paper's checkpoint: no paper metrics.
    trained_xl = write_model_card(tmp_path / "xl", RARConfig.from_preset("rar-xl"), training=training)
    assert ModelCard.load(trained_xl).data.eval_results is None
