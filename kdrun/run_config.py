"""The config a run records in its results.json (`config`): the resolved config minus the keys that say
where and how this one process runs, not what it computes."""

from omegaconf import OmegaConf

# where files go, which device, bars, resuming, tracking, the command's one-line description
RUN_LOCAL = ("progress", "resume", "device", "workdir", "data_dir", "hydra", "retrain", "logger", "summary", "paper")


def run_config(cfg):
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in resolved.items() if k not in RUN_LOCAL}
