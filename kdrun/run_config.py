"""The config a run records in its results.json (`config`): the resolved config minus the keys that say
where and how this one process runs, not what it computes."""

from omegaconf import OmegaConf

# where files go, which device, bars, resuming, tracking, the command's one-line description
RUN_LOCAL = ("progress", "resume", "device", "workdir", "data_dir", "hydra", "retrain", "logger", "summary", "paper")


def run_config(cfg):
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in resolved.items() if k not in RUN_LOCAL}


def flatten(config, prefix=""):
    """{dotted key: value} of a nested dict (a run's config, a teacher's identity); lists are values."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
