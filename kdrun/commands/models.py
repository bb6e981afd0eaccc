"""`kdrun models [dataset=NAME] [dataset.KEY=VALUE ...]`: every model config (conf/model/ and the user's
folders) with its parameter count and forward multiply-accumulates (MACs) on one input of the dataset's
shape, built for its number of classes on the meta device: no memory, no compute, no training."""

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from kdrun import configs
from kdrun.errors import KdrunError, first_line
from kdrun.models import capabilities
from kdrun.models.build import build_model, head_path


@dataclass
class Row:
    name: str
    target: str
    params: int | None = None
    macs: int | None = None
    head: str | None = None
    note: str = ""


def measure(arch, shape, num_classes):
    """(parameters, MACs of one forward on a [1, *shape] input, head path or None, why the forward
    failed or "") of a model config
    node (resolved against a config holding `dataset`). MACs = FLOPs / 2, FLOPs as FlopCounterMode
    counts them (matmuls and convolutions)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes).eval()
    params = sum(p.numel() for p in model.parameters())
    head = capabilities.detect(model, head_path(arch)).head
    try:
        capabilities.check_forward(model, shape, num_classes)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, *shape, device="meta"))
    except Exception as e:
        return params, None, head, first_line(e)
    return params, counter.get_total_flops() // 2, head, ""


def _dataset(overrides):
    from hydra import compose, initialize_config_dir

    for word in overrides:
        key = word.partition("=")[0].lstrip("+~")
        if "=" not in word or not (key == "dataset" or key.startswith("dataset.")):
            raise KdrunError(f"kdrun models takes dataset=NAME and dataset.KEY=VALUE, got '{word}'")
    searchpath = [configs.searchpath_override()] if configs.user_entries() else []
    with initialize_config_dir(config_dir=str(configs.conf_dir()), version_base="1.3", job_name="models"):
        return compose(config_name="train", overrides=[*overrides, *searchpath]).dataset


def rows(dataset):
    out = []
    shape, num_classes = list(dataset.shape), int(dataset.num_classes)
    for name in configs.group_options("model"):
        node = OmegaConf.load(configs.option_file("model", name))
        root = OmegaConf.create({"dataset": OmegaConf.to_container(dataset, resolve=True), "model": node})
        row = Row(name, str(node.get("_target_", "?")))
        try:
            row.params, row.macs, row.head, row.note = measure(root.model, shape, num_classes)
        except Exception as e:  # a model that does not take this shape, or needs a package not installed
            row.note = first_line(e.__cause__ or e)
        out.append(row)
    return out


def _count(n):
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(dataset, table):
    lines = [f"models for {dataset.name} (input {list(dataset.shape)}, {dataset.num_classes} classes); "
             "MACs of one forward pass of one input",
             "",
             "| model | target | params | MACs | head |",
             "|---|---|---:|---:|---|"]
    for r in table:
        head = r.head or ("-" if r.note else "none (no nn.Linear)")
        if r.note:
            head = f"{r.note}"
        params = "-" if r.params is None else f"{r.params:,}"
        lines.append(f"| {r.name} | {r.target} | {params} | {_count(r.macs)} | {head} |")
    return "\n".join(lines)


def main(argv):
    rest, folders = configs.split_user_folders(argv)
    configs.use(folders)
    if any(a in ("-h", "--help") for a in rest):
        print(__doc__.split("\n\n")[0])
        return 0
    dataset = _dataset(rest)
    print(render(dataset, rows(dataset)))
    return 0
