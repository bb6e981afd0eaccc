"""Training checkpoints: all the state that makes a resumed run end bit-identical to one never stopped
(weights, the objective's own parameters and state, optimiser, scheduler, epoch, step, position in the
epoch, and every random stream)."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdrun import __version__
from kdrun.errors import KdrunError
from kdrun.io import content_key, load_torch, save_torch

FORMAT = 2  # 2: the objective's state_dict beside the model's
NOT_IN_KEY = ("progress", "resume", "device", "logger")  # may differ between a run and its resume


def run_key(cfg):
    """What a run's checkpoint must have been made by: its whole resolved config, less NOT_IN_KEY."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return content_key({k: v for k, v in config.items() if k not in NOT_IN_KEY})


def rng_state(generator):
    """Every random stream training draws from: torch's global one (init, dropout), CUDA's and the data
    order's (shuffle, jitter, flip). An objective's own streams (self-distillation's views) are its
    module's extra state, saved with its state_dict."""
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Where one training's checkpoint lives, what must have made it (`key`, `made_by`), and whether an
    existing one is resumed (`resume`) or replaced."""

    def __init__(self, path, key, made_by, resume):
        self.path, self.key, self.made_by, self.resume = Path(path), key, made_by, resume

    def load(self):
        """The checkpoint to continue from, or None to start afresh."""
        if not (self.resume and self.path.is_file()):
            return None
        payload = load_torch(self.path, "checkpoint")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise KdrunError(f"checkpoint {self.path} is not a kdrun {__version__} training checkpoint")
        if payload.get("key") != self.key:
            raise KdrunError(f"checkpoint {self.path} was made by another configuration ({payload.get('made_by')}); "
                             f"it cannot be resumed by this one")
        return payload

    def save(self, state):
        save_torch(self.path, {**state, "format": FORMAT, "key": self.key, "made_by": self.made_by,
                               "kdrun_version": __version__})

    def discard(self):
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:  # not empty (a run dir's checkpoints/ is kept)
            pass
