"""RARPipeline inpainting: `pipe(labels, image=..., mask_image=...)` keeps the image's VQ codes where the mask is black
and generates the rest after them, for any mix of masks in a batch."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_pipeline_rar import seeded, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny pipeline: 8x8 images, a 4x4 token grid (2x2 pixels per token), codebook 16.
L, SIDE, PATCH = 16, 8, 2


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, SIDE, SIDE, generator=generator)


def token_mask(regenerate) -> torch.Tensor:
    """A pixel mask (B, 1, 8, 8) from a token-level one (B, 16) of booleans (True = regenerate)."""
    grid = torch.as_tensor(regenerate, dtype=torch.float32).view(-1, 1, 4, 4)
    return grid.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)


def greedy_tokens(pipe, labels, tokens, orders):
    """Teacher-forced argmax of every step of `orders` given the raster `tokens` before it in that order (what top_k=1
    without guidance generates), in generation order."""
    sequence = torch.cat([pipe.transformer.prepare_class_ids(labels), tokens.gather(1, orders)], dim=1)
    with torch.no_grad():
        return pipe.transformer(input_ids=sequence[:, :-1], orders=orders).logits.argmax(-1)


def codes(pipe, images):
    return pipe.vqvae.encode(images).indices


PREFIX = torch.arange(L) >= 6  # keep a raster prefix of 6 tokens
RIGHT_HALF = (torch.arange(L) % 4) >= 2
CENTRE = torch.zeros(4, 4, dtype=torch.bool)
CENTRE[1:3, 1:3] = True
CENTRE = CENTRE.flatten()


class ForwardCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self.count)

    def count(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ what is kept
@pytest.mark.parametrize("regenerate", [PREFIX, RIGHT_HALF, CENTRE], ids=["prefix", "right-half", "centre"])
def test_kept_tokens_are_exactly_the_vq_codes_of_the_image(pipe, images, regenerate):
    out = pipe([0, 1, 2], image=images, mask_image=token_mask(regenerate), generator=seeded(0), output_type="latent")
    assert torch.equal(out.images, out.tokens) and out.tokens.shape == (3, L)
    expected = codes(pipe, images)
    assert torch.equal(out.tokens[:, ~regenerate], expected[:, ~regenerate])
    assert bool(((out.tokens >= 0) & (out.tokens < 16)).all())
    # The regenerated tokens were generated (a random tokenizer's codes are not what the model draws everywhere).
    assert not torch.equal(out.tokens, expected)
    assert pipe.num_timesteps == int(regenerate.sum())
    # Decoded outputs are the decoded tokens.
    pt = pipe([0, 1, 2], image=images, mask_image=token_mask(regenerate), generator=seeded(0), output_type="pt")
    assert torch.equal(pt.tokens, out.tokens)
    torch.testing.assert_close(pt.images, pipe.vqvae.decode(out.tokens, latent_size=(4, 4)).sample)


def test_pil_numpy_and_tensor_images_and_masks_are_the_same_input(pipe):
    pixels = np.random.default_rng(0).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[:, 4:] = 255
    as_tensor = dict(image=torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, mask_image=torch.from_numpy(mask / 255.0)[None].float())
    reference = pipe(0, generator=seeded(1), output_type="latent", **as_tensor).tokens
    variants = [
        dict(image=Image.fromarray(pixels), mask_image=Image.fromarray(mask)),
        dict(image=[Image.fromarray(pixels)], mask_image=Image.fromarray(mask).convert("RGB")),  # RGB masks: grayscale
        dict(image=pixels / 255.0, mask_image=mask / 255.0),
        dict(image=(pixels / 255.0)[None], mask_image=(mask > 0)[None]),  # batched array, boolean mask
        dict(image=as_tensor["image"], mask_image=torch.from_numpy(mask > 0)),  # a (H, W) boolean tensor
    ]
    for variant in variants:
        assert torch.equal(pipe(0, generator=seeded(1), output_type="latent", **variant).tokens, reference)


def test_a_token_is_regenerated_when_any_pixel_of_its_patch_is_white(pipe):
    mask = torch.zeros(1, SIDE, SIDE)
    mask[0, 3, 5] = 1.0  # one pixel of token (row 1, column 2)
    _, keep = pipe.prepare_mask(mask)
    assert keep.shape == (1, L) and (~keep).nonzero()[:, 1].tolist() == [1 * 4 + 2]
    # Binarized at 0.5: darker grey keeps, 0.5 and lighter regenerate.
    assert bool(pipe.prepare_mask(torch.full((1, SIDE, SIDE), 0.49))[1].all())
    assert not bool(pipe.prepare_mask(torch.full((1, SIDE, SIDE), 0.5))[1].any())
    # A mask of another size is resized to the model's size first (as diffusers' mask processor does).
    big = Image.fromarray(np.kron(token_mask(RIGHT_HALF)[0, 0].numpy(), np.ones((4, 4))).astype(np.uint8) * 255)
    assert big.size == (32, 32)
    assert torch.equal(pipe.prepare_mask(big)[1][0], ~RIGHT_HALF)
    # Images of another size are resized too.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(20, 12, 3), dtype=np.uint8))
    assert tuple(pipe.prepare_image(image).shape) == (1, 3, SIDE, SIDE) and pipe.image_size == (SIDE, SIDE)


# ------------------------------------------------------------------------------------------------ order
def test_regenerated_tokens_follow_the_kept_ones_raster_by_default_or_in_the_given_order(pipe, images):
    regenerate = CENTRE | PREFIX & (torch.arange(L) % 3 == 0)
    mask = token_mask(regenerate)
    permutation = torch.randperm(L, generator=seeded(4))
    for orders in (None, permutation[None]):
        grids = []
        out = pipe(2, image=images[:1], mask_image=mask, guidance_scale=1.0, top_k=1, orders=orders,
                   output_type="latent", callback_on_step_end=lambda p, s, t, kw: grids.append(kw["tokens"]) or {})  # fmt: skip
        # The callback sees the whole grid: the kept tokens from the start, -1 where nothing is generated yet.
        filled = [grid[0] >= 0 for grid in grids]
        new_positions = [int((now & ~before).nonzero()) for before, now in zip([~regenerate] + filled[:-1], filled)]
        expected = regenerate.nonzero()[:, 0]
        if orders is not None:
            expected = permutation[regenerate[permutation]]
        assert new_positions == expected.tolist()
        # top_k=1 without guidance: every regenerated token is the model's argmax given the kept tokens (first) and
        # the ones generated before it.
        order = torch.cat([(~regenerate).nonzero()[:, 0] if orders is None else permutation[~regenerate[permutation]], expected])
        kept = int((~regenerate).sum())
        assert torch.equal(greedy_tokens(pipe, [2], out.tokens, order[None])[:, kept:], out.tokens[:, expected])


# ------------------------------------------------------------------------------------------------ batches
def test_rows_with_different_masks_match_each_row_alone(pipe, images):
    masks = torch.cat([token_mask(PREFIX), token_mask(RIGHT_HALF), token_mask(torch.zeros(L, dtype=torch.bool))])
    generators = [seeded(20 + i) for i in range(3)]
    with ForwardCounter(pipe.transformer) as counter:
        batch = pipe([0, 1, 2], image=images, mask_image=masks, generator=generators, output_type="latent").tokens
    # Every row keeps at least 6 tokens (its own): those are read at once; the rows that keep more emit the rest of
    # theirs one step each.
    common = min(int((~PREFIX).sum()), int((~RIGHT_HALF).sum()))
    assert counter.calls == pipe.num_timesteps == L - common
    for row in range(3):
        alone = pipe([row], image=images[row : row + 1], mask_image=masks[row : row + 1], generator=[seeded(20 + row)],
                     output_type="latent").tokens  # fmt: skip
        assert torch.equal(batch[row : row + 1], alone), f"row {row}"
    kept = torch.stack([~PREFIX, ~RIGHT_HALF, torch.ones(L, dtype=torch.bool)])
    assert torch.equal(batch[kept], codes(pipe, images)[kept])


def test_image_and_mask_counts_follow_labels_and_num_images_per_prompt(pipe, images):
    mask = token_mask(RIGHT_HALF)
    out = pipe([0, 1], image=images[:2], mask_image=mask, num_images_per_prompt=2, generator=seeded(3), output_type="latent").tokens
    expected = codes(pipe, images[:2]).repeat_interleave(2, dim=0)  # one image per label, rows [a, a, b, b]
    assert torch.equal(out[:, ~RIGHT_HALF], expected[:, ~RIGHT_HALF])
    per_image = torch.cat([token_mask(PREFIX), token_mask(RIGHT_HALF)] * 2)
    out = pipe([0, 1], image=images[0], mask_image=per_image, num_images_per_prompt=2, generator=seeded(3), output_type="latent").tokens
    kept = torch.stack([~PREFIX, ~RIGHT_HALF] * 2)
    assert torch.equal(out[kept], codes(pipe, images[:1]).expand(4, -1)[kept])
    with pytest.raises(ValueError, match=r"Got 3 images for 2 class label\(s\) x 2 image\(s\) per prompt.*one per class label \(2\) or one per generated image \(4\)"):
        pipe([0, 1], image=images, mask_image=mask, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="Got 3 masks"):
        pipe([0, 1], image=images[:1], mask_image=torch.cat([mask] * 3))


def test_keeping_everything_returns_the_codes_and_keeping_nothing_is_plain_generation(pipe, images):
    with ForwardCounter(pipe.transformer) as counter:
        out = pipe([0, 1], image=images[:2], mask_image=torch.zeros(1, SIDE, SIDE), output_type="pt")
    assert counter.calls == 0 and pipe.num_timesteps == 0
    assert torch.equal(out.tokens, codes(pipe, images[:2]))
    torch.testing.assert_close(out.images, pipe.vqvae.decode(out.tokens, latent_size=(4, 4)).sample)
    everything = torch.ones(1, SIDE, SIDE)
    for options in (dict(), dict(orders="random"), dict(generator=[seeded(1), seeded(2)])):
        options = {"generator": seeded(9), **options}
        plain = pipe([0, 1], output_type="latent", **copy.deepcopy(options)).tokens
        again = pipe([0, 1], image=images[:2], mask_image=everything, output_type="latent", **options).tokens
        assert torch.equal(again, plain)


def test_a_seeded_completion_draws_as_the_full_generation_with_that_generator(pipe, images):
    """Completing the first k tokens with a generator draws each later token with the draw the full generation makes at
    that step: it equals a full generation whose first k tokens are replaced by the kept ones (through the callback)."""
    k = 6
    kept = codes(pipe, images[:2])[:, :k]

    def replace_prefix(p, step, timestep, callback_kwargs):
        tokens = callback_kwargs["tokens"]
        if step == k - 1:
            tokens = kept.clone()
        return {"tokens": tokens}

    replaced = pipe([0, 1], generator=seeded(5), callback_on_step_end=replace_prefix, output_type="latent").tokens
    completed = pipe([0, 1], image=images[:2], mask_image=token_mask(PREFIX), generator=seeded(5), output_type="latent").tokens
    assert torch.equal(completed, replaced)


# ------------------------------------------------------------------------------------------------ callbacks
def test_callbacks_see_the_whole_grid_and_can_replace_generated_tokens(pipe, images):
    mask = token_mask(RIGHT_HALF)
    seen = []

    def record(p, step, timestep, callback_kwargs):
        seen.append((step, timestep, callback_kwargs["latents"].clone()))
        return {}

    out = pipe([0, 1], image=images[:2], mask_image=mask, generator=seeded(2), callback_on_step_end=record, output_type="latent").tokens
    kept = int((~RIGHT_HALF).sum())
    assert [(step, timestep) for step, timestep, _ in seen] == [(s, kept + s) for s in range(L - kept)]
    for step, _, grid in seen:
        assert grid.shape == (2, L) and int((grid[0] < 0).sum()) == L - kept - step - 1
        assert torch.equal(grid[grid >= 0], out[grid >= 0])
        partial = pipe.decode_partial(grid, output_type="pt")  # gray where nothing is generated yet
        assert partial.shape == (2, 3, SIDE, SIDE)
    # Interrupt: the tokens so far on the grid, the rest -1, decoded with gray holes.
    def stop(p, step, timestep, callback_kwargs):
        p._interrupt = step == 2
        return {}

    partial = pipe([0, 1], image=images[:2], mask_image=mask, generator=seeded(2), callback_on_step_end=stop, output_type="pt")
    assert torch.equal(partial.tokens, seen[2][2])
    torch.testing.assert_close(partial.images, pipe.decode_partial(partial.tokens, output_type="pt"))
    # Replaced tokens (kept ones and generated ones) are continued from: with top_k=1 and no guidance, every later
    # token is the model's argmax given the replaced ones.
    def replace(p, step, timestep, callback_kwargs):
        grid = callback_kwargs["tokens"]
        if step == 1:
            grid = torch.where(grid >= 0, (grid + 3) % 16, grid)
        return {"tokens": grid}

    greedy = dict(guidance_scale=1.0, top_k=1, output_type="latent")
    plain = pipe([0, 1], image=images[:2], mask_image=mask, **greedy).tokens
    edited = pipe([0, 1], image=images[:2], mask_image=mask, callback_on_step_end=replace, **greedy).tokens
    order = torch.cat([(~RIGHT_HALF).nonzero()[:, 0], RIGHT_HALF.nonzero()[:, 0]])[None].expand(2, -1)
    replaced_so_far = order[:, : kept + 2]
    assert torch.equal(edited.gather(1, replaced_so_far), (plain.gather(1, replaced_so_far) + 3) % 16)
    assert torch.equal(greedy_tokens(pipe, [0, 1], edited, order)[:, kept + 2 :], edited.gather(1, order[:, kept + 2 :]))
    assert not torch.equal(edited.gather(1, order[:, kept + 2 :]), plain.gather(1, order[:, kept + 2 :]))

    def touch_the_future(p, step, timestep, callback_kwargs):
        grid = callback_kwargs["tokens"].clone()
        grid[:, -1] = 0
        return {"tokens": grid}

    with pytest.raises(ValueError, match="not generated yet"):
        pipe([0], image=images[:1], mask_image=mask, callback_on_step_end=touch_the_future)


def test_speculative_decoding_keeps_the_kept_tokens(pipe, images):
    masks = torch.cat([token_mask(PREFIX), token_mask(CENTRE)])
    out = pipe([0, 1], image=images[:2], mask_image=masks, jacobi_window=3, generator=seeded(4), output_type="latent").tokens
    kept = torch.stack([~PREFIX, ~CENTRE])
    assert torch.equal(out[kept], codes(pipe, images[:2])[kept])
    greedy = dict(guidance_scale=1.0, top_k=1, output_type="latent")
    plain = pipe([0, 1], image=images[:2], mask_image=masks, **greedy).tokens
    assert torch.equal(pipe([0, 1], image=images[:2], mask_image=masks, jacobi_window=3, **greedy).tokens, plain)


# ------------------------------------------------------------------------------------------------ folded models
def test_a_folded_model_keeps_only_a_raster_prefix(pipe, images):
    folded = tiny_pipeline()
    folded.transformer.fold_target_aware_position_embedding()
    out = folded([0, 1], image=images[:2], mask_image=torch.cat([token_mask(PREFIX), token_mask(PREFIX & (torch.arange(L) >= 9))]),
                 generator=seeded(1), output_type="latent").tokens  # fmt: skip
    assert torch.equal(out[:, :6], codes(folded, images[:2])[:, :6])
    with pytest.raises(ValueError, match="folded.*raster prefix.*keeps a token after a regenerated one"):
        folded(0, image=images[:1], mask_image=token_mask(RIGHT_HALF))
    with pytest.raises(ValueError, match="folded.*orders='random'"):
        folded(0, image=images[:1], mask_image=token_mask(PREFIX), orders="random")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(image=None), ValueError, "image= and mask_image= together.*image is missing"),
        (dict(image="cat.png"), TypeError, r"image must be a PIL image, a numpy array or a torch tensor.*load_image"),
        (dict(image=[]), TypeError, "image must be a PIL image"),
        (dict(mask_image=[1, 2]), TypeError, "mask_image must be a PIL image"),
        (dict(image=np.zeros((SIDE, SIDE, 3), dtype=np.uint8)), ValueError, "floats in \\[0, 1\\].*uint8.*255"),
        (dict(image=torch.full((3, SIDE, SIDE), 2.0)), ValueError, r"image values must lie in \[0, 1\]"),
        (dict(image=torch.rand(1, 4, SIDE, SIDE)), ValueError, "3 \\(RGB\\) or 1 \\(grey\\) channels"),
        (dict(mask_image=np.zeros((SIDE, SIDE, 3))), ValueError, "mask_image has 3 channels"),
        (dict(image=torch.rand(2, 3, SIDE, SIDE)), ValueError, r"Got 2 images for 3 class label"),
        (dict(orders=torch.zeros(L, dtype=torch.long)), ValueError, "permutation"),
    ],
    ids=["mask-without-image", "path", "empty", "not-images", "uint8", "range", "channels", "rgb-mask", "count", "orders"],
)
def test_bad_inputs_fail_with_one_line_before_any_compute(pipe, images, monkeypatch, kwargs, error, message):
    arguments = {"image": images[:1], "mask_image": token_mask(RIGHT_HALF), **kwargs}
    encoded = []
    monkeypatch.setattr(pipe.vqvae, "encode", lambda *a, **k: encoded.append(1))
    with ForwardCounter(pipe.transformer) as counter, pytest.raises(error, match=message) as raised:
        pipe([0, 1, 2], **arguments)
    assert counter.calls == 0 and encoded == [] and "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------------ the command line
def digit_files(folder):
    """A held-out digit (32x32, the shipped model's size) and a bottom-half mask, as PNG files."""
    from rar_hf.data.digits import digits_to_images, split_digits

    digits, labels = split_digits()["test"]
    image_path, mask_path = folder / "digit.png", folder / "mask.png"
    digits_to_images(digits[:1], 32)[0].save(image_path)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[16:] = 255
    Image.fromarray(mask).save(mask_path)
    return image_path, mask_path


def test_generate_command_inpaints_with_the_pipeline(tmp_path, capsys):
    from test_cli import run_cli

    from rar_hf.commands.generate import DEFAULT_MODEL
    from rar_hf.pipeline_rar import RARPipeline

    image_path, mask_path = digit_files(tmp_path)
    argv = ["generate", "--image", str(image_path), "--mask_image", str(mask_path), "--class_labels", "3", "8",
            "--num_images_per_label", "2", "--seed", "4", "--output_dir", str(tmp_path / "pngs"),
            "--output_path", str(tmp_path / "grid.png")]  # fmt: skip
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    pipe = RARPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe([3, 8], image=Image.open(image_path), mask_image=Image.open(mask_path), num_images_per_prompt=2,
                    generator=torch.Generator().manual_seed(4))  # fmt: skip
    names = sorted(path.name for path in (tmp_path / "pngs").glob("*.png"))
    assert names == ["00_3_000.png", "00_3_001.png", "01_8_000.png", "01_8_001.png"]
    for name, image in zip(names, expected.images):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pngs" / name)), np.asarray(image))
    # The grid: a first row with the input and what it keeps, then one row per class.
    assert Image.open(tmp_path / "grid.png").height == 3 * (64 + 4) + 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image", "{image}"], "--image needs --mask_image"),
        (["--mask_image", "{mask}"], "--mask_image needs --image"),
        (["--image", "{missing}", "--mask_image", "{mask}"], "--image {missing}: no such file"),
        (["--image", "{image}", "--mask_image", "{text}"], "--mask_image {text} is not an image PIL can read"),
    ],
    ids=["no-mask", "no-image", "missing", "not-an-image"],
)
def test_generate_command_refuses_bad_inpainting_files_before_loading(tmp_path, capsys, monkeypatch, flags, message):
    from test_cli import assert_one_line_error, run_cli

    from rar_hf.commands import generate

    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the bad input was reported"))
    image_path, mask_path = digit_files(tmp_path)
    (tmp_path / "notes.png").write_text("not a picture")
    paths = dict(image=image_path, mask=mask_path, missing=tmp_path / "nope.png", text=tmp_path / "notes.png")
    code, _, err = run_cli(["generate", *[flag.format(**paths) for flag in flags], "--output_path", str(tmp_path / "g.png")], capsys)
    assert_one_line_error(code, err, message.format(**paths), prog="rar-hf generate")


