"""Fine-tuning a pretrained RAR to another class set (in full and as a LoRA adapter through PEFT): rar_hf.finetuning,
the fine-tuning paths of examples/train_rar.py (in-process) and loading what they write (rar_hf.run_folder)."""

import gc
import importlib.util
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.finetuning import adapt_classes, check_lora_targets, load_adapter, match_classes
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
from rar_hf.pipeline_rar import RARPipeline
from rar_hf.training_utils import UserInputError

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, codebook_size=16,
            num_classes=4, image_seq_len=16, dropout=0.1, attention_dropout=0.0)  # fmt: skip
BASE_NAMES = {0: "apple", 1: "bird, birdie", 2: "cat", 3: "dog"}
NEW_NAMES = ["Cat", "eel", "birdie"]  # case, a new class, a synonym
FIRST_CLASS = TINY["codebook_size"] + 1


@pytest.fixture(scope="module")
def train_rar():
    spec = importlib.util.spec_from_file_location("train_rar", REPO / "examples" / "train_rar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_vqvae(seed=0):
    torch.manual_seed(seed)  # 8-px images, 4x4 tokens of 16 codes
    return MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return RARForImageGeneration(RARConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A "pretrained" pipeline of four named classes (random weights: every row differs) and its VQ model."""
    folder = tmp_path_factory.mktemp("base") / "pipe"
    RARPipeline(transformer=tiny_model(), vqvae=tiny_vqvae(), id2label=BASE_NAMES).save_pretrained(folder)
    return folder


def write_tokens(path: Path, names, rows=192, seed=0, label_feature=None):
    """Pre-tokenised rows whose tokens depend on the class, with a ClassLabel of `names`."""
    rng = np.random.default_rng(seed)
    data = {"tokens": [], "label": []}
    for _ in range(rows):
        label = int(rng.integers(0, len(names)))
        data["tokens"].append([(label * 5 + p) % 16 if rng.random() > 0.1 else int(rng.integers(0, 16)) for p in range(16)])
        data["label"].append(label)
    label_feature = label_feature or datasets.ClassLabel(names=list(names))
    features = datasets.Features({"tokens": datasets.List(datasets.Value("int32")), "label": label_feature})
    if not isinstance(label_feature, datasets.ClassLabel) and label_feature.dtype == "string":
        data["label"] = [names[i] for i in data["label"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def new_data(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("new") / "train.parquet", NEW_NAMES)


def arguments(data, output_dir, *extra):
    return [str(a) for a in (
        "--pretokenized_dataset", data, "--train_batch_size", 16, "--learning_rate", "3e-3", "--lr_warmup_steps", 2,
        "--output_dir", output_dir, "--report_to", "none", "--seed", 7, *extra,
    )]  # fmt: skip


def run(train_rar, *argv):
    train_rar.main(train_rar.parse_args(arguments(*argv)))


def refusal(train_rar, *argv) -> str:
    with pytest.raises(UserInputError) as caught:
        run(train_rar, *argv)
    message = str(caught.value)
    del caught
    gc.collect()  # the failed run's frames hold its lock on the output folder
    assert "\n" not in message, message
    return message


def embedding(model):
    return model.get_input_embeddings().weight.detach()


# ---- the class set ----


def test_classes_match_by_name_case_and_synonym_and_never_by_an_ambiguous_name():
    old = {0: "apple", 1: "bird, birdie", 2: "cat", 3: "crane", 4: "crane, derrick"}
    assert match_classes(old, ["CAT", "Birdie", "fish", "bird, birdie", "crane", "derrick", "crane, derrick"]) == [2, 1, None, 1, None, 4, 4]
    # The digits: a dataset's "5" keeps the row of the shipped model's "5, five".
    assert match_classes({5: "5, five", 6: "6, six"}, ["5", "six", "7"]) == [5, 6, None]


@pytest.mark.parametrize("init", ["null", "mean", "random"])
def test_adapting_keeps_the_codebook_matched_and_null_rows_and_initialises_new_ones(init):
    model = tiny_model()
    old = embedding(model).clone()
    old_classes, old_null = old[FIRST_CLASS : FIRST_CLASS + 4], old[model.config.null_class_id]
    spread = float((old_classes - old_classes.mean(0)).std())
    adapt_classes(model, NEW_NAMES, match_classes(BASE_NAMES, NEW_NAMES), init=init, seed=3)
    new = embedding(model)
    config = model.config
    assert (config.num_classes, config.null_class_id, new.shape[0]) == (3, FIRST_CLASS + 3, FIRST_CLASS + 4)
    assert config.id2label == {0: "Cat", 1: "eel", 2: "birdie"}
    assert torch.equal(new[:FIRST_CLASS], old[:FIRST_CLASS])  # the codebook and the mask token
    assert torch.equal(new[FIRST_CLASS + 0], old[FIRST_CLASS + 2]) and torch.equal(new[FIRST_CLASS + 2], old[FIRST_CLASS + 1])
    assert torch.equal(new[config.null_class_id], old_null)
    fresh = new[FIRST_CLASS + 1]
    if init == "random":
        assert float(fresh.std()) == pytest.approx(config.initializer_range, rel=0.5)
    else:
        start = old_null if init == "null" else old_classes.mean(0)
        assert float((fresh - start).std()) == pytest.approx(spread, rel=0.3)  # noise of the old classes' spread around its start
    # The resized model runs the new class ids and the null class, and trains its embedding.
    ids = torch.tensor([[FIRST_CLASS + 1, *range(16)], [config.null_class_id, *range(16)]])
    assert model(input_ids=ids, use_cache=False).logits.shape == (2, 17, 16)
    assert model.get_input_embeddings().weight.requires_grad


# ---- full fine-tuning ----


def test_fine_tuning_a_pipeline_to_new_classes_writes_a_pipeline_of_them(train_rar, base, new_data, tmp_path):
    # Learning rate 0: the final weights are the adapted pretrained model, to compare row by row.
    out = tmp_path / "run"
    run(train_rar, new_data, out, "--pretrained_model_name_or_path", base, "--max_train_steps", 2,
        "--learning_rate", 0, "--lr_scheduler", "constant", "--checkpointing_steps", 2)  # fmt: skip
    pipe = RARPipeline.from_pretrained(out)
    assert pipe.id2label == {0: "Cat", 1: "eel", 2: "birdie"} and pipe.transformer.config.num_classes == 3
    pretrained = RARPipeline.from_pretrained(base)
    old, new = embedding(pretrained.transformer), embedding(pipe.transformer)
    assert torch.equal(new[:FIRST_CLASS], old[:FIRST_CLASS])
    assert torch.equal(new[FIRST_CLASS], old[FIRST_CLASS + 2]) and torch.equal(new[FIRST_CLASS + 2], old[FIRST_CLASS + 1])
    assert torch.equal(new[-1], old[-1])  # the null class
    for name, value in pretrained.transformer.state_dict().items():  # every other weight is the pretrained one
        if "embed_tokens" not in name:
            assert torch.equal(value, pipe.transformer.state_dict()[name]), name
    # The VQ model is the pipeline's own, recorded by the run; what the rows came from is recorded too.
    from rar_hf.data import tokenizer_fingerprint

    assert tokenizer_fingerprint(pipe.vqvae) == tokenizer_fingerprint(pretrained.vqvae)
    assert tokenizer_fingerprint(MaskGITVQModel.from_pretrained(out / "vqvae")) == tokenizer_fingerprint(pretrained.vqvae)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["pretrained"]["source"] == str(base.resolve()) and summary["pretrained"]["class_sources"] == [2, None, 1]
    assert summary["adapter"] is None


def test_fine_tuning_learns_and_resumes_from_the_same_base_only(train_rar, base, new_data, tmp_path):
    out = tmp_path / "run"
    common = ["--pretrained_model", base / "transformer", "--max_train_steps", 6, "--checkpointing_steps", 3, "--logging_steps", 1]
    run(train_rar, new_data, out, *common)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    # The transformer folder of a pipeline brings the pipeline's class names and VQ model along.
    assert RARPipeline.from_pretrained(out).id2label == {0: "Cat", 1: "eel", 2: "birdie"}
    shutil.rmtree(out / "checkpoint-6")
    before = sorted(p.name for p in out.iterdir())
    other = tmp_path / "other"
    RARPipeline(transformer=tiny_model(seed=1), vqvae=tiny_vqvae(), id2label=BASE_NAMES).save_pretrained(other)
    line = refusal(train_rar, new_data, out, *common, "--pretrained_model", other, "--resume_from_checkpoint", "latest")
    assert line == (f"--pretrained_model {other.resolve()} is not the model {out / 'checkpoint-3'}'s run was fine-tuned from "
                    f"({(base / 'transformer').resolve()}, other weights): pass that one to resume it.")  # fmt: skip
    line = refusal(train_rar, new_data, out, "--max_train_steps", 6, "--checkpointing_steps", 3, "--logging_steps", 1,
                   "--vqvae", base / "vqvae", "--resume_from_checkpoint", "latest")  # fmt: skip
    assert line.endswith(f"is from a run fine-tuned from {(base / 'transformer').resolve()}: pass --pretrained_model {(base / 'transformer').resolve()} to resume it.")
    assert sorted(p.name for p in out.iterdir()) == before


def test_unreadable_labels_and_unknown_models_are_one_line_before_anything_is_written(train_rar, base, tmp_path):
    strings = write_tokens(tmp_path / "strings" / "train.parquet", ["cat", "dog"], label_feature=datasets.Value("string"))
    line = refusal(train_rar, strings, tmp_path / "run", "--pretrained_model", base, "--max_train_steps", 2)
    assert line.startswith(f"--pretokenized_dataset {strings}: the label column 'label' holds string values, not class ids")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    line = refusal(train_rar, strings, tmp_path / "run", "--pretrained_model", base / "vqvae", "--max_train_steps", 2)
    assert line == (f"--pretrained_model {base / 'vqvae'} is a VQ model folder (MaskGITVQModel): pass a RARPipeline or RAR "
                    "transformer folder, a training run or checkpoint, or a Hub id.")  # fmt: skip
    line = refusal(train_rar, strings, tmp_path / "run", "--pretrained_model", "nobody/no-such-rar", "--max_train_steps", 2)
    assert "as a Hub id it is not in the local Hugging Face cache; offline" in line


def test_a_vq_model_other_than_the_pretrained_models_is_refused(train_rar, base, new_data, tmp_path):
    tiny_vqvae(seed=1).save_pretrained(tmp_path / "vq")
    line = refusal(train_rar, new_data, tmp_path / "run", "--pretrained_model", base, "--vqvae", tmp_path / "vq", "--max_train_steps", 2)
    assert line == (f"--vqvae {tmp_path / 'vq'} is not the VQ model of --pretrained_model {base}, whose tokens it learned: "
                    "leave --vqvae out to use that one.")  # fmt: skip


# ---- LoRA ----

LORA = ["--lora_rank", 4, "--lora_alpha", 8, "--train_batch_size", 32, "--max_train_steps", 8, "--logging_steps", 3,
        "--checkpointing_steps", 4, "--use_ema", "--ema_decay", 0.9]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(train_rar, base, new_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    run(train_rar, new_data, out, "--pretrained_model", base, *LORA)
    return out


def test_a_lora_run_saves_the_adapter_and_the_class_rows_only(lora_run, base):
    assert not (lora_run / "transformer").exists() and not (lora_run / "model_index.json").exists()
    for folder in (lora_run, lora_run / "checkpoint-4"):
        weights = load_file(folder / "adapter_model.safetensors")
        assert not (folder / "model.safetensors").exists()
        assert all("lora_A" in key or "lora_B" in key for key in weights if "trainable_tokens" not in key)
        # The class rows (3) and the null row, whole; the codebook rows are the base's.
        assert weights["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (4, 32)
        assert sum(v.numel() for v in weights.values()) < 0.25 * sum(p.numel() for p in tiny_model().parameters())
    record = json.loads((lora_run / "rar_adapter.json").read_text())
    assert record["base_model"] == str(base.resolve()) and record["id2label"] == {"0": "Cat", "1": "eel", "2": "birdie"}
    assert record["class_sources"] == [2, None, 1] and record["vqvae"] == "vqvae"
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["trainable_token_indices"] == {"embed_tokens": [17, 18, 19, 20]}
    assert sorted(config["target_modules"]) == sorted(["qkv_proj", "o_proj", "fc1", "fc2", "adaln_modulation", "final_adaln_modulation"])


def test_a_lora_adapter_loads_into_the_base_pipeline_merged_or_not(lora_run, base):
    from peft import PeftModel

    from rar_hf.run_folder import load_lora_pipeline

    # By hand, as the README shows: the base pipeline's transformer, the adapter (checked against its base), merged.
    pipe = RARPipeline.from_pretrained(base)
    adapted = load_adapter(pipe.transformer, lora_run)
    assert isinstance(adapted, PeftModel)
    ids = torch.tensor([[FIRST_CLASS + 1, *range(16)], [FIRST_CLASS + 3, *range(16)]])
    with torch.no_grad():
        unmerged = adapted.eval()(input_ids=ids, use_cache=False).logits
        merged_model = adapted.merge_and_unload()
        merged = merged_model(input_ids=ids, use_cache=False).logits
    assert type(merged_model) is RARForImageGeneration and type(merged_model.model.layers[0].mlp.fc1) is torch.nn.Linear
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # The adapter changed the model: not the base's logits.
    base_model = RARPipeline.from_pretrained(base).transformer.eval()
    assert not torch.allclose(base_model(input_ids=torch.tensor([[FIRST_CLASS + 2, *range(16)]]), use_cache=False).logits, merged[:1], atol=1e-3)
    # The helper: class names, the run's VQ model, the same images merged (fast paths on) and unmerged (off).
    fast, slow = load_lora_pipeline(lora_run), load_lora_pipeline(lora_run, merge=False)
    assert fast.id2label == slow.id2label == {0: "Cat", 1: "eel", 2: "birdie"}
    assert type(slow.transformer.model.layers[0].mlp.fc1).__module__.startswith("peft")
    for pipeline in (fast, slow):
        pipeline.set_progress_bar_config(disable=True)
    images = [p(class_labels=["eel", "cat"], generator=torch.Generator().manual_seed(0), output_type="latent").images for p in (fast, slow)]
    assert torch.equal(images[0], images[1])


def test_rar_hf_generate_samples_a_lora_run_and_its_checkpoints(lora_run, tmp_path, capsys):
    from rar_hf import cli

    for model, said in ((lora_run, f"model: {lora_run} (LoRA adapter, final, step 8, EMA weights, on "),
                        (lora_run / "checkpoint-4", f"model: {lora_run / 'checkpoint-4'} (step 4, EMA weights)")):  # fmt: skip
        capsys.readouterr()
        cli.main(["generate", "--model", str(model), "--class_labels", "eel", "--num_images_per_label", "1",
                  "--output_path", str(tmp_path / "grid.png")])  # fmt: skip
        assert said in capsys.readouterr().out


def test_an_adapter_refuses_another_base(lora_run, base, tmp_path):
    line = None
    with pytest.raises(UserInputError) as caught:
        load_adapter(tiny_model(seed=5), lora_run, base_name="the other model")
    line = str(caught.value)
    assert line == (f"{lora_run} was trained on {base.resolve()} (weights sha256 "
                    f"{json.loads((lora_run / 'rar_adapter.json').read_text())['base_weights_sha256'][:12]}...), and the "
                    "other model holds other weights of the same shapes: load it onto the base it was trained on")  # fmt: skip
    with pytest.raises(UserInputError, match=r"was trained on .* \(hidden_size=32\), not on a wider one \(hidden_size=64\)"):
        load_adapter(tiny_model(hidden_size=64), lora_run, base_name="a wider one")
    from rar_hf.run_folder import load_lora_pipeline

    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    pipe = load_lora_pipeline(lora_run, base=moved)  # the same weights elsewhere are the same base
    assert pipe.transformer.config.num_classes == 3


def test_lora_resume_reproduces_the_uninterrupted_run_bit_for_bit(train_rar, lora_run, base, new_data, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copytree(lora_run / "checkpoint-4", folder / "checkpoint-4")
    shutil.copytree(lora_run / "vqvae", folder / "vqvae")
    lines = [line for line in (lora_run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    run(train_rar, new_data, folder, "--pretrained_model", base, *LORA, "--resume_from_checkpoint", "latest")
    for name in ("adapter_model.safetensors", "ema.safetensors", "loss_window.safetensors"):
        first, second = load_file(lora_run / "checkpoint-8" / name), load_file(folder / "checkpoint-8" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
    first, second = (torch.load(d / "checkpoint-8" / "optimizer.bin", weights_only=True)["state"] for d in (lora_run, folder))
    assert all(torch.equal(v, second[i][k]) for i in first for k, v in first[i].items())
    final = load_file(lora_run / "adapter_model.safetensors")
    assert all(torch.equal(v, final[k]) for k, v in load_file(folder / "adapter_model.safetensors").items())

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    assert losses(folder) == losses(lora_run)


def test_lora_mistakes_are_one_line_and_overwrite_nothing(train_rar, lora_run, base, new_data, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(lora_run, folder)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    line = refusal(train_rar, new_data, folder, "--pretrained_model", base, *LORA, "--lora_target_modules", "qkv", "fc1",
                   "--overwrite_output_dir")  # fmt: skip
    assert line == ("--lora_target_modules: qkv matches no linear layer of RAR; its linear layers are qkv_proj, o_proj, fc1, fc2, "
                    "adaln_modulation, final_adaln_modulation, lm_head.")  # fmt: skip
    changed = [*LORA, "--lora_rank", 8, "--resume_from_checkpoint", "latest"]
    line = refusal(train_rar, new_data, folder, "--pretrained_model", base, *changed, "--allow_schedule_change")
    assert line == (f"resuming {folder / 'checkpoint-8'} would change what its weights are (--lora_rank 4 -> 8): resume "
                    "with the run's settings, or start a new run.")  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit):
        train_rar.parse_args(arguments(new_data, folder, "--lora_rank", 4))
    with pytest.raises(SystemExit):
        train_rar.parse_args(arguments(new_data, folder, "--pretrained_model", base, "--lora_alpha", 4))
    with pytest.raises(SystemExit):  # the architecture is the pretrained model's
        train_rar.parse_args(arguments(new_data, folder, "--pretrained_model", base, "--model_config", "rar-l"))


def test_fine_tuning_continues_from_a_lora_run(train_rar, lora_run, new_data, tmp_path):
    # A LoRA run is a model to start from too: its base with the adapter merged (and the classes it adapted to).
    out = tmp_path / "run"
    run(train_rar, new_data, out, "--pretrained_model", lora_run, "--max_train_steps", 1, "--learning_rate", 0,
        "--lr_scheduler", "constant", "--lr_warmup_steps", 0, "--checkpointing_steps", 10)  # fmt: skip
    from rar_hf.run_folder import load_lora_pipeline

    expected = load_lora_pipeline(lora_run).transformer.state_dict()
    trained = RARPipeline.from_pretrained(out).transformer.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in expected.items())
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["pretrained"]["class_sources"] == [0, 1, 2]  # the same names


def test_lora_targets_must_name_linear_layers_of_rar():
    model = tiny_model()
    check_lora_targets(model, ["qkv_proj", "adaln_modulation", "lm_head"])
    check_lora_targets(model, "all-linear")
    with pytest.raises(ValueError, match="^qkv, mlp match no linear layer of RAR; its linear layers are qkv_proj, "):
        check_lora_targets(model, ["qkv", "mlp", "fc1"])  # mlp is a module, but not a linear layer


def test_the_readmes_adapter_snippets_run(lora_run, base, tmp_path):
    import re

    text = (REPO / "README.md").read_text()
    section = text.split("## Fine-tune a pretrained model to your classes\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        code = (block.replace("outputs/my-lora-merged", str(tmp_path / "merged")).replace("outputs/my-lora", str(lora_run))
                .replace("src/rar_hf/pretrained/tiny-digits", str(base)).replace('["cat", "dog"]', '["cat", "eel"]'))  # fmt: skip
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)
        assert namespace["pipe"].id2label == {0: "Cat", 1: "eel", 2: "birdie"}
    assert RARPipeline.from_pretrained(tmp_path / "merged").id2label == {0: "Cat", 1: "eel", 2: "birdie"}
