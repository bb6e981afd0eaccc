"""A fused sweep's points. `kdrun distill sweep.fused=true T=[1,2,5,10,20]` lists values of keys that
change only the objective (the data order, the teacher and each student's initialisation stay those of
one run); every combination is one student, and all of them train together (kdrun.commands.fused)."""

import itertools

from omegaconf import OmegaConf

from kdrun.errors import KdrunError
from kdrun.validate import boolean

FUSABLE = ("T", "alpha")


def is_fused(cfg):
    return OmegaConf.select(cfg, "sweep.fused", default=False) is True


def points(cfg):
    """The config of each student of a fused sweep (each listed key set to one of its values; every
    combination, the last key varying fastest), or [cfg] for an ordinary run."""
    if "sweep" in cfg:
        boolean("sweep.fused", cfg.sweep.fused)
    listed = {k: list(cfg[k]) for k in FUSABLE if OmegaConf.is_list(cfg.get(k))}
    if not is_fused(cfg):
        for k, values in listed.items():
            raise KdrunError(f"{k}={values} is a list: train its values together with sweep.fused=true, "
                             f"or one after another with -m {k}={','.join(map(str, values))}")
        return [cfg]
    if OmegaConf.is_list(cfg.get("seed")):
        raise KdrunError("sweep.fused=true trains students that differ in T or alpha (one data order, one "
                         f"initialisation); sweep seeds with -m seed={','.join(map(str, cfg.seed))}")
    for k, values in listed.items():
        if not values:
            raise KdrunError(f"{k}=[] lists no values")
    out = []
    for values in itertools.product(*listed.values()):
        point = cfg.copy()
        for k, v in zip(listed, values):
            point[k] = v
        out.append(point)
    return out
