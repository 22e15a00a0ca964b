"""`xm serve`: clip back's API answered as clip back answers it, /classify as `xm classify --json`,
the web page in a real headless browser, bad requests, a remote memory, `xm export clip-back`."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_WIDE, make_image, near_duplicate
from xm.classify import Classifier
from xm.encoders import load_encoder
from xm.methods.retrieval import search_memory
from xm.pipeline import BuildConfig, build_index

CLASSES = ["red fox", "blue tram", "green parrot", "stone bridge"]
N_QUERIES = 8
OPTS = {"k_coarse": 3, "k_fine": 2}
# the launcher works whether or not cli/app.py registers these modules
LAUNCH = "import xm.cli.serve_cmd, xm.cli.export_cmd; from xm.cli.app import main; main()"
TOKEN = "test-token-0123456789abcdef"
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)
SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "out" / "server-page.png"
SCREENS = Path(os.environ.get("XM_SCREENS", "/work/screens"))  # where the browser test leaves its screenshots


def xm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """Queries, a memory of their near-duplicates captioned with their class, distractors.
    The coarse encoder is a checkpoint file (so the index can be exported to clip back)."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "coarse.pt"
    torch.save(load_encoder(TINY).model.state_dict(), ckpt)
    qdir, mdir = root / "queries", root / "memory"
    qdir.mkdir()
    mdir.mkdir()
    queries, labels = [], []
    for i in range(N_QUERIES):
        y = i % len(CLASSES)
        img = make_image(i)
        queries.append(qdir / f"q{i}.jpg")
        img.save(queries[-1], quality=95)
        labels.append(y)
        for j in range(3):
            near_duplicate(img, 100 * i + j).save(mdir / f"m{i}_{j}.jpg", quality=95)
            (mdir / f"m{i}_{j}.txt").write_text(f"{['a photo of a', 'my', 'the'][j]} {CLASSES[y]} {j}")
    for i in range(12):
        make_image(900 + i).save(mdir / f"z{i}.jpg")
        (mdir / f"z{i}.txt").write_text(f"holiday snapshot {i}")
    build_index(BuildConfig(source=str(mdir), out=root / "mem", coarse=f"{TINY.split(':')[0]}:{ckpt}", fine=TINY_WIDE,
                            inference=[TINY], shards=2))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root, root / "mem", queries, labels


class Server:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening on ") or not line and self.proc.poll() is not None:
                break
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"xm serve did not start: {''.join(self.stderr)}")
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def request(self, method: str, path: str, body: bytes | str | dict | list | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        headers = dict(headers or {})
        if headers.pop("X-Test-No-Length", None):  # http.client would add Content-Length: 0
            conn.putrequest(method, path)
            conn.endheaders()
        else:
            conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type", "")
        data = json.loads(raw) if "json" in ctype else raw
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return "".join(self.stderr)


@pytest.fixture(scope="module")
def server(memory):
    _, index, _, _ = memory
    s = Server(f"mem={index}")
    yield s
    log = s.stop()
    assert "Traceback" not in log, log  # no request, good or bad, reached an unhandled exception


def clip_client_payload(**query) -> dict:
    """Exactly what clip-retrieval's ClipClient posts (its defaults)."""
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "mem", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 40, "num_result_ids": 40}
    body.update(query)
    return body


def dedup_reference(memory_index, hits: list[dict], modality: str) -> list[int]:
    """clip back's deduplicate, written out: keep a result unless it is connected (cosine >= 0.94,
    transitively) to a better-ranked one."""
    ids = [h["id"] for h in hits]
    e = memory_index.embeddings(memory_index.roles["coarse"], modality).gather(np.array(ids))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    adj = (e @ e.T) >= 0.94
    group = list(range(len(ids)))
    changed = True
    while changed:
        changed = False
        for a in range(len(ids)):
            for b in range(len(ids)):
                if adj[a, b] and group[b] > group[a]:
                    group[b] = group[a]
                    changed = True
    return [ids[i] for i in range(len(ids)) if group[i] == i]


