import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rar_hf.convert import maskgit_vqgan_from_official_checkpoint
from rar_hf.modeling_maskgit_vqgan import MaskGITVQModel
from rar_hf.weights import load_state_dict_file

from conftest import official_vqgan_config

TINY = dict(hidden_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, latent_channels=8, codebook_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**overrides) -> MaskGITVQModel:
    torch.manual_seed(0)
    return MaskGITVQModel(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def official(vqgan_fixture_dir):
    config = official_vqgan_config(vqgan_fixture_dir)
    model = maskgit_vqgan_from_official_checkpoint(vqgan_fixture_dir / "tokenizer.bin", sample_size=config["resolution"])
    return model, load_file(vqgan_fixture_dir / "cases.safetensors"), config


@pytest.fixture(scope="module")
def official_state_dict(vqgan_fixture_dir):
    return load_state_dict_file(vqgan_fixture_dir / "tokenizer.bin")


@torch.no_grad()
def test_parity_with_official_outputs(official):
    model, cases, config = official
    assert model.downsample_factor == 2 ** (config["num_resolutions"] - 1)
    assert model.codebook_size == config["codebook_size"]
    encoded = model.encode(cases["images"])
    unclamped = model.decode(cases["codes"], clamp=False).sample
    decoded = model.decode(cases["codes"]).sample
    diffs = {
        "encoded": (encoded.latents - cases["encoded"]).abs().max().item(),
        "quantized": (encoded.quantized_latents - cases["quantized"]).abs().max().item(),
        "decoded_unclamped": (unclamped - cases["decoded_unclamped"]).abs().max().item(),
        "decoded": (decoded - cases["decoded"]).abs().max().item(),
    }
    print("\nMaskGIT-VQGAN parity max abs diffs:", {k: f"{v:.3g}" for k, v in diffs.items()})
    assert torch.equal(encoded.indices, cases["codes"])
    assert encoded.indices.dtype == torch.int64
    assert all(diff <= 1e-4 for diff in diffs.values()), diffs
    # forward (eval) reconstructs through the same path.
    torch.testing.assert_close(model(cases["images"]).sample, decoded, rtol=0, atol=1e-5)


def test_official_key_layout_is_preserved(official, official_state_dict):
    model, _, _ = official
    assert list(model.state_dict()) == list(official_state_dict)


@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(sample_size=32)
    images = torch.rand(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    loaded = MaskGITVQModel.from_pretrained(tmp_path).eval()
    assert loaded.config.channel_mult == [1, 1, 2] and loaded.config.sample_size == 32
    before, after = model.encode(images), loaded.encode(images)
    assert torch.equal(before.indices, after.indices)
    assert torch.equal(model.decode(before.indices).sample, loaded.decode(after.indices).sample)


@torch.no_grad()
def test_non_square_images():
    model = tiny_model(sample_size=(64, 96))
    images = torch.rand(2, 3, 64, 96)
    encoded = model.encode(images)
    assert encoded.latents.shape == (2, 8, 16, 24) and encoded.indices.shape == (2, 16 * 24)
    expected = model.decode_latents(encoded.quantized_latents).sample
    assert expected.shape == (2, 3, 64, 96)
    # The grid comes from config.sample_size, from latent_size, or from (B, h, w) indices.
    assert torch.equal(model.decode(encoded.indices).sample, expected)
    assert torch.equal(model.decode(encoded.indices, latent_size=(16, 24)).sample, expected)
    assert torch.equal(model.decode(encoded.indices.reshape(2, 16, 24)).sample, expected)
    # A token count that matches neither the config grid nor a square needs latent_size.
    with pytest.raises(ValueError, match="latent_size"):
        model.decode(encoded.indices[:, :-2])


@torch.no_grad()
def test_decode_in_slices_matches_single_pass():
    model = tiny_model(sample_size=16)
    indices = torch.randint(0, 16, (5, 16))
    at_once = model.decode(indices, decode_batch_size=5).sample
    # Convolution kernels may sum in a batch-size-dependent order: equal up to float32 rounding (~2e-6).
    assert torch.allclose(model.decode(indices, decode_batch_size=2).sample, at_once, atol=1e-5)
    assert torch.allclose(tiny_model(sample_size=16, decode_batch_size=1).decode(indices).sample, at_once, atol=1e-5)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(1, 4, 16, 16), "must have 3 channels, got 4"),
        (torch.rand(1, 3, 16, 18), "divisible by the downsampling factor 4, got 16x18"),
        (torch.rand(1, 3, 16, 16) * 2 - 1, r"must be in \[0, 1\] \(not \[-1, 1\]\)"),
        (torch.rand(3, 16, 16), r"shape \(batch, channels, height, width\)"),
    ],
)
def test_bad_images_raise(images, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().encode(images)


def test_small_pixel_overshoot_is_tolerated():
    tiny_model().encode(torch.rand(1, 3, 16, 16).clamp(0, 1) + 5e-4)


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.full((1, 16), 16), r"must be in \[0, 16\)"),
        (torch.full((1, 16), -1), r"must be in \[0, 16\)"),
        (torch.zeros(16, dtype=torch.long), r"shape \(batch, h \* w\)"),
        (torch.zeros(1, 16), "integer tensor"),
    ],
)
def test_bad_indices_raise(indices, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().decode(indices)


def test_bad_latents_and_grid_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"shape \(batch, 8, h, w\)"):
        model.decode_latents(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"latent_size \(3, 5\) holds 15 tokens"):
        model.decode(torch.zeros(1, 16, dtype=torch.long), latent_size=(3, 5))


