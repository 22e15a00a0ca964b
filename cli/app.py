"""The `xm` command: a thin Typer layer over the Python API."""

from __future__ import annotations

import os
import sys

# libraries' own progress bars (autofaiss, embedding_reader, faiss' clustering) are noise next
# to ours; tqdm reads this when it is first imported
os.environ.setdefault("TQDM_DISABLE", "1")

import typer  # noqa: E402

from xm.errors import XMError, quoted  # noqa: E402

app = typer.Typer(
    name="xm",
    help="Retrieval-augmented zero-shot CLIP: build LAION-style indexes, classify, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: TEXT, INTEGER, no "<list[str]>"
)


def _version(value: bool) -> None:
    if value:
        from xm import __version__

        print(f"xm {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print xm's version and exit"),
) -> None:
    """Retrieval-augmented zero-shot CLIP: build LAION-style indexes, classify, benchmark."""


def _register() -> None:
    # imported here so that each command module can import `app`
    from xm.cli import benchmark_cmd, build_cmd, classify_cmd, export_cmd, info_cmd, methods_cmd, serve_cmd, texts_cmd, train_cmd  # noqa: F401


INTERRUPTED = "xm: interrupted; re-run the same command to resume"


def _from_interrupt(exc: BaseException | None) -> bool:
    """Whether an exception was caused, however indirectly, by Ctrl-C (Typer turns a
    KeyboardInterrupt into Exit(130) before we see it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main() -> None:
    _register()
    try:
        app()
    except XMError as exc:
        print(f"xm: error: {quoted(exc)}", file=sys.stderr)  # whatever data it quotes
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 or _from_interrupt(exc):
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(130)
        raise
