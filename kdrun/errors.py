class KdrunError(Exception):
    """A problem the user can fix; the CLI prints it as one `kdrun: error: ...` line."""
