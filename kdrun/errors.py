class KdrunError(Exception):
    """A problem the user can fix; the CLI prints it as one `kdrun: error: ...` line (exit 2)."""


class StorageError(KdrunError):
    """The machine, not the input: a full disk, a read-only or forbidden folder (exit 1)."""


def first_line(exc):
    """The first non-empty line of an exception's message (or its type's name)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def usage_error(message):
    """argparse's `error` hook: a usage mistake becomes one `kdrun: error:` line, not argparse's exit."""
    raise KdrunError(message)
