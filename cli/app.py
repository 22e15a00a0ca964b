"""The `xm` command: a thin Typer layer over the Python API."""

from __future__ import annotations

import sys

import typer

from xm.errors import XMError

app = typer.Typer(
    name="xm",
    help="Retrieval-augmented zero-shot CLIP: build LAION-style indexes, classify, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # imported here so that each command module can import `app`
    from xm.cli import benchmark_cmd, build_cmd, classify_cmd, info_cmd, methods_cmd, texts_cmd, train_cmd  # noqa: F401


def main() -> None:
    _register()
    try:
        app()
    except XMError as exc:
        print(f"xm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("xm: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
