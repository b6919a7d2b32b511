"""Quantized inference (`rar_hf.quantization`): torchao weights through `from_pretrained(quantization_config=...)`,
the pipeline and `rar-hf generate --quantize`, the CPU fast paths stepping aside, real bytes, and bad input."""

import logging
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from rar_hf import RARForImageGeneration, cli, cpu_kernels, disable_cpu_fast_paths, enable_cpu_fast_paths
from rar_hf import quantization
from rar_hf.commands import generate as generate_command
from rar_hf.cpu_kernels import CPU_ATTENTION, PackedLinear, can_pack
from rar_hf.quantization import (
    is_torchao_available,
    pipeline_quantization_config,
    quantization_config,
    quantized_linear_layers,
    state_nbytes,
)

from test_cli import assert_one_line_error, nothing_loads, run_cli  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

needs_torchao = pytest.mark.skipif(
    not is_torchao_available(), reason='torchao is not installed (pip install "rar-hf[quantization]")'
)
PIPELINE = Path(__file__).resolve().parents[1] / "src" / "rar_hf" / "pretrained" / "tiny-digits"
TRANSFORMER = PIPELINE / "transformer"
LABELS = list(range(10))
# Teacher-forced on the fp32 model's samples (the shipped, trained model): the largest logit error allowed, as a
# fraction of the largest |logit|, and the least share of positions whose most likely token stays the same. Measured
# over seeds 0-3: int8 0.016-0.019 / 97.3-98.9%, int8-dynamic 0.027-0.035 / 95.9-96.7%, int4 0.17-0.24 / 79-85%.
TOLERANCES = {"int8": (0.05, 0.94), "int8-dynamic": (0.08, 0.92), "int4": (0.35, 0.7)}


@pytest.fixture(scope="module")
def fp32():
    model = RARForImageGeneration.from_pretrained(TRANSFORMER)
    torch.manual_seed(0)
    tokens = model.generate(class_labels=LABELS)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
    return model, tokens, logits


def load(name, path=TRANSFORMER, **kwargs):
    return RARForImageGeneration.from_pretrained(path, quantization_config=quantization_config(name), **kwargs)


@pytest.fixture(scope="module")
def int8():
    return load("int8")


# ------------------------------------------------------------------------------------------------ the model
@needs_torchao
@pytest.mark.parametrize("name", sorted(TOLERANCES))
def test_quantized_model_generates_and_stays_close_to_float32(fp32, name):
    model_fp32, tokens, reference = fp32
    model = load(name)
    kind = {"int8": "Int8Tensor", "int8-dynamic": "Int8Tensor", "int4": "Int4OpaqueTensor"}[name]
    # Every linear layer but the token head (kept in float32, as transformers keeps output embeddings) is quantized.
    assert quantized_linear_layers(model) == {kind: 21, "float32": 1}
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
    max_error, min_agreement = TOLERANCES[name]
    assert (logits - reference).abs().max() <= max_error * reference.abs().max()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= min_agreement
    torch.manual_seed(1)
    sampled = model.generate(class_labels=[3, None])
    assert sampled.shape == (2, 65) and sampled[:, 1:].min() >= 0 and sampled[:, 1:].max() < 256


@needs_torchao
def test_state_nbytes_counts_the_real_bytes(fp32, int8):
    model_fp32 = fp32[0]
    assert state_nbytes(model_fp32) == model_fp32.get_memory_footprint() == 4 * model_fp32.num_parameters()
    expected = 4 * model_fp32.num_parameters()
    for module in int8.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Int8Tensor":
            out_features, in_features = module.weight.shape
            # float32 weight -> int8 weight + a float32 scale and an int8 zero point per output row
            expected += out_features * in_features * (1 - 4) + out_features * (4 + 1)
    assert state_nbytes(int8) == expected < 0.33 * state_nbytes(model_fp32)
    # transformers counts the int8 weights at their float32 size (what state_nbytes is for)
    assert int8.get_memory_footprint() == model_fp32.get_memory_footprint()


@pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this torch build cannot pack float32 weights with oneDNN")
def test_state_nbytes_counts_packed_weights_that_are_no_parameters(fp32):
    import copy

    model = copy.deepcopy(fp32[0]).eval()
    plain = state_nbytes(model)
    enable_cpu_fast_paths(model)
    assert 4 * model.num_parameters() < plain / 2  # the packed weights left parameters()
    assert state_nbytes(model) == plain  # and are counted where they are (float32, as many values)


@needs_torchao
def test_int8_save_load_round_trip_and_int4_refuses_to_save(tmp_path, int8):
    int8.save_pretrained(tmp_path / "int8")
    loaded = RARForImageGeneration.from_pretrained(tmp_path / "int8")  # pre-quantized: no quantization_config needed
    assert quantized_linear_layers(loaded) == quantized_linear_layers(int8)
    first, again = int8.model.layers[0].mlp.fc1.weight, loaded.model.layers[0].mlp.fc1.weight
    assert torch.equal(first.qdata, again.qdata) and torch.equal(first.scale, again.scale)
    assert torch.equal(loaded.generate(class_labels=[2, 5], do_sample=False), int8.generate(class_labels=[2, 5], do_sample=False))
    # torchao 0.18 cannot flatten its CPU int4 layout to safetensors: the error comes before anything is written.
    folder = tmp_path / "int4"
    int8.save_pretrained(folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(ValueError, match="Unsupported tensor type.*Int4OpaqueTensor"):
        load("int4").save_pretrained(folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


# ------------------------------------------------------------------------------------------------ bad input
@needs_torchao
@pytest.mark.parametrize("which", ["int4 default layout", "float8 dynamic"])
def test_a_type_this_machine_cannot_run_is_refused_in_one_line_before_loading(monkeypatch, which):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    # On a CPU: Int4WeightOnlyConfig's default (plain) layout needs the CUDA mslk kernels, float8 activations need a
    # GPU of compute capability 8.9 or more.
    quant_type = {"int4 default layout": Int4WeightOnlyConfig(), "float8 dynamic": Float8DynamicActivationFloat8WeightConfig()}[which]

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the quantization type was refused")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    with pytest.raises(ValueError) as error:
        RARForImageGeneration.from_pretrained(TRANSFORMER, quantization_config=TorchAoConfig(quant_type), device_map="cpu")
    message = str(error.value)
    assert "\n" not in message and f"torchao's {type(quant_type).__name__} cannot run on this machine (cpu" in message
    assert message.endswith("these run here: int8, int8-dynamic, int4 (rar_hf.quantization.torchao_config(name))")


def test_quantization_types_are_checked_by_name():
    with pytest.raises(ValueError, match="unknown quantization type 'int3'; expected one of int8, int8-dynamic, int4"):
        quantization.torchao_config("int3")


# ------------------------------------------------------------------------------------------------ CPU fast paths
@needs_torchao
@pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="this torch build cannot pack float32 weights with oneDNN")
def test_fast_paths_leave_quantized_layers_to_torchao_and_say_so(monkeypatch):
    model = load("int8")
    plain = model.generate(class_labels=[1, 4, None], guidance_scale=2.0, do_sample=False)
    weights = {name: m.weight for name, m in model.named_modules() if quantization.is_quantized_tensor(getattr(m, "weight", None))}
    messages = []
    monkeypatch.setattr(cpu_kernels.logger, "warning_once", messages.append)
    assert enable_cpu_fast_paths(model)
    assert messages == ["CPU fast paths: 21 quantized linear layers (Int8Tensor) keep their own (torchao) kernels; 1 "
                        "float layer packed."]  # fmt: skip
    # The quantized layers are untouched, the float32 head is packed, the decoding attention is on.
    assert len(weights) == 21 and all(model.get_submodule(name).weight is weight for name, weight in weights.items())
    assert isinstance(model.lm_head, PackedLinear) and model.config._attn_implementation == CPU_ATTENTION
    fast = model.generate(class_labels=[1, 4, None], guidance_scale=2.0, do_sample=False)
    assert torch.equal(fast, plain)
    disable_cpu_fast_paths(model)
    assert type(model.lm_head) is torch.nn.Linear and model.config._attn_implementation == "sdpa"
    # Asked to pack a quantized layer by hand: refused.
    with pytest.raises(ValueError, match=r"quantized weight \(Int8Tensor\): PackedLinear packs float32/bfloat16"):
        PackedLinear(model.model.layers[0].mlp.fc1)


# ------------------------------------------------------------------------------------------------ the pipeline
@needs_torchao
def test_pipeline_loads_with_diffusers_quantization_mapping_and_runs_its_fast_paths(int8, monkeypatch):
    from diffusers import PipelineQuantizationConfig
    from transformers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from rar_hf import RARPipeline, pipeline_rar

    mapping = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = RARPipeline.from_pretrained(PIPELINE, quantization_config=mapping)
    assert quantized_linear_layers(pipe.transformer) == {"Int8Tensor": 21, "float32": 1}
    assert all(type(p) is torch.nn.Parameter for p in pipe.vqvae.parameters())  # the VQ model is not quantized
    # The other way: a quantized transformer passed in.
    passed = RARPipeline.from_pretrained(PIPELINE, transformer=int8)
    messages = []
    monkeypatch.setattr(cpu_kernels.logger, "warning_once", messages.append)
    # Per-call fast paths for this 1.3M-parameter model too (the pipeline may apply them from a size on only).
    monkeypatch.setattr(pipeline_rar, "CPU_FAST_PATHS_MIN_PARAMETERS", 0, raising=False)
    kwargs = dict(class_labels=[0, 7], output_type="latent")
    tokens = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(tokens, passed(**kwargs, generator=torch.Generator().manual_seed(0)).images)
    # Per call, the fast paths packed the float32 head only and said so; afterwards everything is as before.
    assert messages and "21 quantized linear layers (Int8Tensor)" in messages[0]
    assert type(pipe.transformer.lm_head) is torch.nn.Linear and quantized_linear_layers(pipe.transformer)["Int8Tensor"] == 21
    assert tokens.shape == (2, 64) and tokens.min() >= 0


@needs_torchao
def test_a_saved_quantized_pipeline_loads_quantized(tmp_path):
    from rar_hf import RARPipeline

    pipe = RARPipeline.from_pretrained(PIPELINE, quantization_config=pipeline_quantization_config("int8"))
    pipe.save_pretrained(tmp_path)
    loaded = RARPipeline.from_pretrained(tmp_path)
    assert quantized_linear_layers(loaded.transformer) == {"Int8Tensor": 21, "float32": 1}
    kwargs = dict(class_labels=[3], output_type="latent", num_images_per_prompt=2)
    assert torch.equal(
        pipe(**kwargs, generator=torch.Generator().manual_seed(5)).images,
        loaded(**kwargs, generator=torch.Generator().manual_seed(5)).images,
    )


# ------------------------------------------------------------------------------------------------ the CLI
@needs_torchao
def test_cli_quantize_generates_with_a_quantized_transformer(tmp_path, capsys, monkeypatch):
    loaded, load_pipeline = [], generate_command.load_pipeline
    monkeypatch.setattr(generate_command, "load_pipeline", lambda *a, **k: loaded.append(load_pipeline(*a, **k)) or loaded[-1])
    out_path = tmp_path / "int8.png"
    code, out, err = run_cli(["generate", "--quantize", "int8-dynamic", "--class_labels", "1", "--num_images_per_label", "1",
                              "--output_path", str(out_path)], capsys)  # fmt: skip
    assert code == 0, err
    assert out_path.is_file() and quantized_linear_layers(loaded[0].transformer) == {"Int8Tensor": 21, "float32": 1}
    assert loaded[0].transformer.model.layers[0].mlp.fc1.weight.act_quant_kwargs is not None  # dynamic activations


def test_cli_unknown_quantize_value_is_an_argparse_error(capsys, nothing_loads):
    code, _, err = run_cli(["generate", "--quantize", "int3"], capsys)
    assert_one_line_error(code, err, "argument --quantize: invalid choice: 'int3' (choose from 'int8', 'int8-dynamic', 'int4')")


def test_cli_quantize_without_torchao_says_how_to_install_it(capsys, nothing_loads, monkeypatch):
    monkeypatch.setattr(quantization, "is_torchao_available", lambda: False)
    code, _, err = run_cli(["generate", "--quantize", "int8"], capsys)
    assert_one_line_error(code, err, "quantization type 'int8' needs torchao, which is not installed: "
                          'pip install "rar-hf[quantization]" (torchao)')  # fmt: skip


@needs_torchao
def test_cli_quantize_type_this_machine_cannot_run_is_refused_before_loading(capsys, nothing_loads, monkeypatch):
    from torchao.quantization import Int4WeightOnlyConfig

    # As on a machine without a CPU int4 kernel: the layout torchao would pick cannot run.
    torchao_config = quantization.torchao_config
    monkeypatch.setattr(
        quantization, "torchao_config", lambda name, device="cpu": Int4WeightOnlyConfig() if name == "int4" else torchao_config(name, device)
    )
    code, _, err = run_cli(["generate", "--quantize", "int4"], capsys)
    assert_one_line_error(code, err, "torchao's Int4WeightOnlyConfig cannot run on this machine (cpu, float32 weights)",
                          "these run here: int8, int8-dynamic (")  # fmt: skip


# ------------------------------------------------------------------------------------------------ import noise
def test_only_the_known_torchao_import_messages_are_dropped():
    quantization.drop_torchao_import_noise()

    def shown(logger_name, message):
        record = logging.LogRecord(logger_name, logging.WARNING, __file__, 1, message, None, None)
        return logging.getLogger(logger_name).filter(record)

    cuda_kernel = "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load"
    assert shown("torchao", cuda_kernel) == (torch.version.cuda is not None)
    assert shown("torchao", "Skipping import of cpp extensions due to incompatible torch version")
    assert not shown("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is now natively "
                     "supported by torch.compile as an opaque value type.")  # fmt: skip
    assert shown("torch.utils._pytree", "something else")
    assert not shown(quantization._NOISY_LOGGERS[2], "Unable to import `torchao` Tensor objects. This may affect loading")


# ------------------------------------------------------------------------------------------------ the benchmark
@needs_torchao
def test_quantization_benchmark_measures_every_section(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quantization_benchmark", PIPELINE.parents[3] / "benchmarks" / "quantization.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    records = benchmark.main(["--models", "tiny-digits", "--variants", "fp32", "int8", "--num_tokens", "2", "--repeats", "1",
                              "--batch_sizes", "1", "--num_per_class", "1", "--fixtures", "small", "--threads", "1",
                              "--in_process"])  # fmt: skip
    by = {(r["section"], r["variant"], r.get("seed", 0), r["model"][:7]): r for r in records}
    assert by["speed", "int8", 0, "tiny-di"]["ms_per_step"] > 0 and by["speed", "fp32", 0, "tiny-di"]["ms_per_step"] > 0
    fp32, int8 = by["memory", "fp32", 0, "tiny-di"], by["memory", "int8", 0, "tiny-di"]
    assert int8["state_bytes"] < 0.33 * fp32["state_bytes"] and int8["memory_footprint"] == fp32["memory_footprint"]
    assert int8["linear_layers"] == {"Int8Tensor": 21, "float32": 1} and int8["peak_rss"] > 0
    fixture = by["error", "int8", 0, "fixture"]
    assert fixture["fp32_vs_official"] < 1e-5 and fixture["relative"] < 0.01 and fixture["argmax_agreement"] == 1.0
    assert 0 < by["error", "int8", 0, "tiny-di"]["relative"] < 0.05
    assert {r["seed"] for r in records if r["section"] == "quality" and r["variant"] == "fp32"} == {0, 1, 2}
    assert 0 <= by["quality", "int8", 0, "tiny-di"]["accuracy"] <= 1
    out = capsys.readouterr().out
    assert "| int8 | " in out and "teacher-forced logits against float32" in out