def test_clip_client_payloads_equal_xm_search(memory, server) -> None:
    from xm.memories import open_index

    root, index, queries, _ = memory
    mem = open_index(index)
    b64 = base64.b64encode(queries[1].read_bytes()).decode()
    cases = [("text", {"text": "my blue tram 1"}, {"text": "my blue tram 1"}),
             ("image", {"image": b64}, {"image": queries[1]})]
    for _kind, payload, query in cases:
        for modality in ("image", "text"):
            want = search_memory(mem, k=40, modality=modality, **query)
            # ClipClient's own payload: deduplicate and both safety flags on
            status, headers, got = server.request("POST", "/knn-service", json.dumps(clip_client_payload(modality=modality, **payload)))
            assert status == 200, got
            assert headers["x-xm-unhonoured-options"] == "use_safety_model, use_violence_detector, aesthetic_score"
            assert [r["id"] for r in got] == dedup_reference(mem, want, modality)
            by_id = {h["id"]: h for h in want}
            for r in got:
                h = by_id[r["id"]]
                assert r["similarity"] == pytest.approx(h["similarity"], abs=1e-6)
                assert (r["caption"], r["url"], r["source_id"]) == (h["caption"], h["url"], h["source_id"])
                assert list(r)[-2:] == ["id", "similarity"]  # the metadata columns, then id and similarity
            # without de-duplication: the whole of xm search, in order
            status, headers, got = server.request("POST", "/knn-service", clip_client_payload(
                modality=modality, deduplicate=False, use_safety_model=False, use_violence_detector=False,
                aesthetic_score="", aesthetic_weight="", **payload))
            assert status == 200 and headers["x-xm-unhonoured-options"] == "none"
            assert [r["id"] for r in got] == [h["id"] for h in want]
            assert [r["similarity"] for r in got] == pytest.approx([h["similarity"] for h in want], abs=1e-6)
    # and the `xm search` command itself
    cli = xm("search", str(index), "--text", "my blue tram 1", "-k", "40", "--json")
    assert cli.returncode == 0, cli.stderr
    want = [json.loads(line) for line in cli.stdout.splitlines()]
    _, _, got = server.request("POST", "/knn-service", clip_client_payload(text="my blue tram 1", deduplicate=False))
    assert [(r["id"], r["caption"]) for r in got] == [(h["id"], h["caption"]) for h in want]
    # num_result_ids beyond num_images: the rest carry id and similarity only, as in clip back
    _, _, got = server.request("POST", "/knn-service", clip_client_payload(text="tram", deduplicate=False, num_images=3,
                                                                           num_result_ids=10))
    assert len(got) == 10 and all("caption" in r for r in got[:3]) and all(set(r) == {"id", "similarity"} for r in got[3:])
    # embedding_input: a query embedding instead of a text or an image
    vec = load_encoder(mem.roles["coarse"]).encode_texts(["my blue tram 1"])[0].tolist()
    _, _, got = server.request("POST", "/knn-service", clip_client_payload(embedding_input=vec, deduplicate=False))
    assert [r["id"] for r in got] == [h["id"] for h in search_memory(mem, text="my blue tram 1", k=40)]


def test_metadata_and_indices_list_in_clip_back_shapes(memory, server) -> None:
    from xm.memories import open_index

    mem = open_index(memory[1])
    status, _, names = server.request("GET", "/indices-list")
    assert status == 200 and names == ["mem"]
    status, _, got = server.request("POST", "/metadata", {"ids": [5, 0, 5], "indice_name": "mem"})
    assert status == 200
    rows = mem.store.fetch([5, 0, 5])
    assert got == [{"id": i, "metadata": {k: v for k, v in r.items() if k != "id"}} for i, r in zip([5, 0, 5], rows)]
    assert server.request("POST", "/metadata", {"ids": [], "indice_name": "mem"})[2] == []
    status, _, health = server.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and b'xm_requests_total{endpoint="/knn-service",status="200"}' in text
    assert b"xm_request_seconds_bucket" in text


