"""The one error type the CLI turns into a single clear line and a non-zero exit, and the one
helper that quotes data (a file name, caption, class name, URL) inside any message."""

from __future__ import annotations

# C0 and C1 control characters (escape sequences, bells, carriage returns, newlines), DEL, and
# the Unicode controls that reorder what a terminal shows (bidi overrides and isolates)
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if c != 0x09}
_CONTROL.update({c: f"\\u{c:04x}" for c in [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]})


def quoted(value: object) -> str:
    """`value` as it may appear inside a message: every control character shown escaped
    (`\\x1b`, `\\x0a`), so data can neither drive the terminal nor forge a second line.
    Idempotent: quoting a quoted text changes nothing."""
    return str(value).translate(_CONTROL)


class XMError(Exception):
    """A problem with the user's input or environment, stated in one line.

    The message names the file or thing at fault and, where possible, what to do; data it
    quotes goes through `quoted`.
    """

    exit_code = 2
