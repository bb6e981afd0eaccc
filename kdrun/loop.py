"""The one training loop. Every command trains through `fit`; methods live in objectives."""

import contextlib
import math
import sys
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kdrun import distributed, interrupt
from kdrun.checkpoint import rng_state, set_rng_state
from kdrun.errors import KdrunError
from kdrun.models import capabilities


@torch.no_grad()
def predict(model, data, batch_size=1000, forward=None):
    """Logits for a whole split, in order, in eval mode (`forward`: another output of the model's)."""
    model.eval()
    forward = forward or model
    return torch.cat([forward(b.x) for b in data.batches(batch_size)])


def evaluate(model, data, batch_size=1000):
    """Test errors; for a model of several members (an Ensemble), also each member's."""
    members = getattr(model, "member_logits", None)
    logits = predict(model, data, batch_size, forward=members)
    out = {}
    if members is not None:
        out["member_test_errors"] = (logits.argmax(-1) != data.labels[:, None]).sum(0).tolist()
        logits = model.combined(logits)
    errors = int((logits.argmax(1) != data.labels).sum())
    n = len(data)
    return {"test_errors": errors, "n_test": n, "test_accuracy": 1 - errors / n, **out}


class FiniteLoss:
    """Stops training at the first non-finite loss, naming its epoch, step and lr. On the CPU it looks at
    every step (that costs nothing there); on an accelerator it keeps the step's loss and looks at the
    epoch's losses at once before anything is saved, so that no step waits for the device."""

    def __init__(self, device):
        self.eager, self.pending = device.type == "cpu", []

    def observe(self, loss, epoch, step, lr):
        if self.eager:
            if not torch.isfinite(loss):
                self._fail(loss, epoch, step, lr)
        else:
            self.pending.append((loss.detach(), epoch, step, lr))

    def check(self):
        """Raise for the first non-finite loss seen since the last check."""
        if self.pending:
            finite = torch.isfinite(torch.stack([loss for loss, *_ in self.pending])).tolist()
            if not all(finite):
                self._fail(*self.pending[finite.index(False)])
            self.pending.clear()

    @staticmethod
    def _fail(loss, epoch, step, lr):
        raise KdrunError(f"loss is {float(loss.detach())} at epoch {epoch + 1} step {step + 1} (lr={lr:.3g})")


