"""Reading any image a user or a dataset throws at us as 8-bit RGB."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from xm.errors import XMError, quoted

# A pixel limit for untrusted images: a 128-byte PNG can declare 50000 x 50000 pixels.
# 100 megapixels (10000 x 10000, about 0.3 GB as RGB) admits every photo a camera or LAION
# holds: decoding and preprocessing one raised peak RSS by 0.4 GB over a loaded ViT-B-32
# (1.78 GB against 1.39 GB, measured here), where a 20000 x 20000 image took 3.1 GB. PIL only
# refuses twice its limit, so we refuse anything over it ourselves, before decoding.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from grayscale, palette, RGBA/LA (on white), CMYK and 16/32-bit images."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(source: str | Path | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Decode an image file or bytes; raise XMError naming the file when it cannot."""
    label = quoted(name or (str(source) if isinstance(source, (str, Path)) else "<bytes>"))
    try:
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        with Image.open(source) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise XMError(f"{label}: {w}x{h} pixels is over the limit of {MAX_PIXELS // 1_000_000} megapixels (a decompression bomb?)")
            im.load()
            return to_rgb(im)
    except XMError:
        raise
    except Image.DecompressionBombError as exc:
        raise XMError(f"{label}: over the limit of {MAX_PIXELS // 1_000_000} megapixels (a decompression bomb?)") from exc
    except FileNotFoundError as exc:
        raise XMError(f"{label}: no such image file") from exc
    except IsADirectoryError as exc:
        raise XMError(f"{label}: is a directory, not an image") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as exc:
        # the library's message quotes the file name too, raw
        raise XMError(f"{label}: not a readable image ({quoted(str(exc).strip())[:300] if str(exc) else type(exc).__name__})") from exc
