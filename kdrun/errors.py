class KdrunError(Exception):
    """A problem the user can fix; the CLI prints it as one `kdrun: error: ...` line."""


def first_line(exc):
    """The first non-empty line of an exception's message (or its type's name)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
