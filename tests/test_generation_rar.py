"""generate() continuing from known image tokens (a prefix in generation order) and from an earlier call's cache."""

import contextlib

import pytest
import torch
from transformers.cache_utils import StaticCache

from test_modeling_rar import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

L = 16  # image tokens of the tiny model
LABELS = [1, 7, None]
CACHES = {"static": {}, "dynamic": dict(cache_implementation="dynamic"), "none": dict(use_cache=False)}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def random_orders(batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=generator) for _ in range(batch_size)])


def in_generation_order(raster_tokens, orders):
    """`(B, L)` raster tokens -> generation order (the layout `input_ids` takes)."""
    return raster_tokens if orders is None else raster_tokens.gather(1, orders)


def greedy_options(guidance_scale, orders, cache):
    # A linear schedule changes the scale at every step: a continuation that restarted the schedule at step 0 would
    # guide its tokens with other scales.
    return dict(do_sample=False, guidance_scale=guidance_scale, guidance_schedule="linear", orders=orders, **CACHES[cache])


@contextlib.contextmanager
def forward_calls(model):
    """The `input_ids` shape of every forward call of `model` inside the block."""
    calls = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                         with_kwargs=True)  # fmt: skip
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_greedy_completion_of_a_greedy_image_returns_that_image(model, guidance_scale, cache, order):
    orders = None if order == "raster" else random_orders(len(LABELS))
    options = greedy_options(guidance_scale, orders, cache)
    full = model.generate(class_labels=LABELS, **options)
    assert full.shape == (3, 1 + L) and bool((full[:, 1:] >= 0).all())
    known = in_generation_order(full[:, 1:], orders)
    for k in (1, 6, L - 1):
        completed = model.generate(input_ids=torch.cat([full[:, :1], known[:, :k]], dim=1), **options)
        assert torch.equal(completed, full), f"prefix of {k} tokens"


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("use_cache", [True, False])
def test_the_prefix_is_read_in_one_forward_pass(model, guidance_scale, use_cache):
    full = model.generate(class_labels=LABELS, do_sample=False, guidance_scale=guidance_scale)
    k, rows = 10, len(LABELS) * (2 if guidance_scale != 1.0 else 1)
    with forward_calls(model) as calls:
        model.generate(input_ids=full[:, : 1 + k], do_sample=False, guidance_scale=guidance_scale, use_cache=use_cache)
    # One forward per new token; the first reads the class token and all k known tokens (the model adds the cls slot).
    assert len(calls) == L - k
    assert calls[0] == (rows, 1 + k)
    if use_cache:
        assert calls[1:] == [(rows, 1)] * (L - k - 1)


@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.parametrize("cache", ["dynamic", "static", "user-static"])
def test_continuing_an_earlier_call_from_its_cache(model, cache, order):
    orders = None if order == "raster" else random_orders(len(LABELS), seed=1)
    options = greedy_options(4.0, orders, "static")  # "static": the model's default cache
    full = model.generate(class_labels=LABELS, **options)
    k = 5
    for extra in (0, 3):  # continue from the cached tokens alone, or with more known tokens after them
        kwargs = {
            "dynamic": {"cache_implementation": "dynamic"}, "static": {},
            "user-static": {"cache": StaticCache(config=model.config, max_cache_len=2 + L)},
        }[cache]  # fmt: skip
        first = model.generate(class_labels=LABELS, max_new_tokens=k, return_dict_in_generate=True, **kwargs, **options)
        assert type(first.cache).__name__ == ("DynamicCache" if cache == "dynamic" else "StaticCache")
        # sequences come back in raster order (-1 where not generated): continue from them in generation order
        cached = in_generation_order(first.sequences[:, 1:], orders)[:, :k]
        assert bool((cached >= 0).all()) and torch.equal(cached, in_generation_order(full[:, 1:], orders)[:, :k])
        known = in_generation_order(full[:, 1:], orders)[:, : k + extra]
        with forward_calls(model) as calls:
            rest = model.generate(input_ids=torch.cat([full[:, :1], known], dim=1), cache=first.cache, **options)
        assert torch.equal(rest, full)
        # The cache holds the class token and the k tokens but the newest (not run yet): the first step reads that one
        # and the extra known tokens together.
        assert len(calls) == L - k - extra and calls[0][1] == 1 + extra


def test_a_whole_image_as_prefix_is_returned_without_running_the_model(model):
    full = model.generate(class_labels=LABELS, do_sample=False)
    orders = random_orders(len(LABELS))
    with forward_calls(model) as calls:
        assert torch.equal(model.generate(input_ids=full.clone(), do_sample=False), full)
        in_order = torch.cat([full[:, :1], full[:, 1:].gather(1, orders)], dim=1)
        assert torch.equal(model.generate(input_ids=in_order, orders=orders), full)
    assert calls == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda ids: torch.cat([ids, ids[:, -1:]], dim=1), "holds 17 image tokens.*image_seq_len=16"),
        (lambda ids: torch.cat([ids[:, :4], torch.full((3, 1), 16), ids[:, 5:9]], dim=1), r"Image token 16 is out of range.*\[0, 16\)"),
        (lambda ids: torch.cat([ids[:, :4], torch.full((3, 1), -1)], dim=1), r"Image token -1 is out of range"),
        (lambda ids: torch.cat([ids[:, 1:5], ids[:, 5:9]], dim=1), r"input_ids\[:, 0\] must be a class token"),
    ],
    ids=["too-long", "beyond-codebook", "negative", "no-class-token"],
)
def test_bad_prefixes_fail_with_one_line_before_any_compute(model, make, message):
    full = model.generate(class_labels=LABELS, do_sample=False)
    with forward_calls(model) as calls, pytest.raises(ValueError, match=message) as error:
        model.generate(input_ids=make(full), do_sample=False, guidance_scale=3.0)
    assert calls == [] and "\n" not in str(error.value)
