"""Shared fixtures: tiny open_clip architectures, generated images, a loopback image server."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XM_OFFLINE", "1")  # tests send traffic to 127.0.0.1 only
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # Spark binds its driver and workers to loopback

# xm ships these tiny configs for tests and benchmarks (encoders/model_configs)
TINY = "xm-tiny-vit:random"
TINY_WIDE = "xm-tiny-vit-wide:random"
TINY_ROLES = dict(coarse=TINY, fine=TINY_WIDE, inference=[TINY])


def make_image(seed: int, size: int = 96, mode: str = "RGB") -> Image.Image:
    """A distinctive random-blocks image; different seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize((size, size), Image.NEAREST)
    return img.convert(mode) if mode != "RGB" else img


def near_duplicate(img: Image.Image, seed: int) -> Image.Image:
    """A mild augmentation: small crop, brightness jitter, and noise."""
    rng = np.random.default_rng(10_000 + seed)
    w, h = img.size
    dx, dy = rng.integers(0, max(1, w // 16), 2)
    crop = img.crop((dx, dy, w - max(1, w // 16) + dx, h - max(1, h // 16) + dy)).resize((w, h))
    arr = np.asarray(crop).astype(np.float32) * rng.uniform(0.9, 1.1) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}
    delay: float = 0.0  # seconds per response (a slow server, to interrupt a download mid-way)

    def do_GET(self) -> None:  # noqa: N802
        if self.delay:
            time.sleep(self.delay)
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png" if self.path.endswith(".png") else "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _serve(delay: float) -> Iterator[tuple[str, dict[str, bytes]]]:
    routes: dict[str, bytes] = {}
    handler = type("Handler", (_Handler,), {"routes": routes, "delay": delay})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def image_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """(base URL on 127.0.0.1, routes dict to fill with path -> bytes)."""
    yield from _serve(0.0)


@pytest.fixture
def slow_image_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """The same, answering each request after 0.2 s."""
    yield from _serve(0.2)


def write_caption_folder(folder: Path, n: int, caption=lambda i: f"caption number {i}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(i).save(folder / f"im{i:03d}.jpg")
        (folder / f"im{i:03d}.txt").write_text(caption(i))
    return folder