def _classify_json(server: Server, image: Path, opts: dict = OPTS, **fields) -> dict:
    body = {"image": base64.b64encode(image.read_bytes()).decode(), "labels": CLASSES, "method": "xmore", **opts, **fields}
    status, headers, got = server.request("POST", "/classify", body)
    assert status == 200, got
    return got


def test_classify_equals_cli_json(memory, server) -> None:
    root, index, queries, labels = memory
    for method in ("xmore", "clip", "captions"):
        opts = [] if method == "clip" else ["--k-coarse", "3", "--k-fine", "2"]
        cli = xm("classify", str(queries[2]), "--labels", str(root / "classes.txt"), "--index", str(index),
                 "--method", method, "--json", "--explain", *opts)
        assert cli.returncode == 0, cli.stderr
        want = json.loads(cli.stdout)
        want.pop("image")
        want.pop("device")  # where the CLI ran (the server says its device once, at start)
        got = _classify_json(server, queries[2], opts={} if method == "clip" else OPTS, method=method)
        assert _approx_equal(got, want)
    # caption_prefix "": the authors' prefix swamps what the tiny random text tower reads in a caption
    got = _classify_json(server, queries[2], opts={**OPTS, "caption_prefix": ""})
    assert got["prediction"] == CLASSES[labels[2]] and len(got["captions"]) == 2
    # multipart: the image as a file, the labels as a file's text
    boundary = "xmtestboundary"
    parts = [("image", "q.jpg", queries[2].read_bytes()), ("labels", "classes.txt", (root / "classes.txt").read_bytes()),
             ("k_coarse", None, b"3"), ("k_fine", None, b"2"), ("caption_prefix", None, b"")]
    body = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    status, _, multi = server.request("POST", "/classify", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, multi
    assert _approx_equal(multi, got)


def _approx_equal(a, b, rel: float = 1e-6) -> bool:
    if isinstance(a, dict):
        assert set(a) == set(b), (set(a) ^ set(b))
        return all(_approx_equal(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_approx_equal(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9)
        return True
    assert a == b
    return True


def test_stream_ids_keep_state_per_client(memory, server) -> None:
    _, index, queries, _ = memory
    whole = list(Classifier(index, CLASSES, options=OPTS).run(queries[:3]))
    first = [_classify_json(server, q, stream="client-a") for q in queries[:3]]
    other = _classify_json(server, queries[0], stream="client-b")
    alone = _classify_json(server, queries[1])
    assert [r["stream_position"] for r in first] == [1, 2, 3] and other["stream_position"] == 1
    assert alone["stream_position"] == 1
    for a, b in zip(whole, first):  # the server's stream is the CLI's stream
        assert a["weights"] == pytest.approx(b["weights"]) and a["prediction"] == b["prediction"]
    status, headers, conflict = server.request("POST", "/classify", {
        "image": base64.b64encode(queries[0].read_bytes()).decode(), "labels": CLASSES[:3], **OPTS, "stream": "client-a"})
    assert status == 409 and "another index, label set" in conflict["error"]
    # a server-minted stream id comes back in the header, and continues when sent back
    body = {"image": base64.b64encode(queries[0].read_bytes()).decode(), "labels": CLASSES, **OPTS, "stream": True}
    status, headers, r1 = server.request("POST", "/classify", body)
    sid = headers["x-xm-stream"]
    status, _, r2 = server.request("POST", "/classify", {**body, "stream": None}, {"X-XM-Stream": sid})
    assert (r1["stream_position"], r2["stream_position"]) == (1, 2)


def _bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def test_bad_requests_are_4xx_json(memory, server) -> None:
    _, _, queries, _ = memory
    img = base64.b64encode(queries[0].read_bytes()).decode()
    knn = clip_client_payload
    cls = lambda **kw: {"image": img, "labels": CLASSES, **OPTS, **kw}  # noqa: E731
    cases = [
        ("malformed JSON", "POST", "/knn-service", b'{"text": "x",', {}, 400, "malformed JSON"),
        ("JSON that is not an object", "POST", "/knn-service", b'["text"]', {}, 400, "JSON object"),
        ("body not UTF-8", "POST", "/knn-service", b'{"text": "\xff\xfe"}', {}, 400, "UTF-8"),
        ("JSON nested too deeply", "POST", "/knn-service", b"[" * 100000 + b"]" * 100000, {}, 400, "JSON"),
        ("unknown indice_name", "POST", "/knn-service", knn(text="x", indice_name="nope"), {}, 404, "unknown"),
        ("indice_name of the wrong type", "POST", "/knn-service", knn(text="x", indice_name=3), {}, 400, "indice_name"),
        ("undecodable base64", "POST", "/knn-service", knn(image="not base64!!"), {}, 400, "base64"),
        ("base64 of a non-image", "POST", "/knn-service", knn(image=base64.b64encode(b"hello").decode()), {}, 400, "not a readable image"),
        ("decompression bomb", "POST", "/knn-service", knn(image=base64.b64encode(_bomb_png()).decode()), {}, 413, "pixel"),
        ("num_images of the wrong type", "POST", "/knn-service", knn(text="x", num_images="40"), {}, 400, "integer"),
        ("num_images as a boolean", "POST", "/knn-service", knn(text="x", num_images=True), {}, 400, "integer"),
        ("num_images over the limit", "POST", "/knn-service", knn(text="x", num_images=10**7), {}, 400, "outside"),
        ("num_result_ids below 1", "POST", "/knn-service", knn(text="x", num_result_ids=0), {}, 400, "outside"),
        ("unknown modality", "POST", "/knn-service", knn(text="x", modality="audio"), {}, 400, "modality"),
        ("no query", "POST", "/knn-service", knn(), {}, 400, "exactly one"),
        ("two queries", "POST", "/knn-service", knn(text="x", image=img), {}, 400, "exactly one"),
        ("text of the wrong type", "POST", "/knn-service", knn(text=["x"]), {}, 400, "text"),
        ("text over the limit", "POST", "/knn-service", knn(text="x" * 5000), {}, 413, "characters"),
        ("embedding of the wrong size", "POST", "/knn-service", knn(embedding_input=[0.1, 0.2]), {}, 400, "dimension"),
        ("embedding of non-numbers", "POST", "/knn-service", knn(embedding_input=["a"]), {}, 400, "numbers"),
        ("deduplicate of the wrong type", "POST", "/knn-service", knn(text="x", deduplicate="yes"), {}, 400, "true or false"),
        ("aesthetic_score of the wrong type", "POST", "/knn-service", knn(text="x", aesthetic_score=[9]), {}, 400, "aesthetic_score"),
        ("image_url without --allow-url-fetch", "POST", "/knn-service", knn(image_url="http://127.0.0.1:9/x.jpg"), {}, 403, "allow-url-fetch"),
        ("body over the size limit", "POST", "/knn-service", None, {"Content-Length": str(64 << 20)}, 413, "limit"),
        ("no Content-Length", "POST", "/knn-service", None, {"X-Test-No-Length": "1"}, 411, "Content-Length"),
        ("unknown endpoint", "GET", "/etc/passwd", None, {}, 404, "no such endpoint"),
        ("unsupported HTTP method", "PUT", "/knn-service", b"{}", {}, 405, "not allowed"),
        ("GET on a POST endpoint (clip back answers 405)", "GET", "/knn-service", None, {}, 405, "not allowed"),
        ("metadata ids not a list", "POST", "/metadata", {"ids": 3, "indice_name": "mem"}, {}, 400, "list"),
        ("metadata id out of range", "POST", "/metadata", {"ids": [0, 10**9], "indice_name": "mem"}, {}, 400, "outside"),
        ("metadata id not an integer", "POST", "/metadata", {"ids": ["0"], "indice_name": "mem"}, {}, 400, "not an integer"),
        ("classify without an image", "POST", "/classify", {"labels": CLASSES}, {}, 400, "image"),
        ("classify with one label", "POST", "/classify", cls(labels=["cat"]), {}, 400, "two"),
        ("classify with duplicate labels", "POST", "/classify", cls(labels=["Cat", "cat "]), {}, 400, "same class"),
        ("classify with labels of the wrong type", "POST", "/classify", cls(labels=[1, 2]), {}, 400, "labels"),
        ("classify with an unknown method", "POST", "/classify", cls(method="nope"), {}, 400, "unknown"),
        ("classify with an unknown option", "POST", "/classify", cls(k_cosmic=3), {}, 400, "does not take"),
        ("classify with an option of the wrong type", "POST", "/classify", cls(k_fine="many"), {}, 400, "k_fine"),
        ("classify with a server file as option", "POST", "/classify", cls(method="reco", checkpoint="/etc/passwd"), {}, 403, "file on the server"),
        ("classify with a foreign encoder", "POST", "/classify", cls(model="ViT-L-14:openai"), {}, 400, "not an encoder"),
        ("classify with an option over the limit", "POST", "/classify", cls(overfetch=10**9), {}, 400, "limit"),
        ("classify with a bad stream id", "POST", "/classify", cls(stream="../../x"), {}, 400, "stream"),
        ("classify with too many images", "POST", "/classify", {"images": [img] * 17, "labels": CLASSES}, {}, 413, "limit"),
        ("classify a few-shot method", "POST", "/classify", cls(method="tip-adapter"), {}, 400, "few-shot"),
        ("multipart without a boundary", "POST", "/classify", b"x", {"Content-Type": "multipart/form-data"}, 400, "multipart"),
        ("image path escaping the memory", "GET", "/xm/image/mem/..%2F..%2F..%2Fetc%2Fpasswd", None, {}, 404, ""),
        ("image of a non-numeric item", "GET", "/xm/image/mem/..", None, {}, 404, "no item"),
        ("image of an unknown item", "GET", "/xm/image/mem/999999", None, {}, 404, "no item"),
        ("a foreign Host (DNS rebinding)", "GET", "/indices-list", None, {"Host": "evil.example:1234"}, 421, "Host"),
    ]
    assert len(cases) >= 15
    for what, method, path, body, headers, status, needle in cases:
        got_status, got_headers, got = server.request(method, path, body, headers)
        assert got_status == status, (what, got_status, got)
        assert got_headers["content-type"].startswith("application/json"), what
        assert isinstance(got, dict) and needle.lower() in got["error"].lower(), (what, got)
        assert "Traceback" not in got["error"], what
    assert server.request("GET", "/healthz")[0] == 200  # still serving


def test_auth_host_and_token(memory, tmp_path) -> None:
    _, index, _, _ = memory
    refused = xm("serve", str(index), "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "--token-file" in refused.stderr
    assert len([line for line in refused.stderr.splitlines() if line.startswith("xm: error")]) == 1
    (tmp_path / "token").write_text("short\n")
    weak = xm("serve", str(index), "--token-file", str(tmp_path / "token"), "--port", "0")
    assert weak.returncode == 2 and "at least 16 characters" in weak.stderr
    (tmp_path / "token").write_text(TOKEN + "\n")
    s = Server(f"mem={index}", "--token-file", str(tmp_path / "token"))
    try:
        assert s.request("GET", "/indices-list")[0] == 401
        assert s.request("GET", "/indices-list", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, _, names = s.request("GET", "/indices-list", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and names == ["mem"]
        assert s.request("GET", f"/indices-list?token={TOKEN}")[0] == 200  # for ClipClient, which takes only a URL
        assert s.request("POST", "/knn-service", clip_client_payload(text="x"))[0] == 401
        assert s.request("GET", "/")[0] == 200 and s.request("GET", "/healthz")[0] == 200  # no data: open
        # a token server answers any Host: the token is what guards it
        assert s.request("GET", "/indices-list", headers={"Authorization": f"Bearer {TOKEN}", "Host": "xm.example"})[0] == 200
    finally:
        s.stop()


def test_remote_memory_classifies_as_local(memory, server, monkeypatch, tmp_path) -> None:
    from xm.memories import RemoteMemory

    monkeypatch.setenv("XM_CACHE_DIR", str(tmp_path / "cache"))
    _, index, queries, _ = memory
    remote = RemoteMemory(f"{server.url}/?indice_name=mem")
    assert remote.roles == Classifier(index, CLASSES).memory.roles and remote.count == N_QUERIES * 3 + 12
    local = list(Classifier(index, CLASSES, options=OPTS).run(queries, explain=True))
    got = list(Classifier(remote, CLASSES, options=OPTS).run(queries, explain=True))
    for a, b in zip(local, got):  # caption embeddings computed here, in other batches than the build's: float noise
        assert _approx_equal({k: v for k, v in b.items() if k != "timings"}, {k: v for k, v in a.items() if k != "timings"},
                             rel=1e-3)
    remote.close()
    assert list((tmp_path / "cache" / "remote-captions").glob("*.npz"))  # the caption embeddings are cached on disk
    # a clip back that is not xm's must be told its encoder
    with pytest.raises(Exception, match="indice"):
        RemoteMemory(f"{server.url}/?indice_name=other")


def _classify_takes_urls() -> bool:
    import inspect

    from xm.cli import classify_cmd

    return "Path" not in str(inspect.signature(classify_cmd.classify_cmd).parameters["index"].annotation)


@pytest.mark.skipif(not _classify_takes_urls(), reason="xm classify --index is still a Path (see the server report)")
def test_cli_classify_with_a_remote_index(memory, server, tmp_path) -> None:
    root, index, queries, _ = memory
    args = ["classify", str(queries[0]), str(queries[1]), "--labels", str(root / "classes.txt"), "--json", "--explain",
            "--k-coarse", "3", "--k-fine", "2"]
    env = {**os.environ, "XM_CACHE_DIR": str(tmp_path)}
    local = xm(*args, "--index", str(index), env=env)
    remote = xm(*args, "--index", f"{server.url}/?indice_name=mem", env=env)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    for a, b in zip(local.stdout.splitlines(), remote.stdout.splitlines()):
        assert _approx_equal(json.loads(b), json.loads(a), rel=1e-3)


def test_export_clip_back(memory, tmp_path) -> None:
    import faiss
    import pyarrow.parquet as pq

    from xm.memories import open_index

    _, index, _, _ = memory
    mem = open_index(index)
    out = tmp_path / "clip-back"
    r = xm("export", "clip-back", str(index), str(out), "--json")
    assert r.returncode == 0, r.stderr
    info, r_err = json.loads(r.stdout), r.stderr
    spec = mem.roles["coarse"]
    arch, ckpt = spec.split(":", 1)
    indices = json.loads((out / "indices_paths.json").read_text())
    assert indices["mem"]["clip_model"] == f"open_clip:{arch}/{Path(ckpt).resolve()}"
    assert indices["mem"]["indice_folder"] == str(out.resolve())
    assert len(mem.index_entry(spec, "image").shards) == 2  # the merge is exercised
    for modality in ("image", "text"):
        merged = faiss.read_index(str(out / f"{modality}.index"))
        assert merged.ntotal == mem.count
        q = mem.embeddings(spec, modality).gather(np.arange(mem.count))
        d1, i1 = mem.search(modality, q, mem.count, encoder=spec)
        d2, i2 = merged.search(q, mem.count)
        assert np.allclose(d1, d2, atol=1e-5)
        for r in range(mem.count):  # the same answers; tied similarities may come in another order
            assert sorted(zip(np.round(d1[r], 5), i1[r])) == sorted(zip(np.round(d2[r], 5), i2[r]))
    files = sorted((out / "metadata").glob("*.parquet"))
    table = pq.read_table(files[0]) if len(files) == 1 else None
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    assert len(rows) == mem.count and "id" not in rows[0]
    assert [r["caption"] for r in rows] == [r["caption"] for r in mem.store.fetch(np.arange(mem.count))]
    # image_path relative to the source, as `xm serve` gives it; clip back's 0.0.0.0 is warned about
    assert [r["image_path"] for r in rows] == [r["image_path"] for r in mem.store.fetch(np.arange(mem.count))]
    assert table is None or not Path(rows[0]["image_path"]).is_absolute()
    warnings = [line for line in r_err.splitlines() if line.startswith("xm: warning")]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "every network interface" in warnings[0]
    assert info["count"] == mem.count
    # random weights: refused in one line
    rand = tmp_path / "random"
    shutil.copytree(index, rand)
    m = json.loads((rand / "manifest.json").read_text())
    m["roles"]["coarse"] = TINY
    (rand / "manifest.json").write_text(json.dumps(m))
    r = xm("export", "clip-back", str(rand), str(tmp_path / "out2"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("xm: error")]
    assert r.returncode == 2 and len(errors) == 1 and "random weights" in errors[0]


# --- the web page in a real headless browser ------------------------------------------------
class Chromium:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fds 3 and 4; no websocket)."""

    def __init__(self, profile: Path) -> None:
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def fds() -> None:
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [CHROMIUM, "--headless=new", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--mute-audio",
                f"--user-data-dir={profile}", "--window-size=1280,1400"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")
        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next = 0
        self._buf = b""
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 30) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            import select

            ready, _, _ = select.select([self._r], [], [], 0.5)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buf += chunk
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.navigate", {"url": url})

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 60) -> object:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = self.eval(expr)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expr)

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); the page test needs a real browser")
def test_web_page_in_headless_chromium(memory, server, tmp_path) -> None:
    _, _, queries, labels = memory
    # the screenshot shows a query the tiny random encoders get right, when there is one
    query = next((q for q, y in zip(queries, labels) if _classify_json(server, q)["prediction"] == CLASSES[y]), queries[3])
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait("document.body && document.body.dataset.ready === '1'")
        assert browser.eval("document.querySelector('#indice').value") == "mem"
        assert "xmore" in browser.eval("[...document.querySelectorAll('#method option')].map(o => o.value)")
        # upload an image the way a person does: through the file input
        doc = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", {"nodeId": doc, "selector": "#image-input"})["nodeId"]
        browser.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(query)]})
        browser.wait("!document.querySelector('#preview').hidden")
        browser.eval(f"document.querySelector('#labels').value = {json.dumps(chr(10).join(CLASSES))}")
        browser.eval("document.querySelector('#options').value = 'k_coarse=3\\nk_fine=2'")
        browser.eval("document.querySelector('#classify-button').click()")
        browser.wait("document.body.dataset.result === 'shown'")
        want = _classify_json(server, query)  # what the API answers for the same upload
        assert browser.eval("document.querySelector('#prediction').textContent") == want["prediction"]
        captions = browser.eval("[...document.querySelectorAll('#captions li p:first-child')].map(p => p.textContent)")
        assert captions == [c["caption"] for c in want["captions"]] and len(captions) == 2
        # the captions' images: their local source files, fetched from /xm/image
        browser.wait("[...document.querySelectorAll('#captions img')].every(i => i.complete && i.naturalWidth > 0)")
        assert browser.eval("document.querySelectorAll('#top5 tbody tr').length") == len(CLASSES)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
        # the memory browser: a text search, results as a grid, the query in the URL
        browser.eval("document.querySelector('[data-tab=browse]').click()")
        browser.eval(f"document.querySelector('#browse-text').value = {json.dumps(CLASSES[0])}")
        browser.eval("document.querySelector('#browse-modality').value = 'text'")
        browser.eval("document.querySelector('#browse-dedup').checked = false")  # tiny random encoders: near-duplicates all
        browser.eval("document.querySelector('#browse-form').requestSubmit()")
        browser.wait("document.body.dataset.browse === '1'")
        grid_ids = "[...document.querySelectorAll('#grid figure')].map(f => Number(f.dataset.id))"
        want = [h["id"] for h in server.request("POST", "/knn-service", {**clip_client_payload(
            text=CLASSES[0], modality="text", deduplicate=False, use_safety_model=False, use_violence_detector=False,
            aesthetic_score="")})[2]]
        assert browser.eval(grid_ids) == want and len(want) == N_QUERIES * 3 + 12  # all of them (k=40), as the API answers
        assert browser.eval("document.querySelector('#browse-error').textContent") == ""
        text_url = browser.eval("location.href")
        assert "tab=browse" in text_url and "text=red+fox" in text_url and "modality=text" in text_url and "dedup=0" in text_url
        browser.wait("[...document.querySelectorAll('#grid img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)")
        assert browser.eval("document.querySelector('#browse-download').disabled") is False
        # "similar" on the third result: the kNN of its stored image embedding, itself first
        third = want[2]
        browser.eval("document.querySelectorAll('#grid figure .similar')[2].click()")
        browser.wait("document.body.dataset.browse === '2'")
        similar = browser.eval(grid_ids)
        assert similar[0] == third and f"similar={third}" in browser.eval("location.href")
        emb = server.request("GET", f"/xm/embedding/mem/{third}?modality=image")[2]["embedding"]
        api = server.request("POST", "/knn-service", clip_client_payload(embedding_input=emb, modality="image", deduplicate=False,
                                                                        use_safety_model=False, use_violence_detector=False))[2]
        assert similar == [h["id"] for h in api] and len(similar) > 1
        browser.wait("[...document.querySelectorAll('#grid img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)")
        SCREENS.mkdir(parents=True, exist_ok=True)
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        (SCREENS / "xm-serve-memory-browser.png").write_bytes(base64.b64decode(shot["data"]))
        (SCREENSHOT.parent / "server-page-browser.png").write_bytes(base64.b64decode(shot["data"]))
        # the back button returns to the text search, re-run from the URL
        browser.eval("history.back()")
        browser.wait("document.body.dataset.browse === '3'")
        assert browser.eval("location.href") == text_url and browser.eval(grid_ids) == want
        assert browser.eval("document.querySelector('#browse-text').value") == CLASSES[0]
        # the URL is shareable: a fresh page opened on it shows the same search
        browser.send("Page.navigate", {"url": text_url})
        browser.wait("document.body && document.body.dataset.browse === '1'")
        assert browser.eval(grid_ids) == want and not browser.eval("document.querySelector('#browse').hidden")
        # only what the index can do is offered: no NSFW column, no violence prompts, no URL fetching here
        assert browser.eval("document.querySelector('#safe-box').hidden") is True
        assert browser.eval("document.querySelector('#browse-url-box').hidden") is True
        # an error names no server path
        browser.eval("document.querySelector('#browse-text').value = 'x'.repeat(5000)")
        browser.eval("document.querySelector('#browse-form').requestSubmit()")
        browser.wait("document.querySelector('#browse-error').textContent.length > 0")
        assert "/" not in browser.eval("document.querySelector('#browse-error').textContent")
    finally:
        browser.close()
