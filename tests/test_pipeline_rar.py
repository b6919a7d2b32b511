"""RARPipeline: sampling, reproducibility, outputs, labels, save/load, generic loading and the example script."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.convert import main as convert_main
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
from rar_hf.generation_rar import RARSamplingLogitsProcessor
from rar_hf.pipeline_rar import RARPipeline, RARPipelineOutput

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipeline(num_classes=3, id2label=None, seed=0):
    """16 tokens on a 4x4 grid, codebook 16, decoded to 8x8 images."""
    torch.manual_seed(seed)
    config = RARConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        codebook_size=16,
        num_classes=num_classes,
        image_seq_len=16,
        dropout=0.0,
        attention_dropout=0.0,
        sampling_defaults=dict(guidance_scale=3.0, guidance_scale_pow=1.0, temperature=1.0),
    )
    transformer = RARForImageGeneration(config).eval()
    with torch.no_grad():  # adaLN-zero makes a fresh model ignore its input: randomise so tokens depend on it
        for parameter in transformer.parameters():
            parameter.normal_(0, 0.3)
    vqvae = MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=16, latent_channels=8, sample_size=8)
    pipe = RARPipeline(transformer=transformer, vqvae=vqvae.eval(), id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ outputs
@torch.no_grad()
def test_output_types_and_decoding(pipe):
    out = pipe([0, 2], generator=seeded(0), output_type="pt")
    assert isinstance(out, RARPipelineOutput)
    assert out.images.shape == (2, 3, 8, 8) and out.tokens.shape == (2, 16)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.tokens.min() >= 0 and out.tokens.max() < 16
    # The images are the decoded generated tokens.
    torch.testing.assert_close(out.images, pipe.vqvae.decode(out.tokens, latent_size=(4, 4)).sample)

    as_np = pipe([0, 2], generator=seeded(0), output_type="np").images
    torch.testing.assert_close(torch.from_numpy(as_np), out.images.permute(0, 2, 3, 1))
    as_pil = pipe([0, 2], generator=seeded(0), output_type="pil").images
    assert [image.size for image in as_pil] == [(8, 8), (8, 8)]
    for output_type in ("latent", "tokens"):  # diffusers' name for undecoded outputs, and its alias
        tokens_only = pipe([0, 2], generator=seeded(0), output_type=output_type)
        assert torch.equal(tokens_only.images, out.tokens) and torch.equal(tokens_only.tokens, out.tokens)
    images, tokens = pipe([0, 2], generator=seeded(0), output_type="pt", return_dict=False)
    assert torch.equal(images, out.images) and torch.equal(tokens, out.tokens)


def test_seeded_generator_reproduces_and_seeds_differ(pipe):
    first = pipe([0, 1], num_images_per_prompt=2, generator=seeded(0), output_type="tokens").tokens
    again = pipe([0, 1], num_images_per_prompt=2, generator=seeded(0), output_type="tokens").tokens
    other = pipe([0, 1], num_images_per_prompt=2, generator=seeded(1), output_type="tokens").tokens
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # torch's global RNG drives generator=None, so manual_seed reproduces too.
    torch.manual_seed(5)
    global_first = pipe([0], output_type="tokens").tokens
    torch.manual_seed(5)
    assert torch.equal(global_first, pipe([0], output_type="tokens").tokens)


def test_generator_list_makes_each_image_independent_of_the_batch(pipe):
    generators = [seeded(seed) for seed in (10, 11, 12, 13)]
    batch = pipe([0, 1], num_images_per_prompt=2, generator=generators, output_type="tokens").tokens
    # Images are laid out label by label, [0, 0, 1, 1]: the last two alone, with their own generators.
    alone = pipe([1], num_images_per_prompt=2, generator=[seeded(12), seeded(13)], output_type="tokens").tokens
    assert torch.equal(batch[2:], alone)
    single = pipe(0, generator=[seeded(11)], output_type="tokens").tokens
    assert torch.equal(batch[1:2], single)


def test_num_images_per_prompt_and_its_deprecated_alias(pipe):
    out = pipe([0, 1], num_images_per_prompt=2, generator=seeded(6), output_type="tokens").tokens
    assert out.shape == (4, 16)
    with pytest.warns(FutureWarning, match="num_images_per_label.*num_images_per_prompt"):
        old = pipe([0, 1], num_images_per_label=2, generator=seeded(6), output_type="tokens").tokens
    assert torch.equal(old, out)
    with pytest.raises(ValueError, match="num_images_per_prompt only"), pytest.warns(FutureWarning):
        pipe([0], num_images_per_prompt=2, num_images_per_label=2)
    with pytest.raises(TypeError, match="num_image_per_prompt"):
        pipe([0], num_image_per_prompt=2)


@pytest.mark.parametrize("options", [dict(use_cache=False), dict(cache_implementation="static")])
def test_cache_choice_does_not_change_samples(pipe, options):
    reference = pipe([0, 1], generator=seeded(3), output_type="tokens").tokens
    assert torch.equal(pipe([0, 1], generator=seeded(3), output_type="tokens", **options).tokens, reference)


@pytest.mark.parametrize(
    "options",
    [dict(orders="random"), dict(class_labels=[None, None]), dict(top_k=3, top_p=0.8, temperature=0.7)],
    ids=["random-orders", "unconditional", "top-k-top-p"],
)
def test_sampling_options_are_seeded(pipe, options):
    options = {"class_labels": [0, 1], **options}
    first = pipe(generator=seeded(4), output_type="tokens", **options).tokens
    assert first.shape == (2, 16)
    assert torch.equal(first, pipe(generator=seeded(4), output_type="tokens", **options).tokens)


def test_sampler_draws_from_the_warped_distribution():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(20000, 4).clone()
    processor = RARSamplingLogitsProcessor(seeded(0), temperature=2.0)
    drawn = processor(None, scores.clone())
    assert torch.isinf(drawn).sum(1).eq(3).all() and drawn.max(1).values.eq(0).all()
    frequencies = torch.bincount(drawn.argmax(1), minlength=4) / 20000
    torch.testing.assert_close(frequencies, torch.softmax(scores[0] / 2.0, -1), atol=0.015, rtol=0)

    top_k = RARSamplingLogitsProcessor(seeded(0), temperature=2.0, top_k=2)(None, scores.clone()).argmax(1)
    assert set(top_k.unique().tolist()) == {2, 3}


def test_progress_bar_counts_tokens_and_can_be_disabled(capfd):
    pipe = tiny_pipeline()
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream)
    pipe([0], generator=seeded(0), output_type="tokens")
    assert "16/16" in stream.getvalue()
    # It counts kept tokens, not forward passes: speculative decoding reaches the end too.
    for method in (dict(jacobi_window=4), dict(assistant_model=pipe.transformer)):
        stream.truncate(0)
        pipe([0], generator=seeded(0), output_type="tokens", **method)
        assert "16/16" in stream.getvalue()

    pipe.set_progress_bar_config(disable=True)
    capfd.readouterr()
    pipe([0], generator=seeded(0), output_type="tokens")
    captured = capfd.readouterr()
    assert "16/16" not in captured.err + captured.out


def test_to_dtype(pipe):
    pipe64 = tiny_pipeline().to("cpu", torch.float64)
    out = pipe64([0], generator=seeded(0), output_type="pt")
    assert pipe64.transformer.dtype == pipe64.vqvae.dtype == torch.float64
    assert out.images.dtype == torch.float64 and pipe64._execution_device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[]), "empty"),
        (dict(class_labels=[3]), "out of range"),
        (dict(class_labels=["nine"]), "Unknown class name"),
        (dict(class_labels=[0], output_type="latents"), "output_type"),
        (dict(class_labels=[0], num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(class_labels=[0, 1], generator=[torch.Generator()]), "generators for 2 images"),
    ],
)
def test_invalid_inputs_fail_before_sampling(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_pipeline_and_model_share_one_seeded_mechanism(pipe):
    kwargs = dict(guidance_scale=2.0, guidance_scale_pow=1.0, temperature=0.9, top_p=0.9, orders="random")
    tokens = pipe([0, 2], generator=seeded(8), output_type="tokens", **kwargs).tokens
    sequences = pipe.transformer.generate(class_labels=[0, 2], generator=seeded(8), **kwargs)
    assert torch.equal(tokens, sequences[:, 1:])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number >= 0, got nan"),
        (dict(guidance_scale=-2.0), ValueError, "guidance_scale must be a finite number >= 0"),
        (dict(guidance_scale_pow=-1.0), ValueError, "guidance_scale_pow must be a finite number >= 0"),
        (dict(temperature=0), ValueError, "temperature must be a finite number > 0, got 0"),
        (dict(top_p=2.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), ValueError, "top_k must be a finite number >= 0"),
        (dict(generator=123), TypeError, "generator must be a torch.Generator"),
        (dict(guidance_scale=1.0, guidance_schedule="cosine"), ValueError, "Unknown guidance schedule 'cosine'"),
    ],
)
def test_bad_sampling_arguments_fail_before_sampling(pipe, kwargs, error, message):
    def never(*args):
        raise AssertionError("sampling started")

    with pytest.raises(error, match=message):
        pipe([0, 1], callback_on_step_end=never, **kwargs)


def test_non_finite_logits_raise_instead_of_yielding_token_zero():
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits.*weights"):
        pipe([0, 1], generator=seeded(0), output_type="tokens")


def test_numpy_labels(pipe):
    import numpy as np

    expected = pipe([2, 0], generator=seeded(1), output_type="tokens").tokens
    assert torch.equal(pipe(np.array([2, 0]), generator=seeded(1), output_type="tokens").tokens, expected)
    assert torch.equal(pipe([np.int64(2), np.int32(0)], generator=seeded(1), output_type="tokens").tokens, expected)


def test_mismatched_codebooks_fail_at_construction(pipe):
    vqvae = MaskGITVQModel(hidden_channels=32, channel_mult=(1, 2), codebook_size=32, latent_channels=8, sample_size=8)
    with pytest.raises(ValueError, match="codebook of 16 entries but the vqvae's codebook has 32"):
        RARPipeline(transformer=pipe.transformer, vqvae=vqvae)


# ------------------------------------------------------------------------------------------------ step callback
def greedy_continuation(pipe, class_ids, tokens):
    """Teacher-forced argmax of every position given the tokens before it (raster order, no guidance)."""
    prompt = pipe.transformer.prepare_class_ids(class_ids)
    with torch.no_grad():
        logits = pipe.transformer(input_ids=torch.cat([prompt, tokens], 1)).logits
    return logits[:, :-1].argmax(-1)


def test_callback_on_step_end_sees_every_token_in_order(pipe):
    calls = []

    def callback(p, step, timestep, callback_kwargs):
        assert p is pipe and timestep == step
        calls.append((step, callback_kwargs["tokens"].clone()))
        return {}

    out = pipe([0, 2], generator=seeded(0), output_type="tokens", callback_on_step_end=callback)
    assert [step for step, _ in calls] == list(range(16))
    for step, tokens in calls:
        assert tokens.shape == (2, step + 1) and tokens.dtype == torch.long
        assert torch.equal(tokens, out.tokens[:, : step + 1])
    # The callback observes: the same generator gives the same tokens without it.
    assert torch.equal(out.tokens, pipe([0, 2], generator=seeded(0), output_type="tokens").tokens)
    # Tensor inputs as diffusers validates them ("latents" is the same tensor, diffusers' name for it); an empty list
    # gives empty callback_kwargs.
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe([0], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["images"])
    both = []
    pipe([0], generator=seeded(0), callback_on_step_end_tensor_inputs=["latents", "tokens"],
         callback_on_step_end=lambda p, step, t, kwargs: both.append(torch.equal(kwargs["latents"], kwargs["tokens"])) or {})  # fmt: skip
    assert both == [True] * 16
    seen = []
    pipe([0], generator=seeded(0), output_type="tokens", callback_on_step_end_tensor_inputs=[],
         callback_on_step_end=lambda p, step, t, kwargs: seen.append(kwargs) or {})  # fmt: skip
    assert seen == [{}] * 16


@pytest.mark.parametrize("edit", ["all-so-far", "newest"])
@pytest.mark.parametrize("cache", ["static", "dynamic", "none"])
def test_tokens_returned_by_the_callback_are_continued_from(pipe, edit, cache):
    cache_options = {"static": {}, "dynamic": dict(cache_implementation="dynamic"), "none": dict(use_cache=False)}[cache]
    at_step = 6

    def callback(p, step, timestep, callback_kwargs):
        tokens = callback_kwargs["tokens"]
        if step == at_step:
            tokens = tokens.clone()
            if edit == "newest":
                tokens[:, -1] = (tokens[:, -1] + 5) % 16
            else:  # tokens already in the KV cache change too
                tokens = (tokens + 5) % 16
            replaced.append(tokens)
        return {"tokens": tokens}

    replaced = []
    # top_k=1 without guidance: each token is the model's argmax given the tokens before it.
    options = dict(guidance_scale=1.0, top_k=1, output_type="tokens", **cache_options)
    plain = pipe([0, 1], **options).tokens
    out = pipe([0, 1], callback_on_step_end=callback, **options).tokens
    assert torch.equal(out[:, : at_step + 1], replaced[0])
    assert not torch.equal(out, plain)
    assert torch.equal(greedy_continuation(pipe, [0, 1], out)[:, at_step + 1 :], out[:, at_step + 1 :])


def test_callback_tokens_are_checked(pipe):
    def wrong_shape(p, step, timestep, callback_kwargs):
        return {"tokens": callback_kwargs["tokens"][:, :-1]}

    with pytest.raises(ValueError, match=r"shape \(2, 0\) at step 0; expected \(2, 1\)"):
        pipe([0, 1], callback_on_step_end=wrong_shape)
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        pipe([0], callback_on_step_end=lambda p, s, t, kwargs: {"tokens": kwargs["tokens"] + 16})


def test_interrupt_returns_the_tokens_so_far_and_gray_images(pipe):
    def stop_after_five(p, step, timestep, callback_kwargs):
        if step == 4:
            p._interrupt = True
        return {}

    full = pipe([0, 1], generator=seeded(2), output_type="pt")
    out = pipe([0, 1], generator=seeded(2), output_type="pt", callback_on_step_end=stop_after_five)
    assert pipe.interrupt
    assert torch.equal(out.tokens, full.tokens[:, :5])
    # 4x4 tokens of 2x2 pixels: tokens 0-4 fill the first row and one cell of the second; the rest is mid-gray.
    assert out.images.shape == (2, 3, 8, 8)
    assert torch.all(out.images[:, :, 4:] == 0.5) and torch.all(out.images[:, :, 2:4, 2:] == 0.5)
    torch.testing.assert_close(out.images, pipe.decode_partial(out.tokens, output_type="pt"))
    assert not torch.all(out.images[:, :, :2] == 0.5)
    # The next call starts afresh.
    assert pipe([0], generator=seeded(2), output_type="tokens").tokens.shape == (1, 16) and not pipe.interrupt


def test_interrupt_in_another_order_marks_missing_positions(pipe):
    def stop_after_three(p, step, timestep, callback_kwargs):
        p._interrupt = step == 2
        return {}

    out = pipe([0], generator=seeded(3), orders="random", output_type="pt", callback_on_step_end=stop_after_three)
    full = pipe([0], generator=seeded(3), orders="random", output_type="tokens").tokens
    assert out.tokens.shape == (1, 16) and int((out.tokens >= 0).sum()) == 3
    generated = out.tokens >= 0
    assert torch.equal(out.tokens[generated], full[generated])
    torch.testing.assert_close(out.images, pipe.decode_partial(out.tokens, output_type="pt"))


def test_decode_partial(pipe):
    tokens = pipe([0, 1], generator=seeded(5), output_type="tokens").tokens
    torch.testing.assert_close(
        pipe.decode_partial(tokens, output_type="pt"), pipe.vqvae.decode(tokens, latent_size=(4, 4)).sample
    )
    prefix = pipe.decode_partial(tokens[:, :8], output_type="pt")
    assert torch.all(prefix[:, :, 4:] == 0.5) and not torch.all(prefix[:, :, :4] == 0.5)
    holes = torch.cat([tokens[:, :8], torch.full((2, 8), -1)], 1)
    torch.testing.assert_close(pipe.decode_partial(holes, output_type="pt"), prefix)
    empty = pipe.decode_partial(tokens[:, :0], output_type="np")
    assert empty.shape == (2, 8, 8, 3) and (empty == 0.5).all()
    assert [image.size for image in pipe.decode_partial(tokens[:, :3])] == [(8, 8), (8, 8)]
    with pytest.raises(ValueError, match=r"n <= 16"):
        pipe.decode_partial(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ labels
@pytest.fixture(scope="module")
def imagenet_pipe():
    return tiny_pipeline(num_classes=1000)


def test_imagenet_labels(imagenet_pipe):
    pipe = imagenet_pipe
    assert pipe.id2label[0] == "tench, Tinca tinca"
    for name in ("tench", "Tinca tinca", "TENCH", " tench ", "tench, Tinca tinca"):
        assert pipe.get_label_ids(name) == [0]
    assert pipe.get_label_ids("white shark") == [2]  # one label, not one per character
    assert pipe.get_label_ids(["white shark", 207, None]) == [2, 207, None]
    with pytest.raises(ValueError, match="white shark") as error:
        pipe.get_label_ids("whte shark")
    assert "great white shark" in str(error.value)
    with pytest.raises(ValueError, match="ambiguous.*134.*517"):
        pipe.get_label_ids("crane")
    with pytest.raises(ValueError, match="out of range"):
        pipe.get_label_ids(1000)
    # One rule for the unconditional class everywhere: None, -1, "none", "unconditional" (any case).
    assert pipe.get_label_ids([None, -1, "none", "Unconditional", " NONE "]) == [None] * 5
    with pytest.raises(TypeError):
        pipe.get_label_ids(True)


def test_default_labels_for_other_class_counts(pipe):
    assert pipe.id2label == {0: "0", 1: "1", 2: "2"}
    assert pipe.get_label_ids(["2", 1]) == [2, 1]
    with pytest.raises(ValueError, match="every class id"):
        RARPipeline(pipe.transformer, pipe.vqvae, id2label={0: "a", 1: "b"})


# ------------------------------------------------------------------------------------------------ save / load
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    pipe = tiny_pipeline(id2label={0: "zero, nought", 1: "one", 2: "two"})
    folder = tmp_path_factory.mktemp("pipelines") / "tiny"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_save_load_round_trip(saved_pipeline):
    pipe, folder = saved_pipeline
    assert json.loads((folder / "model_index.json").read_text())["id2label"]["0"] == "zero, nought"
    loaded = RARPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.id2label == pipe.id2label
    assert loaded.get_label_ids(["nought", "two"]) == [0, 2]
    expected = pipe(["one"], generator=seeded(7), output_type="pt")
    actual = loaded(["one"], generator=seeded(7), output_type="pt")
    assert torch.equal(actual.tokens, expected.tokens)
    torch.testing.assert_close(actual.images, expected.images)


def test_a_config_that_disagrees_with_the_weights(saved_pipeline, tmp_path):
    """As transformers loads it: a layer the weights lack is initialised (with its warning), one they hold too many is
    dropped; weights whose shapes contradict the config are refused with one line."""
    import shutil

    _, folder = saved_pipeline
    copy = shutil.copytree(folder, tmp_path / "pipe")
    config_file = copy / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert len(RARPipeline.from_pretrained(copy).transformer.model.layers) == 3
    config_file.write_text(json.dumps({**config, "num_hidden_layers": 1}))
    assert len(RARPipeline.from_pretrained(copy).transformer.model.layers) == 1
    config_file.write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    with pytest.raises(ValueError, match=r"do not match its config: model.layers.0.mlp.fc1.bias has shape \(64,\) in the checkpoint and \(128,\)"):
        RARPipeline.from_pretrained(copy)


def test_generic_diffusion_pipeline_loading(saved_pipeline, tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dynamic_modules

    _, folder = saved_pipeline
    # diffusers looks `_class_name` up in its own namespace: the plain generic call cannot work.
    with pytest.raises(AttributeError, match="RARPipeline"):
        DiffusionPipeline.from_pretrained(folder)
    # The loader module written beside model_index.json makes the documented generic call work.
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path))  # keep ~/.cache untouched
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_rar", trust_remote_code=True)
    assert type(loaded) is RARPipeline
    assert loaded.id2label[0] == "zero, nought"


def test_example_script_writes_a_grid(saved_pipeline, tmp_path):
    _, folder = saved_pipeline
    output = tmp_path / "x.png"
    command = [sys.executable, "examples/generate.py", "--model", str(folder), "--class_labels", "0", "one"]
    command += ["--num_images_per_label", "2", "--device", "cpu", "--output_path", str(output)]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(output)
    assert "16/16" in result.stderr  # the pipeline's progress bar is shown
    with Image.open(output) as grid:
        # 2 labelled rows of 2 images, 8x8 pixels each upscaled to 64x64 cells, 4 px apart (issue 12 item 5).
        assert grid.height == 2 * (64 + 4) + 4 and grid.width > 2 * (64 + 4) + 4


# ------------------------------------------------------------------------------------------------ official layout
@pytest.fixture(scope="module")
def converted_pipeline(rar_fixture_dir, vqgan_fixture_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted") / "rar-fixture"
    convert_main(
        [
            "--generator", str(rar_fixture_dir / "generator.bin"),
            "--tokenizer", str(vqgan_fixture_dir / "tokenizer.bin"),
            "--output_dir", str(folder),
        ]
    )  # fmt: skip
    pipe = RARPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_converted_fixture_pipeline_end_to_end(converted_pipeline):
    # The fixture generator makes a square grid of tokens, which the fully convolutional tokenizer decodes.
    pipe = converted_pipeline
    config = pipe.transformer.config
    height, width = config.latent_size
    factor = pipe.vqvae.downsample_factor
    labels = ["tench" if config.num_classes == 1000 else 0, 1]
    out = pipe(labels, guidance_scale=4.0, generator=seeded(0), output_type="pt")
    assert out.images.shape == (2, 3, height * factor, width * factor)
    assert out.tokens.shape == (2, config.image_seq_len)
    assert out.images.min() >= 0 and out.images.max() <= 1
    torch.testing.assert_close(out.images, pipe.vqvae.decode(out.tokens, latent_size=(height, width)).sample)
    again = pipe(labels, guidance_scale=4.0, generator=seeded(0), output_type="tokens").tokens
    other = pipe(labels, guidance_scale=4.0, generator=seeded(1), output_type="tokens").tokens
    assert torch.equal(again, out.tokens) and not torch.equal(other, out.tokens)


def test_guidance_properties_and_a_callback_that_changes_the_guidance(pipe):
    seen = []

    def observe(p, step, timestep, callback_kwargs):
        seen.append((p.guidance_scale, p.do_classifier_free_guidance, p.num_timesteps))
        return {}

    pipe([0], generator=seeded(0), guidance_scale=2.0, callback_on_step_end=observe, output_type="latent")
    assert seen == [(2.0, True, 16)] * 16
    pipe([0], generator=seeded(0), guidance_scale=1.0, callback_on_step_end=observe, output_type="latent")
    assert seen[-1] == (1.0, False, 16)
    # diffusers' contract: a callback that sets pipe._guidance_scale guides the following tokens with it. Here from
    # token 8 on: the first 8 tokens are those of the unchanged call, and the rest those of a call at the new scale
    # continued from them (greedy, so the tokens tell the guidance used).
    def raise_at_7(p, step, timestep, callback_kwargs):
        if step == 7:
            p._guidance_scale = 6.0
        return {}

    kwargs = dict(generator=seeded(0), guidance_schedule="constant", top_k=1, output_type="latent")
    changed = pipe([0, 1], guidance_scale=1.5, callback_on_step_end=raise_at_7, **kwargs).tokens
    assert pipe.guidance_scale == 6.0
    base = pipe([0, 1], guidance_scale=1.5, **kwargs).tokens
    assert torch.equal(changed[:, :8], base[:, :8])
    ids = pipe.transformer.prepare_class_ids([0, 1])
    continued = pipe.transformer.generate(torch.cat([ids, base[:, :8]], 1), guidance_scale=6.0,
                                          guidance_schedule="constant", do_sample=False)  # fmt: skip
    assert torch.equal(changed, continued[:, 1:]) and not torch.equal(changed, base)


def test_cpu_fast_paths_are_applied_per_call_or_kept_on_request(pipe, monkeypatch):
    from rar_hf import pipeline_rar
    from rar_hf.cpu_kernels import PackedLinear, can_pack

    if not can_pack(torch.zeros(1)):
        pytest.skip("this torch build cannot pack float32 weights with oneDNN")
    transformer = pipe.transformer
    state, num_parameters = {k: v.clone() for k, v in transformer.state_dict().items()}, transformer.num_parameters()
    used = []

    def call():
        used.clear()
        handle = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: used.append(type(module)) if isinstance(module, (PackedLinear, torch.nn.Linear)) else None
        )
        try:
            return pipe([0, 1], generator=seeded(3), output_type="latent").tokens
        finally:
            handle.remove()

    plain = call()
    assert torch.nn.Linear in used and PackedLinear not in used  # too small a model for them to pay off
    monkeypatch.setattr(pipeline_rar, "CPU_FAST_PATHS_MIN_PARAMETERS", 0)
    assert torch.equal(call(), plain)
    assert PackedLinear in used and torch.nn.Linear not in used  # the call ran on the fast paths...
    assert transformer.num_parameters() == num_parameters and type(transformer.lm_head) is torch.nn.Linear  # ...only
    assert all(torch.equal(v, state[k]) for k, v in transformer.state_dict().items())
    pipe.enable_cpu_fast_paths()
    try:
        assert isinstance(transformer.lm_head, PackedLinear)
        assert torch.equal(pipe([0, 1], generator=seeded(3), output_type="latent").tokens, plain)
        assert isinstance(transformer.lm_head, PackedLinear)  # kept across calls
    finally:
        pipe.disable_cpu_fast_paths()
    assert type(transformer.lm_head) is torch.nn.Linear and transformer.num_parameters() == num_parameters
    assert torch.equal(pipe([0, 1], generator=seeded(3), output_type="latent").tokens, plain)  # disabled: F.linear
