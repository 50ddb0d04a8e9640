"""User-facing errors: the CLI prints these as one line and exits non-zero, never with a traceback."""


class KdpipeError(Exception):
    """A user mistake or an unusable input. The message says what is wrong, where, and how to fix it."""

    exit_code = 2
