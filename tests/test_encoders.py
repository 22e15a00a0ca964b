from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, make_image
from xm.encoders import EncoderSpec, load_encoder, load_image, to_rgb
from xm.errors import XMError


def test_spec_parsing_and_slug() -> None:
    spec = EncoderSpec.parse("ViT-B-32:openai")
    assert (spec.arch, spec.pretrained, str(spec)) == ("ViT-B-32", "openai", "ViT-B-32:openai")
    assert EncoderSpec.parse("RN50:/models/rn50.pt").is_path
    assert EncoderSpec.parse("RN50:random").is_random
    with pytest.raises(XMError, match="ARCH:PRETRAINED"):
        EncoderSpec.parse("ViT-B-32")


def test_random_init_is_deterministic_and_normalised() -> None:
    enc = load_encoder(TINY)
    texts = enc.encode_texts(["a photo of a cat.", "a photo of a cat.", "a red tram"])
    assert texts.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(texts[0], texts[1])
    assert not np.allclose(texts[0], texts[2])
    # same spec in a fresh load (no process cache) gives the same weights
    from xm.encoders import loader

    loader._loaded.clear()
    again = load_encoder(TINY)
    np.testing.assert_allclose(again.encode_texts(["a red tram"]), texts[2:], atol=1e-6)


def test_checkpoint_path_roundtrip(tmp_path) -> None:
    enc = load_encoder(TINY)
    ckpt = tmp_path / "tiny.pt"
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in enc.model.state_dict().items()}
    torch.save(state, ckpt)
    loaded = load_encoder(f"xm-tiny-vit:{ckpt}")
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert not loaded.fingerprint_matches(enc.probe())


def test_offline_tag_fails_in_one_line() -> None:
    with pytest.raises(XMError) as err:
        load_encoder("ViT-B-32:openai")
    msg = str(err.value)
    assert "\n" not in msg and "ViT-B-32:openai" in msg and "checkpoint" in msg


@pytest.mark.parametrize("bad", ["Nope-Arch:random", "ViT-B-32:not-a-tag", "ViT-B-32:/missing/file.pt"])
def test_bad_specs(bad: str) -> None:
    with pytest.raises(XMError):
        load_encoder(bad)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA"])
def test_image_modes_become_rgb(tmp_path, mode: str) -> None:
    img = make_image(1).convert(mode)
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size


def test_sixteen_bit_scaled_not_clipped(tmp_path) -> None:
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.max() >= 250 and rgb.min() <= 5 and len(np.unique(rgb[..., 0])) > 100


def test_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_images_name_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(XMError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(XMError, match="no such image"):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("spec", [TINY, "ViT-B-32:random"])
def test_text_encoding_skips_padding_exactly(spec: str) -> None:
    """Encoding only up to the longest caption of a batch equals open_clip's full 77-token pass."""
    enc = load_encoder(spec)
    assert enc._truncatable
    texts = ["a cat", "a photo of a very small red tram crossing an old stone bridge at dusk.", "x",
             " ".join(["word"] * 120), "", "a cat"]
    with torch.no_grad():
        reference = torch.nn.functional.normalize(enc.model.encode_text(enc.tokenizer(texts)).float(), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_texts(texts, batch_size=4), reference, atol=2e-5)
