"""SIGINT and SIGTERM. Inside the training loop a signal only raises a flag: the loop finishes its
step, checkpoints, and raises Interrupted. Anywhere else (loading data, caching soft targets) the
signal raises Interrupted at once, and a resume starts from the last epoch-end checkpoint."""

import contextlib
import signal
import threading


class Interrupted(BaseException):  # not an Exception: no `except Exception` may swallow it
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self):
        return 128 + self.signum


_state = {"in_loop": 0, "requested": None, "resume_dir": None}


def _handler(signum, frame):
    if _state["in_loop"] and _state["requested"] is None:
        _state["requested"] = signum
        return
    raise Interrupted(signum)


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install():
    """Route SIGINT and SIGTERM through kdrun; returns the previous handlers, for `restore`. Only the
    main thread can set handlers: elsewhere (kdrun called from a worker thread) nothing changes."""
    _state["requested"], _state["resume_dir"] = None, None
    if threading.current_thread() is not threading.main_thread():
        return None
    return {sig: signal.signal(sig, _handler) for sig in SIGNALS}


def restore(previous):
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def deferred():
    """Within this block a signal waits for the loop to see `pending()` between steps."""
    _state["in_loop"] += 1
    try:
        yield
    finally:
        _state["in_loop"] -= 1


def pending():
    return _state["requested"]


def check():
    """Raise Interrupted if a signal arrived since the last check."""
    signum = _state["requested"]
    if signum is not None:
        raise Interrupted(signum)


def set_resume_dir(path):
    _state["resume_dir"] = path


def resume_dir():
    return _state["resume_dir"]
