"""Run the kdrun CLI and stop it at a chosen point, as a crash, a scheduler or a full disk would:

    python fault_at.py SITE N [kdrun args...]

SITE: `step` (SIGKILL after the N-th optimiser step), `checkpoint` (SIGKILL half-way through writing
the N-th training checkpoint), `cache` (SIGKILL half-way through writing the N-th soft-target cache),
`epoch-end` (SIGKILL after the N-th metrics row is written, before its checkpoint), `sigterm` (SIGTERM
to itself after the N-th optimiser step: the graceful path), `disk-full` and `read-only` (the N-th
training checkpoint write fails with ENOSPC half-way, or with EROFS at once)."""

import errno
import io
import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

import kdrun.io
from kdrun import cli
from kdrun.run import Recorder

site, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
hits = [0]


def nth():
    hits[0] += 1
    return hits[0] == n


def die(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)


if site in ("step", "sigterm"):
    def after_step(optimizer, *_):
        if nth():
            die(signal.SIGTERM if site == "sigterm" else signal.SIGKILL)

    register_optimizer_step_post_hook(after_step)
elif site in ("checkpoint", "cache"):
    original_write = kdrun.io.atomic_write

    def atomic_write(path, write_fn, mode="wb"):
        wanted = path.name == "last.pt" if site == "checkpoint" else "soft_targets" in path.parts
        if not (wanted and nth()):
            return original_write(path, write_fn, mode)

        def half_then_die(f):
            buf = io.BytesIO()
            write_fn(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            die()

        return original_write(path, half_then_die, mode)

    kdrun.io.atomic_write = atomic_write
elif site in ("disk-full", "read-only"):
    original_write = kdrun.io.atomic_write
    code = errno.ENOSPC if site == "disk-full" else errno.EROFS

    def atomic_write(path, write_fn, mode="wb"):
        if path.name != "last.pt" or not nth():
            return original_write(path, write_fn, mode)

        def fail(f):
            f.write(b"partial")
            raise OSError(code, os.strerror(code))

        return original_write(path, fail, mode)

    kdrun.io.atomic_write = atomic_write
elif site == "epoch-end":
    original_epoch_end = Recorder.epoch_end

    def epoch_end(self, row):
        original_epoch_end(self, row)
        if nth():
            die()

    Recorder.epoch_end = epoch_end
else:
    sys.exit(f"unknown site {site}")

sys.argv = ["kdrun", *args]
cli.main()
