"""Hydra callbacks. Kept free of heavy imports: Hydra builds them on every run."""

from hydra.experimental.callback import Callback


LAST_SWEEP = []  # the summary rows of the sweep that ended last in this process


class SweepSummary(Callback):
    """Write summary.csv in the sweep dir when a multirun ends. It runs in the main process whatever
    the launcher (jobs in joblib or submitit workers included), so the CLI learns of failed jobs from
    it. kdrun catches job errors, so Hydra reaches it even when jobs failed. With a tracker on
    (`logger=...`), the sweep is also a parent run that its jobs' runs are children of (kdrun.tracking)."""

    def on_multirun_start(self, config, **kwargs):
        from kdrun import tracking

        tracking.sweep_started(config)

    def on_multirun_end(self, config, **kwargs):
        from kdrun import tracking
        from kdrun.report import write_sweep_summary

        LAST_SWEEP[:] = write_sweep_summary(config.hydra.sweep.dir, config.hydra.overrides.task)
        tracking.sweep_ended(config, LAST_SWEEP)
