"""TensorBoard event files in each run dir (`logger=tensorboard`), written by torch's SummaryWriter:
every metrics.jsonl number per epoch (step = epoch), the resolved config as text, and a pipeline's or
a sweep's report (report.png as an image, report.md as text). Needs `pip install 'kdrun[tensorboard]'`."""

from pathlib import Path


class TensorBoardTracker:
    requires = "tensorboard"  # the package kdrun.tracking.check looks for, and the extra that installs it
    extra = "tensorboard"

    def __init__(self, subdir="tensorboard"):
        self.subdir = subdir
        self.runs = {}  # run id (its log dir) -> {"config", "purge_step", "writer"}

    def start(self, run_dir, name, tags, parent):
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (fails here when tensorboard is missing)

        log_dir = str(Path(run_dir) / self.subdir)
        self._state(log_dir)
        return log_dir

    def _state(self, run):
        # a run started by another process (a sweep's parent, finished by the callback at its end) is new here
        return self.runs.setdefault(run, {"purge_step": None, "writer": None, "config": None})

    def config(self, run, config):
        # written with the first scalars: the writer is made once resumed_at has said what to hide
        state = self._state(run)
        state["config"] = config
        if state["writer"] is not None:
            self._write_config(state)

    @staticmethod
    def _write_config(state):
        from omegaconf import OmegaConf

        state["writer"].add_text("config", markdown_code(OmegaConf.to_yaml(state.pop("config"))), 0)

    def resumed_at(self, run, epoch):
        # a run that starts again at `epoch` hides what an earlier session logged after it (the rows that
        # metrics.jsonl drops too); a fresh run into a reused dir hides all of it
        self._state(run)["purge_step"] = epoch + 1

    def _writer(self, run):
        state = self._state(run)
        if state["writer"] is None:
            from torch.utils.tensorboard import SummaryWriter

            state["writer"] = SummaryWriter(run, purge_step=state["purge_step"])
            if state.get("config") is not None:
                self._write_config(state)
        return state["writer"]

    def metrics(self, run, values, step):
        writer = self._writer(run)
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def finish(self, run, files, status, tags):
        writer = self._writer(run)
        for path in files:
            if path.name == "report.png":
                import numpy as np
                from PIL import Image

                with Image.open(path) as image:
                    writer.add_image("report", np.asarray(image.convert("RGB")), 0, dataformats="HWC")
            elif path.name == "report.md":
                writer.add_text("report", path.read_text(), 0)
        writer.close()
        del self.runs[run]

    def close(self):
        for state in self.runs.values():
            if state["writer"] is not None:
                state["writer"].close()
        self.runs.clear()


def markdown_code(text):
    """Text that TensorBoard's Markdown shows as written (an indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())
