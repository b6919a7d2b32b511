"""What a GPU run pays per decoding step, checked on the CPU (issue 23), and the precision the pipeline decodes in.

A decoding step of `generate()` launches kernels and may wait for the device (a host synchronisation: `.item()`,
`bool(tensor)`, `nonzero`, ...). On a GPU every kernel launched outside a CUDA graph costs host time, and every
synchronisation stops the host from queueing the next step while the device works. Both are visible on the CPU: each
tensor operation goes through PyTorch's dispatcher, where a `TorchDispatchMode` records it with the Python frame that
asked for it. The tests count, per decoding step (the difference between a run of 8 and of 4 tokens), what RAR's own
code does, on the accelerator behaviour of its processors (the non-finite check deferred to the end of the call).
"""

import collections
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig

import rar_hf
from rar_hf import RARConfig, RARForImageGeneration
from rar_hf.sampling_rar import RARFiniteLogitsCheck, RARStepCallback

TINY_DIGITS = Path(rar_hf.__file__).parent / "pretrained" / "tiny-digits"  # the shipped, trained pipeline

# Operators that make the host wait for the device on CUDA (a value read back, or an output size known only there).
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave"}
# Operators that allocate a new tensor from nothing (a kernel and an allocation per call).
FACTORY_OPS = {"arange", "full", "full_like", "empty", "zeros", "ones", "zeros_like", "ones_like", "scalar_tensor",
               "lift_fresh", "tensor"}
GENERATION = ("rar_hf/sampling_rar.py", "rar_hf/generation_rar.py")  # RAR's step bookkeeping and processors


def _is_view(func) -> bool:
    returns = func._schema.returns
    alias = returns[0].alias_info if len(returns) == 1 else None
    return alias is not None and not alias.is_write or func._schema.name in ("aten::split_with_sizes", "aten::split",
                                                                             "aten::unbind", "aten::chunk")


