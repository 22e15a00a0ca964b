"""`xm serve` against hostile clients, on loopback only: slow clients (bounded in count per address
and in time per request, /healthz answering throughout), raw HTTP it must refuse (malformed request
lines, oversized heads, repeated Content-Length/Host), the bad inputs that once reached a 500, the
pixel budget, per-request isolation in an encoder batch, memory released after a batch, clip back's
filters (a memory with LAION's NSFW column, clip back's violence prompts), `--unhonoured refuse`,
`--workers 2`, and the OpenAPI description."""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import re
import signal
import socket
import struct
import threading
import time
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, TINY_WIDE, make_image
from test_server import Server, clip_client_payload
from xm.pipeline import BuildConfig, build_index

NSFW = ["UNLIKELY", "NSFW", "UNSURE", "UNLIKELY", "UNLIKELY", "NSFW", "UNLIKELY", "UNLIKELY", "UNSURE", "UNLIKELY"]
READ_TIMEOUT = 2.0
PENDING = 8


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is not an image: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _b64(img: Image.Image | bytes) -> str:
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        img = buf.getvalue()
    return base64.b64encode(img).decode()


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """An img2dataset download folder (files format) whose samples carry LAION's NSFW tag, built
    into an index: its caption store has the NSFW column clip back's safety filter reads."""
    root = tmp_path_factory.mktemp("limits")
    shard = root / "download" / "00000"
    shard.mkdir(parents=True)
    n = len(NSFW)
    (root / "download" / "00000_stats.json").write_text(json.dumps({"count": n, "successes": n, "status_dict": {"success": n}}))
    for i, tag in enumerate(NSFW):
        key = f"{i:09d}"
        make_image(500 + i).save(shard / f"{key}.jpg", quality=95)
        (shard / f"{key}.txt").write_text(f"picture number {i}")
        (shard / f"{key}.json").write_text(json.dumps({"url": f"http://127.0.0.1:9/{i}.jpg", "NSFW": tag}))
    build_index(BuildConfig(source=str(root / "download"), out=root / "lim", coarse=TINY, fine=TINY_WIDE, inference=[TINY]))
    from xm.memories import open_index

    mem = open_index(root / "lim")
    assert mem.rows([1], columns=("NSFW",))[0]["NSFW"] == "NSFW"
    # clip back's violence detector is two prompt embeddings; these make item 3's neighbourhood "violent"
    spec = mem.roles["coarse"]
    emb = mem.embeddings(spec, "image").gather(np.arange(mem.count))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    prompts = np.stack([emb.mean(0), emb[3]]).astype(np.float32)
    np.save(root / "violence.npy", prompts)
    return root, root / "lim", emb, prompts


@pytest.fixture(scope="module")
def server(laion):
    root, index, _, _ = laion
    s = Server(f"lim={index}", "--read-timeout", str(READ_TIMEOUT), "--max-pending-per-address", str(PENDING),
               "--concurrency", "1", "--violence-prompts", str(root / "violence.npy"))
    yield s
    log = s.stop()
    assert "Traceback" not in log, log


