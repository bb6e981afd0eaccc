"""Several `kdrun distill` runs in the processes of one torchrun launch, each rank's trained state kept:

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/torchrun_runs.py PLAN.json OUT

PLAN.json maps a name to {"workdir": KDRUN_WORKDIR, "args": the distill arguments}. Every process runs
every run in order, through kdrun.cli.main as `python -m kdrun` does; the model and objective state of
each run's last checkpoint are also saved per rank, as OUT/NAME.rankR.pt (a rank other than 0 writes
its run dir in a private folder that it removes), and its stderr as OUT/NAME.rankR.log. One launch pays
torchrun's and each process's start-up once for all the runs; the process group is joined by the first
run and left after the last (torch cannot join a group again once it left it)."""

import json
import os
import sys
from pathlib import Path

import torch

import kdrun.distributed
from conftest import kdrun_in_process
from kdrun.checkpoint import Checkpointer

plan, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
rank, saved_to = kdrun.distributed.rank(), {}
original_save, original_close = Checkpointer.save, kdrun.distributed.close


def save(self, state):
    original_save(self, state)
    torch.save({"model": state["model"], "objective": state["objective"]}, saved_to["path"])


Checkpointer.save = save
kdrun.distributed.close = lambda: None
failed = []
try:
    for name, run in plan.items():
        saved_to["path"] = out / f"{name}.rank{rank}.pt"
        proc = kdrun_in_process(["distill", *run["args"]], env={**os.environ, "KDRUN_WORKDIR": run["workdir"]})
        (out / f"{name}.rank{rank}.log").write_text(proc.stderr)
        if proc.returncode:  # stop: torchrun then ends the other processes, which may wait on this one
            failed.append(name)
            print(f"rank {rank}: {name} exited {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
            break
finally:
    original_close()
sys.exit(1 if failed else 0)