class StepOps(TorchDispatchMode):
    """Counts dispatched operators by (RAR file or "other", op name, kind)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        kind = "sync" if name in SYNC_OPS else "view" if _is_view(func) else "kernel"
        frame, where = sys._getframe(1), "other"
        while frame is not None:  # the innermost frame of RAR's code that asked for this operator
            filename = frame.f_code.co_filename.replace("\\", "/")
            hit = next((f for f in (*GENERATION, "rar_hf/modeling_rar.py") if filename.endswith(f)), None)
            if hit:
                where = hit
                break
            if filename.endswith("transformers/generation/utils.py"):
                where = f"transformers:{frame.f_code.co_name}"
                break
            frame = frame.f_back
        self.counts[(where, name, kind)] += 1
        return func(*args, **(kwargs or {}))


def tiny_model(num_hidden_layers=2, seed=0):
    torch.manual_seed(seed)
    config = RARConfig(hidden_size=32, num_hidden_layers=num_hidden_layers, num_attention_heads=2, intermediate_size=64,
                       codebook_size=16, num_classes=4, image_seq_len=16)
    model = RARForImageGeneration(config).eval()
    with torch.no_grad():  # adaLN-zero makes every block the identity: give it weights
        for name, param in model.named_parameters():
            if "adaln_modulation" in name:
                param.normal_(0.0, 0.05)
    return model


def per_step_ops(model, steps=(4, 8), step_callback=False, **kwargs):
    """{(where, op, kind): count per decoding step}, from the difference of two runs of different lengths (with a
    step callback that keeps the tokens, as the pipeline's progress bar, when `step_callback`)."""
    runs = []
    for n in steps:
        if step_callback:
            kwargs["step_callback"] = RARStepCallback(lambda step, tokens: None, 16, should_stop=lambda: False)
        recorder = StepOps()
        with recorder:
            model.generate(class_labels=[0, 1, 2], max_new_tokens=n, min_new_tokens=n, disable_compile=True, **kwargs)
        runs.append(recorder.counts)
    keys = set(runs[0]) | set(runs[1])
    return {k: (runs[1][k] - runs[0][k]) / (steps[1] - steps[0]) for k in keys if runs[1][k] != runs[0][k]}


@pytest.fixture
def deferred_checks(monkeypatch):
    """The accelerator behaviour of the non-finite check (folded on the device, raised after the loop)."""
    monkeypatch.setattr(RARFiniteLogitsCheck, "deferred", lambda self, scores: True)


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_decoding_steps_make_no_host_synchronisation_in_rar_code(deferred_checks, one_thread, cache_implementation):
    ops = per_step_ops(tiny_model(), guidance_scale=3.0, guidance_scale_pow=1.5, do_sample=True, top_k=5,
                       cache_implementation=cache_implementation, step_callback=True)
    syncs = {key: count for key, count in ops.items() if key[2] == "sync"}
    assert not {key: n for key, n in syncs.items() if not key[0].startswith("transformers:")}, syncs
    # transformers 5.24's own loop reads `unfinished_sequences.max() == 0` once per step on CUDA (its deferred stop
    # check runs on "mps" only): the one synchronisation a step still makes, outside RAR's code.
    assert sum(syncs.values()) <= 1, syncs


def test_the_cpu_check_synchronises_once_per_step_by_design(one_thread):
    # The recorder does see synchronisations: on a CPU the non-finite check raises at the bad step, reading one flag.
    ops = per_step_ops(tiny_model(), guidance_scale=3.0, do_sample=True, cache_implementation="static")
    rar_syncs = {key: n for key, n in ops.items() if key[2] == "sync" and key[0] in GENERATION}
    assert rar_syncs == {("rar_hf/sampling_rar.py", "_local_scalar_dense", "sync"): 1.0}


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_step_bookkeeping_launches_a_few_kernels_whatever_the_depth(deferred_checks, one_thread, guidance_scale):
    """The inputs of a step (new tokens, positions, the AdaLN modulations of every layer), guidance, the non-finite
    check and the step callback: a fixed handful of kernels, none growing with the number of layers, and no tensor
    created from nothing except the positions."""
    kernels, factories = {}, {}
    for layers in (2, 4):
        ops = per_step_ops(tiny_model(layers), guidance_scale=guidance_scale, do_sample=True,
                           cache_implementation="static", step_callback=True)
        mine = {key: n for key, n in ops.items() if key[0] in GENERATION and key[2] == "kernel"}
        kernels[layers] = sum(mine.values())
        factories[layers] = sorted(key[1] for key in mine if key[1] in FACTORY_OPS)
    assert kernels[2] == kernels[4], kernels
    # step_inputs: the new tokens (one copy, doubled for guidance), the positions, one gather of the modulations;
    # the non-finite check: |x|, max, running max; guidance: u + (c - u) * s; the callback's copy of the tokens.
    assert kernels[4] <= 3 + 3 + (3 if guidance_scale != 1 else 0) + 1, kernels
    assert factories[4] == ["arange"], factories


def test_compiled_static_decoding_is_one_graph_and_gives_the_plain_greedy_tokens(one_thread):
    """The GPU fast path (static cache, generate's own torch.compile, as CUDA graphs need) against the plain eager
    path with a dynamic cache, in float32: one graph for every decoding step (no recompilation, no graph break), and
    the same greedy tokens and scores. The backend here only counts graphs (inductor would take minutes on a CPU)."""
    model = tiny_model()
    kwargs = dict(class_labels=[0, 1, 3], guidance_scale=3.0, guidance_scale_pow=1.5, do_sample=False,
                  max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True, output_scores=True)
    plain = model.generate(cache_implementation="dynamic", disable_compile=True, **kwargs)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_config = CompileConfig(backend=counting_backend, fullgraph=True, mode=None)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only unless told
    torch._dynamo.reset()
    try:
        fast = model.generate(cache_implementation="static", compile_config=compile_config, **kwargs)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert torch.equal(fast.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fast.scores), torch.stack(plain.scores), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ pipeline precision
def test_a_bfloat16_pipeline_decodes_the_float32_images(tmp_path, one_thread):
    """`RARPipeline.from_pretrained(..., dtype=torch.bfloat16)`: the generator in bfloat16, the tokenizer's codebook
    and decoder in float32 (`MaskGITVQModel._keep_in_fp32_modules`), so the images are bit for bit the float32 decode
    of the tokens; the encoder follows the dtype and still encodes (its latents meet the float32 codebook)."""
    from rar_hf import RARPipeline

    shipped = RARPipeline.from_pretrained(TINY_DIGITS)
    shipped.save_pretrained(tmp_path)
    pipe = RARPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    vqvae = pipe.vqvae
    assert pipe.transformer.dtype == torch.bfloat16
    assert {p.dtype for n, p in vqvae.named_parameters() if n.split(".")[0] in ("quantize", "decoder")} == {torch.float32}
    assert {p.dtype for n, p in vqvae.named_parameters() if n.startswith("encoder.")} == {torch.bfloat16}

    out = pipe([1, 7], generator=torch.Generator().manual_seed(0), output_type="pt")
    latent_size = tuple(pipe.transformer.config.latent_size)
    reference = shipped.vqvae.decode(out.tokens, latent_size=latent_size).sample
    assert out.images.dtype == torch.float32 and torch.equal(out.images, reference)

    codes = vqvae.encode(reference.to(torch.bfloat16)).indices
    assert codes.shape == out.tokens.shape and int(codes.min()) >= 0 and int(codes.max()) < vqvae.codebook_size