# --- raw HTTP -----------------------------------------------------------------------------------
def raw(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 10) -> tuple[int, dict[str, str], dict]:
    """Send bytes as they are; read the answer until the server closes or its body is whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        buf = b""
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
                headers = {k.lower(): v for k, v in headers.items()}
                if len(body) >= int(headers.get("content-length", 10**9)):
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return status, headers, json.loads(body) if "json" in headers.get("content-type", "") else {}


def test_raw_http_refusals_are_json(server) -> None:
    port = server.port
    cases = [
        ("a malformed request line", b"GARBAGE\r\n\r\n", 400, "malformed"),
        ("a request line with a bad version", b"GET / HTTP/9.9 extra\r\nHost: 127.0.0.1\r\n\r\n", 400, "malformed"),
        ("a header without a colon", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nnocolon\r\n\r\n", 400, "malformed"),
        ("an oversized header", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431, "KiB"),
        ("an endless request line", b"GET /" + b"a" * 40000, 431, "KiB"),
        ("Content-Length twice (same value)", b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                                              b"Content-Length: 2\r\n\r\n{}", 400, "content-length given twice"),
        ("Content-Length twice (other values)", b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                                                b"content-length: 9\r\n\r\n{}", 400, "content-length given twice"),
        ("Host twice", b"GET /indices-list HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", 400, "host given twice"),
        ("GET /knn-service", b"GET /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "not allowed"),
        ("chunked body", b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
         411, "chunked"),
    ]
    for what, data, status, needle in cases:
        got, headers, body = raw(port, data)
        assert got == status, (what, got, body)
        assert headers["content-type"].startswith("application/json"), what
        assert needle.lower() in body["error"].lower(), (what, body)
    assert raw(port, b"GET /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[1]["allow"] == "POST"
    assert server.request("GET", "/healthz")[0] == 200


def test_bad_inputs_are_4xx_json(laion, server) -> None:
    labels = ["a cat", "a dog"]
    img = _b64(make_image(1))
    thin = _png_header(200, 200_000)  # 40 MP: within the pixel limit, but CLIP's resize makes it 67,200 x 336 x 3 bytes
    def knn(**kw):
        return clip_client_payload(**kw, indice_name="lim")

    cases = [
        ("a huge JSON integer", "/knn-service", b'{"text": "x", "num_images": ' + b"1" * 5000 + b"}", 400, "malformed JSON"),
        ("a lone surrogate in a label", "/classify", json.dumps({"image": img, "labels": ["a\ud800", "b"]}), 400, "surrogate"),
        ("a lone surrogate in a text query", "/knn-service", json.dumps(knn(text="\udfff")), 400, "surrogate"),
        ("a template with two {}", "/classify", {"image": img, "labels": labels, "templates": ["a {} of a {}"]}, 400, "exactly one"),
        ("a template with a named field", "/classify", {"image": img, "labels": labels, "templates": ["{0.__class__}"]}, 400, "exactly one"),
        ("a template with an open brace", "/classify", {"image": img, "labels": labels, "templates": ["a { photo"]}, 400, "exactly one"),
        ("a 1xN image", "/knn-service", knn(image=_b64(Image.new("RGB", (1, 300)))), 413, "aspect ratio"),
        ("a thin 40 MP image", "/knn-service", knn(image=_b64(thin)), 413, "aspect ratio"),
        ("16 images over the request budget", "/classify", {"images": [_b64(_png_header(2000, 2500))] * 16, "labels": labels},
         413, "per request"),
    ]
    for what, path, body, status, needle in cases:
        t = time.perf_counter()
        got, headers, data = server.request("POST", path, body)
        assert got == status, (what, got, data)
        assert headers["content-type"].startswith("application/json"), what
        assert needle.lower() in data["error"].lower(), (what, data)
        assert time.perf_counter() - t < 5, what  # refused on the header, before any decoding or resizing
    for item in ("%C2%B2", "%D9%A1", "%EF%BC%91", "1e3"):  # superscript 2, Arabic-Indic 1, full-width 1: digits to str.isdigit
        got, headers, data = server.request("GET", f"/xm/image/lim/{item}")
        assert got == 404 and "no item" in data["error"], (item, data)
    # a valid template still classifies
    assert server.request("POST", "/classify", {"image": img, "labels": labels, "templates": ["a {c} here"]})[0] == 200


# --- slow clients ---------------------------------------------------------------------------------
class SlowClient(threading.Thread):
    """Sends a request head (or body) a few bytes at a time and records when the server gave up."""

    def __init__(self, port: int, source: str, body: bool = False) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        self.opened = time.monotonic()
        self.closed: float | None = None
        self.answer = b""
        self.body = body
        self.start()

    def run(self) -> None:
        head = b"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        self.sock.sendall(head + (b"Content-Length: 1000\r\n\r\n{" if self.body else b""))
        self.sock.settimeout(0.25)
        for _ in range(60):  # 15 s of dribbling, far past the read timeout
            try:
                self.sock.sendall(b" " if self.body else b"X-Slow: 1\r\n")
            except OSError:
                break
            try:
                chunk = self.sock.recv(4096)
                self.answer += chunk
                if not chunk:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        self.closed = time.monotonic()
        self.sock.close()


def _unfinished(server) -> int:
    text = server.request("GET", "/metrics")[2].decode()
    return int(float(re.search(r"^xm_unfinished_requests (\S+)$", text, re.M).group(1)))


def test_slow_clients_are_bounded_and_healthz_answers(server) -> None:
    attackers = [SlowClient(server.port, "127.0.0.2") for _ in range(30)]
    attackers += [SlowClient(server.port, "127.0.0.3", body=True) for _ in range(3)]
    t0 = time.monotonic()
    peak = 0
    while time.monotonic() - t0 < READ_TIMEOUT + 1:
        for source in ("127.0.0.1", "127.0.0.2"):  # a bystander, and the attackers' own address
            t = time.perf_counter()
            status, _, body = raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", source)
            assert status == 200 and body["status"] == "ok"
            assert time.perf_counter() - t < 2
        peak = max(peak, _unfinished(server))
        time.sleep(0.2)
    # in count: at most PENDING unfinished requests per address (two attacking addresses) at any time
    assert peak <= 2 * PENDING, peak
    for a in attackers:
        a.join(READ_TIMEOUT + 10)
        assert a.closed is not None
        # in time: every slow request got its 408 and was closed within the read deadline (and some slack)
        assert a.answer.startswith(b"HTTP/1.1 408"), a.answer[:80]
        assert a.closed - a.opened < READ_TIMEOUT + 2.5
    evicted = [a for a in attackers[:30] if a.closed - a.opened < READ_TIMEOUT * 0.8]
    assert len(evicted) >= 30 - PENDING - 1  # the oldest unfinished ones made room for newer clients
    assert b"from this address" in evicted[0].answer
    assert _unfinished(server) <= 1
    assert server.request("GET", "/healthz")[0] == 200


def test_many_whole_requests_from_one_address_are_never_refused(server) -> None:
    """Clients behind one address (a proxy, a benchmark) that send whole requests are not slow
    clients: four times the per-address cap of them at once all get their answer."""
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4 * PENDING)]
    for sock in socks:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    for sock in socks:
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:120]


def test_healthz_answers_while_every_slot_is_busy(laion, server) -> None:
    img = _b64(make_image(3))
    done: list[int] = []

    def work(i: int) -> None:
        body = {"image": img, "labels": [f"class {i} {j}" for j in range(40)], "method": "xmore"}
        done.append(server.request("POST", "/classify", body)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]  # --concurrency 1: five of them wait
    for t in threads:
        t.start()
    waits = []
    while any(t.is_alive() for t in threads):
        t = time.perf_counter()
        assert server.request("GET", "/healthz")[0] == 200
        waits.append(time.perf_counter() - t)
        time.sleep(0.05)
    assert done == [200] * 6
    assert waits and max(waits) < 2, waits


# --- the encoder batch ----------------------------------------------------------------------------
def test_one_bad_image_fails_only_its_own_request() -> None:
    from xm.server.batching import Batcher

    seen: list[int] = []

    def encode(items: list) -> np.ndarray:
        seen.append(len(items))
        if any(x < 0 for x in items):
            raise ValueError("cannot encode a negative item")
        return np.array([[float(x)] for x in items])

    b = Batcher("test", encode, max_items=32, wait_s=0.3)
    futures = [b.submit([1, 2]), b.submit([-1]), b.submit([3])]
    assert b([4]).tolist() == [[4.0]]
    assert futures[0].result(5).tolist() == [[1.0], [2.0]] and futures[2].result(5).tolist() == [[3.0]]
    with pytest.raises(ValueError, match="negative"):
        futures[1].result(5)
    assert seen[0] == 5 and seen[1:] == [2, 1, 1, 1]  # batched together first, then each request alone
    b.close()


def test_a_batch_is_released_once_delivered() -> None:
    from xm.server.batching import Batcher

    class Item:
        pass

    outputs: list[weakref.ref] = []

    def encode(items: list) -> np.ndarray:
        out = np.zeros((len(items), 4))
        outputs.append(weakref.ref(items[0]))
        return out

    b = Batcher("test", encode, max_items=8, wait_s=0.0)
    item = Item()
    ref = weakref.ref(item)
    b([item])
    del item
    time.sleep(0.2)  # the batching thread is now idle, waiting for the next job
    gc.collect()
    assert ref() is None and outputs[0]() is None  # nothing of the last batch is held until the next one
    b.close()


# --- clip back's filters, --unhonoured refuse, --workers --------------------------------------------
def _search(server, **fields) -> tuple[list[int], dict[str, str]]:
    status, headers, hits = server.request("POST", "/knn-service", {**clip_client_payload(), **fields})
    assert status == 200, hits
    return [h["id"] for h in hits], headers


def test_safety_and_violence_filters(laion, server) -> None:
    _, _, emb, prompts = laion
    query = dict(embedding_input=emb[3].tolist(), num_images=10, indice_name="lim", deduplicate=False)
    everything, headers = _search(server, **query, use_safety_model=False, use_violence_detector=False, aesthetic_score="")
    assert sorted(everything) == list(range(len(NSFW))) and headers["x-xm-unhonoured-options"] == "none"
    safe, headers = _search(server, **query, use_safety_model=True, use_violence_detector=False, aesthetic_score="")
    assert safe == [i for i in everything if NSFW[i] == "UNLIKELY"] and headers["x-xm-unhonoured-options"] == "none"
    violent = {i for i in range(len(NSFW)) if np.argmax(prompts @ emb[i]) == 1}
    assert 3 in violent and len(violent) < len(NSFW)
    calm, _ = _search(server, **query, use_safety_model=False, use_violence_detector=True, aesthetic_score="")
    assert calm == [i for i in everything if i not in violent]
    both, headers = _search(server, **query)  # ClipClient's defaults: both filters, and the aesthetic score
    assert both == [i for i in everything if i not in violent and NSFW[i] == "UNLIKELY"]
    assert headers["x-xm-unhonoured-options"] == "aesthetic_score"
    info = server.request("GET", "/xm/indices")[2]["lim"]
    assert info["filters"] == ["deduplicate", "use_safety_model", "use_violence_detector"]


@pytest.mark.slow  # starts two worker processes, each loading torch and the index (about a minute on 2 cores)
def test_unhonoured_refuse_and_worker_processes(laion) -> None:
    _, index, emb, _ = laion
    s = Server(f"lim={index}", "--unhonoured", "refuse", "--workers", "2")
    try:
        status, _, err = s.request("POST", "/knn-service", clip_client_payload(text="x", indice_name="lim"))
        assert status == 400 and "use_violence_detector, aesthetic_score" in err["error"]
        ok, _, hits = s.request("POST", "/knn-service", {**clip_client_payload(text="x", indice_name="lim"),
                                                                   "use_violence_detector": False, "aesthetic_score": ""})
        assert ok == 200 and all(NSFW[h["id"]] == "UNLIKELY" for h in hits)  # safety honoured from the NSFW column
        # two worker processes (children of xm serve) accept on the one port: whichever answers, killing
        # it leaves the port served (by the other, while the supervisor starts a new one)
        deadline = time.time() + 120
        while time.time() < deadline and len(workers := _spawned_children(s.proc.pid)) < 2:
            time.sleep(0.5)
        assert len(workers) == 2, workers
        first = s.request("GET", "/healthz")[2]["pid"]
        assert first in workers
        os.kill(first, signal.SIGKILL)
        status, _, body = s.request("GET", "/healthz")
        assert status == 200 and body["pid"] != first
        spec = s.request("GET", "/openapi.json")[2]
        assert {"/knn-service", "/metadata", "/indices-list", "/classify"} <= set(spec["paths"])
        assert spec["paths"]["/knn-service"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][
            "indice_name"]["enum"] == ["lim"]
        time.sleep(1)
        workers = _spawned_children(s.proc.pid)  # the survivor and the replacement the supervisor started
        assert workers and first not in workers
    finally:
        log = s.stop()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # no worker outlives xm serve
    assert "use_violence_detector cannot be honoured" in log and "refused (400)" in log
    assert "Traceback" not in log


def _spawned_children(parent: int) -> set[int]:
    """Processes multiprocessing spawned under `parent` (uvicorn's workers; not its resource tracker)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def test_openapi_is_served_without_a_token(server) -> None:
    status, _, spec = server.request("GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert "post" in spec["paths"]["/classify"] and "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]


def test_paths_never_leak(server, tmp_path: Path) -> None:
    """Errors name the problem, not the server's files."""
    status, _, body = server.request("POST", "/classify", {"image": _b64(b"not an image"), "labels": ["a", "b"]})
    assert status == 400 and "/" not in body["error"].replace("/classify", "")