# ------------------------------------------------------------------------------------------------ scripts
def test_the_readme_picture_script(tmp_path):
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "inpaint_digits.py"))
    output = tmp_path / "picture.png"
    script["main"](script["parse_args"](["--output_path", str(output)]))
    picture = Image.open(output)
    # one labelled row per example (64 px cells, 4 px gaps): input, mask, three completions
    assert picture.height == len(script["ROWS"]) * (64 + 4) + 4 and picture.width > 5 * (64 + 4)


def test_the_inpainting_benchmark_counts_half_the_steps_for_half_an_image(capsys):
    import runpy

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "inpainting.py"))
    args = bench["parse_args"](["--num_images", "6", "--seeds", "1", "--repeats", "1", "--speed_batch_sizes", "3"])
    summary, records = bench["main"](args)
    settings = [entry["setting"] for entry in summary]
    for kind in bench["MASK_KINDS"]:
        assert f"{kind}: completed, true label" in settings and f"{kind}: completed, wrong label" in settings
    assert all(0 <= entry["accuracy"][0] <= 1 for entry in summary)
    forwards = {record["setting"]: record["forwards"] for record in records}
    assert forwards["full image (no mask)"] == 64
    assert forwards["bottom half (raster prefix)"] == forwards["random half (32 tokens per row)"] == 32
    assert 16 <= forwards["random masks, 16-48 kept per row"] <= 48
    assert "| 3 | bottom half (raster prefix) | 32 |" in capsys.readouterr().out
