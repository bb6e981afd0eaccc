"""The soft-target cache: raw teacher logits over the transfer set (one file serves every T), with a
manifest of what made them; a cache whose manifest does not match is recomputed, never trusted."""

import logging
import time
from pathlib import Path

from filelock import FileLock

from kdrun.errors import KdrunError
from kdrun import __version__
from kdrun.io import load_torch, save_torch, write_json
from kdrun.loop import predict

log = logging.getLogger("kdrun")


def cache_path(workdir, teacher_key, transfer_key):
    return Path(workdir) / "soft_targets" / teacher_key / f"{transfer_key}.pt"


def manifest_for(teacher_sha256, transfer, num_classes, members=None):
    """What made a cache. An ensemble's (`members`: each member's key and sha256) holds every
    member's logits, [N, M, C]."""
    manifest = {"teacher_sha256": teacher_sha256, **transfer, "shape": [transfer["n"], num_classes], "dtype": "float32"}
    if members is not None:
        manifest["members"] = [{k: m[k] for k in ("member", "key", "sha256")} for m in members]
        manifest["shape"][1:1] = [len(members)]
    return manifest


def _valid(payload, manifest):
    if payload["manifest"] != manifest:
        diff = sorted(k for k in set(manifest) | set(payload["manifest"])
                      if manifest.get(k) != payload["manifest"].get(k))
        return False, f"manifest differs in {', '.join(diff)}"
    if list(payload["logits"].shape) != manifest["shape"]:
        return False, "logits shape differs from its manifest"
    return True, ""


def _load_cache(path):
    payload = load_torch(path, "soft-target cache")
    if not (isinstance(payload, dict) and "logits" in payload and "manifest" in payload):
        raise KdrunError(f"corrupt soft-target cache {path}: not a soft-target cache; delete it to recompute")
    return payload


def check_cache(path):
    """Refuse a damaged cache file before a run starts (a mismatched one is recomputed later)."""
    if Path(path).exists():
        _load_cache(path)


def get_or_compute(path, manifest, teacher, transfer_data, forward=None):
    """Return cached logits (on the CPU), computing them (`forward`, default the teacher's own) under
    a file lock if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # parallel sweep jobs: one computes, the others wait and reuse
        if path.exists():
            payload = _load_cache(path)
            ok, why = _valid(payload, manifest)
            if ok:
                log.info("soft targets: reusing %s", path)
                return payload["logits"]
            log.warning("soft targets: %s does not match (%s); recomputing", path, why)
        started = time.perf_counter()
        logits = predict(teacher, transfer_data, forward=forward).float().cpu()
        save_torch(path, {"logits": logits, "manifest": manifest, "kdrun_version": __version__})
        write_json(path.with_suffix(".json"), manifest)
        log.info("soft targets: wrote %s (%s, %.1fs)", path, " x ".join(map(str, logits.shape)), time.perf_counter() - started)
        return logits
