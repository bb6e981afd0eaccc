"""Hydra callbacks. Kept free of heavy imports: Hydra builds them on every run."""

from hydra.experimental.callback import Callback


class SweepSummary(Callback):
    """Write summary.csv in the sweep dir when a multirun ends (kdrun catches job errors, so Hydra
    reaches this even when jobs failed; `kdrun report` does not depend on it)."""

    def on_multirun_end(self, config, **kwargs):
        from kdrun.report import write_sweep_summary

        write_sweep_summary(config.hydra.sweep.dir, config.hydra.overrides.task)
