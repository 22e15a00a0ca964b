"""`xm serve`: a clip-retrieval-compatible kNN service, /classify and a web page."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from xm.cli.app import app
from xm.cli.device_option import DEVICE_HELP, parse_device
from xm.cli.output import err_console, safe_text


def parse_served(items: list[str]) -> list[tuple[str, Path]]:
    """`IDX` (named after its folder) or `NAME=IDX`."""
    from xm.errors import XMError

    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).resolve().name, item
        name = name.strip()
        if not name or any(c in name for c in "/?#&\x00") or len(name) > 64:
            raise XMError(f"{item!r}: an indice name is 1-64 characters without / ? # &; give NAME=PATH")
        out.append((name, Path(path)))
    return out


@app.command("serve")
def serve_cmd(
    indexes: list[str] = typer.Argument(..., help="indexes to serve: IDX (named after its folder) or NAME=IDX"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; beyond loopback needs --token-file or --insecure-no-auth"),
    port: int = typer.Option(1234, "--port", help="port (clip back's default 1234; 0 picks a free one)"),
    workers: int = typer.Option(1, "--workers", help="processes behind the one port, each with its own memory-mapped index and encoders"),
    concurrency: int = typer.Option(16, "--concurrency", help="requests computed at once per process (encoder work is batched across them)"),
    token_file: Path | None = typer.Option(None, "--token-file", help="file holding a bearer token every data request must send"),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="serve a non-loopback --host without a token"),
    allow_url_fetch: bool = typer.Option(False, "--allow-url-fetch", help="let /knn-service fetch `image_url` (off: the server never opens URLs)"),
    inline_images: bool = typer.Option(False, "--inline-images", help="as clip back: add each result's local image as base64 `image`"),
    columns: str | None = typer.Option(None, "--columns", help="metadata columns returned, comma-separated (default: all the store has)"),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="an origin allowed to call from a browser (repeatable; * for any)"),
    max_body_mb: int = typer.Option(16, "--max-body-mb", help="largest request body"),
    max_megapixels: float = typer.Option(40.0, "--max-megapixels", help="largest decoded image"),
    max_results: int = typer.Option(10_000, "--max-results", help="largest num_images / num_result_ids / ids per request"),
    request_timeout: float = typer.Option(60.0, "--request-timeout", help="seconds a request may wait for a compute slot or an encoder"),
    read_timeout: float = typer.Option(20.0, "--read-timeout", help="seconds a request's line, headers and body may take to arrive (slow clients)"),
    max_pending_per_address: int = typer.Option(32, "--max-pending-per-address", help="request heads still arriving (slow clients) one address may hold; past it the oldest is closed"),
    unhonoured: str = typer.Option("header", "--unhonoured", help="clip back filters the memory cannot run: header (named in X-XM-Unhonoured-Options) | refuse (400)"),
    violence_prompts: Path | None = typer.Option(None, "--violence-prompts", help="clip back's violence detector (violence_detection_vit_b_32.npy): honours use_violence_detector"),
    access_log: bool = typer.Option(False, "--access-log", help="one stderr line per request (paths only, never query strings)"),
    precision: str = typer.Option("fp32", "--precision", help="encoder inference precision: fp32 | bf16 | fp16 | int8 (see bench/bench_precision.py)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Serve indexes over HTTP the way clip-retrieval's `clip back` does, plus /classify and a web page."""
    from xm.encoders.precision import Precision
    from xm.server.app import ServeConfig, read_token, serve
    from xm.server.service import Limits, Service

    inference_precision = Precision.parse(precision)  # parsed once, before any work
    where = parse_device(device, "serve")
    cfg = ServeConfig(
        indexes=parse_served(indexes), host=host, port=port, workers=workers, concurrency=concurrency,
        token=read_token(token_file) if token_file else None, insecure_no_auth=insecure_no_auth,
        allow_url_fetch=allow_url_fetch, inline_images=inline_images,
        columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
        cors_origins=list(cors_origin), access_log=access_log, precision=inference_precision, device=where,
        limits=Limits(max_body_bytes=max_body_mb << 20, max_pixels=int(max_megapixels * 1e6), max_results=max_results,
                      request_timeout_s=request_timeout, read_timeout_s=read_timeout,
                      max_pending_per_address=max_pending_per_address),
        unhonoured=unhonoured, violence_prompts=violence_prompts,
    )
    auth = "bearer token required" if cfg.token else ("NO AUTH" if not is_local(host) else "loopback only, no token")

    def ready(url: str, service: Service) -> None:
        names = ", ".join(f"{n} ({s.memory.count} items, {s.spec})" for n, s in service.indices.items())
        procs = f"  ·  {workers} processes" if workers > 1 else ""
        err_console.print(safe_text(f"xm serve: {url}/  ·  {names}  ·  {auth}{procs}"))
        for line in service.unhonoured_lines():
            err_console.print(safe_text(f"xm serve: {line}"))
        # tests and scripts read this line to learn the port (with --port 0)
        print(f"listening on {url}", flush=True)

    try:
        serve(cfg, ready)
    except KeyboardInterrupt:
        pass
    print("xm serve: stopped", file=sys.stderr)


def is_local(host: str) -> bool:
    from xm.server.app import is_loopback

    return is_loopback(host)