def test_conversion_infers_config_and_strips_prefix(official_state_dict, vqgan_fixture_dir):
    prefixed = {f"module.{key}": value for key, value in official_state_dict.items()}
    model = maskgit_vqgan_from_official_checkpoint(prefixed)
    official = official_vqgan_config(vqgan_fixture_dir)
    expected = dict(
        hidden_channels=official["hidden_channels"],
        channel_mult=official["channel_mult"],
        num_res_blocks=official["num_res_blocks"],
        latent_channels=official["z_channels"],
    )
    assert {key: model.config[key] for key in expected} == expected
    assert model.config.codebook_size == official["codebook_size"] and not model.training


def test_conversion_rejects_mismatched_state_dicts(official_state_dict):
    missing = dict(official_state_dict)
    # A channel-changing decoder block: its shortcut is the one key that shapes alone would not reveal as missing.
    shortcut = next(key for key in official_state_dict if key.startswith("decoder.up.") and "nin_shortcut.weight" in key)
    del missing[shortcut]
    with pytest.raises(ValueError, match=r"missing: \[" + re.escape(repr(shortcut)) + r"\]"):
        maskgit_vqgan_from_official_checkpoint(missing)

    extra = {**official_state_dict, "encoder.conv_in.bias": torch.zeros(32)}
    with pytest.raises(ValueError, match=r"unexpected: \['encoder\.conv_in\.bias'\]"):
        maskgit_vqgan_from_official_checkpoint(extra)

    reshaped = {**official_state_dict, "decoder.conv_in.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"decoder\.conv_in\.bias: checkpoint \(7,\) vs expected"):
        maskgit_vqgan_from_official_checkpoint(reshaped)

    with pytest.raises(ValueError, match="Not an official MaskGIT-VQGAN checkpoint: it lacks"):
        maskgit_vqgan_from_official_checkpoint({"quantize.embedding.weight": torch.zeros(4, 2)})


def test_conversion_file_errors(tmp_path, rar_fixture_dir):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        maskgit_vqgan_from_official_checkpoint(tmp_path / "nope.bin")

    full = tmp_path / "full.bin"
    torch.save(tiny_model().state_dict(), full)
    assert maskgit_vqgan_from_official_checkpoint(full).config.channel_mult == [1, 1, 2]
    truncated = tmp_path / "truncated.bin"
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.bin is not a readable official MaskGIT-VQGAN checkpoint"):
        maskgit_vqgan_from_official_checkpoint(truncated)
    with pytest.raises(ValueError, match="Not an official MaskGIT-VQGAN checkpoint"):  # the generator given instead
        maskgit_vqgan_from_official_checkpoint(rar_fixture_dir / "generator.bin")


def test_official_loading_lives_in_convert_only():
    # One way to load official checkpoints, for both models: functions in rar_hf.convert.
    assert not hasattr(MaskGITVQModel, "from_official_checkpoint")


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    model = MaskGITVQModel(
        hidden_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=8, codebook_size=32
    ).train()
    # Smooth images (ramps and flat channels), 2 x 3 x 16 x 16 pixels.
    grid = torch.linspace(0, 1, 16)
    images = torch.stack(
        [
            torch.stack([grid.expand(16, 16), grid.expand(16, 16).t(), torch.full((16, 16), 0.3)]),
            torch.stack([1 - grid.expand(16, 16), torch.full((16, 16), 0.7), grid.expand(16, 16).t()]),
        ]
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(images)
        reconstruction = F.mse_loss(out.sample, images)
        assert torch.isclose(out.quantizer_loss, out.codebook_loss + out.commitment_loss)
        optimizer.zero_grad()
        (reconstruction + out.quantizer_loss).backward()
        optimizer.step()
        losses.append(reconstruction.item())
    # The straight-through estimator lets the reconstruction loss reach the encoder.
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    print(f"\nreconstruction mse: step 0 {losses[0]:.4f} -> last 5 mean {sum(losses[-5:]) / 5:.4f}")
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
