"""The one error type the CLI turns into a single clear line and a non-zero exit."""

from __future__ import annotations


class XMError(Exception):
    """A problem with the user's input or environment, stated in one line.

    The message names the file or thing at fault and, where possible, what to do.
    """

    exit_code = 2
