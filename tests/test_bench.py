"""The benchmark's FLOP counts, against torch's own count of what a step computes: every share of the
ceiling in bench.json divides by them (the first bench over-counted by 13-16%)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kdrun.models import MLP

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("widths", [bench.MLP1200, bench.MLP800])
def test_training_flops_are_what_a_training_step_computes(widths):
    model = MLP([1, 28, 28], widths[-1], widths[1:-1], dropout_input=0.2, dropout_hidden=0.5, max_norm=3.873)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    step = _counted(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    assert step == bench.training_flops(widths, 8)
    assert step < bench.gemm_flops(widths, 8)  # the first layer's input gradient is never computed


def test_the_ceiling_counts_the_gemms_it_runs():
    widths, n = [20, 30, 7], 5
    layers = bench.gemm_operands(widths, n, torch.device("cpu"))
    assert _counted(lambda: bench.run_gemms(layers)) == bench.gemm_flops(widths, n)