def fit(model, objective, train, test, optimizer, scheduler, *, epochs, batch_size, jitter, generator, flip=False,
        recorder, checkpointer=None, progress="auto", precision="fp32", compile=False, channels_last=False, val=None):
    """Train for `epochs`; after each epoch evaluate on `test` (and on `val`, a validation split, when
    given: val_errors, n_val), hand a metrics row to `recorder` and save
    a checkpoint. A signal (see kdrun.interrupt) ends the current step, checkpoints mid-epoch and raises
    Interrupted. With a checkpoint to resume, training continues exactly where it stopped.
    precision="bf16" runs the objective under autocast (bfloat16 matmuls, float32 weights and losses);
    compile=True runs the model through torch.compile; channels_last=True keeps the model's weights and
    each batch's images in channels-last memory order (the same values, another layout).
    Returns (the last epoch's metrics row, seconds spent in this loop over all sessions)."""
    steps_per_epoch = train.n_batches(batch_size)
    total_steps = epochs * steps_per_epoch
    distributed.check_batches(len(train), batch_size)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model
    net = distributed.wrap(model)  # under torchrun, DistributedDataParallel (see kdrun.distributed)
    finite = FiniteLoss(train.device)
    autocast = torch.autocast(train.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    resumed = checkpointer.load() if checkpointer else None
    start_epoch, step, skip, row, elapsed = 0, 0, 0, {}, 0.0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start_epoch, step, skip = resumed["epoch"], resumed["step"], resumed["batch"]
        row, elapsed = resumed["row"], resumed["elapsed"]
        objective.load_state_dict(resumed["objective"])  # its parameters, buffers and extra state
        if not skip:
            set_rng_state(resumed["rng"], generator)
    recorder.keep_epochs(start_epoch)
    show_bars = (sys.stderr.isatty() if progress == "auto" else bool(progress)) and distributed.is_main()
    epoch_bar = tqdm(range(start_epoch, epochs), desc=recorder.name, unit="epoch", disable=not show_bars,
                     initial=start_epoch, total=epochs)
    session_started = time.perf_counter()

    def state(epoch, batch, epoch_rng, sums, correct):
        return {"model": model.state_dict(), "objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch, "step": step, "batch": batch, "epoch_rng": epoch_rng, "sums": dict(sums),
                "correct": correct, "rng": rng_state(generator), "row": row,
                "elapsed": elapsed + time.perf_counter() - session_started}

    # with bars on screen, log lines go through tqdm so that they do not break the bars
    with logging_redirect_tqdm() if show_bars else contextlib.nullcontext(), interrupt.deferred():
        for epoch in epoch_bar:
            model.train()
            started = time.perf_counter()
            sums = defaultdict(float)  # per-example sums, kept on the device until the epoch ends
            correct = torch.zeros((), dtype=torch.long, device=train.device)
            if skip:  # resuming mid-epoch: replay the epoch's draws up to where it stopped
                generator.set_state(resumed["epoch_rng"])
            epoch_rng = generator.get_state()
            batches = train.batches(batch_size, shuffle=True, generator=generator, jitter=jitter, flip=flip)
            if skip:
                for _ in range(skip):
                    next(batches)
                set_rng_state(resumed["rng"], generator)
                sums.update(resumed["sums"])
                correct += resumed["correct"].to(train.device)
            for i, batch in enumerate(tqdm(batches, total=steps_per_epoch, initial=skip, leave=False, unit="batch",
                                           disable=not show_bars), start=skip + 1):
                n_global, batch = batch.x.shape[0], distributed.shard(batch)  # under torchrun, this rank's slice
                if channels_last and batch.x.dim() == 4:
                    batch.x = batch.x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    logits, loss, logs = objective(net, batch, step / total_steps)
                finite.observe(loss, epoch, step, optimizer.param_groups[0]["lr"])
                optimizer.zero_grad(set_to_none=True)
                distributed.scaled(loss, batch.x.shape[0], n_global).backward()
                distributed.average_gradients(objective.parameters())  # DDP averages only the model's
                optimizer.step()
                scheduler.step()
                capabilities.constrain(model)
                n = batch.x.shape[0]
                sums["loss"] = sums["loss"] + loss.detach().float() * n  # float: a bf16 sum would drift
                for k, v in logs.items():
                    sums[k] = sums[k] + (v.float() if torch.is_tensor(v) else v) * n
                if batch.y is not None:
                    correct += (logits.argmax(1) == batch.y).sum()
                step += 1
                if interrupt.pending() and i < steps_per_epoch:
                    finite.check()
                    if checkpointer and distributed.world_size() == 1:  # under torchrun the sums are this rank's
                        checkpointer.save(state(epoch, i, epoch_rng, sums, correct))
                    interrupt.check()
            skip = 0
            finite.check()
            sums, correct = distributed.reduce_epoch(sums, correct)
            n_train = len(train)
            row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"]}
            row.update({k: float(v) / n_train for k, v in sums.items()})
            row["train_accuracy"] = float(correct) / n_train if train.labelled else None
            row["n_train"] = n_train
            row.update(evaluate(model, test))
            if val is not None:
                on_val = evaluate(model, val)
                row.update(val_errors=on_val["test_errors"], n_val=on_val["n_test"], val_accuracy=on_val["test_accuracy"])
                if "member_test_errors" in on_val:
                    row["member_val_errors"] = on_val["member_test_errors"]
            row["seconds"] = time.perf_counter() - started
            if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
                raise KdrunError(f"non-finite metrics at epoch {epoch + 1}: {row}")
            epoch_bar.set_postfix(loss=f"{row['loss']:.4f}", test_err=row["test_errors"])
            recorder.epoch_end(row)
            if checkpointer:
                checkpointer.save(state(epoch + 1, 0, None, {}, None))
            interrupt.check()
    return row, elapsed + time.perf_counter() - session_started
