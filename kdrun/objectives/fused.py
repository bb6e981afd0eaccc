from torch import nn

from kdrun.objectives.base import Objective


class FusedObjectives(Objective):
    """The objectives of K students trained as one StackedModels (a fused sweep): one forward pass of
    all of them, then each student's own objective on its own logits. The loss is their sum, so each
    student's gradient is exactly that of its own objective. Logs are keyed `name/k` per student."""

    def __init__(self, objectives):
        super().__init__()
        self.objectives = nn.ModuleList(objectives)

    def forward(self, model, batch, progress):
        z = model.member_logits(batch.x)  # [B, K, C]
        total, logs = 0.0, {}
        for k, objective in enumerate(self.objectives):
            own = z[:, k]
            _, loss, parts = objective(lambda x, own=own: own, batch, progress)  # its "model" gives its logits
            total = total + loss
            logs.update({f"{name}/{k}": value for name, value in parts.items()})
            logs[f"loss/{k}"] = loss.detach()
            if batch.y is not None:
                logs[f"train_accuracy/{k}"] = (own.argmax(-1) == batch.y).float().mean()
        return model.combined(z), total, logs


def member_rows(rows, k):
    """Student k's metrics rows from a fused run's rows (its `name/k` terms and its test errors)."""
    out = []
    for row in rows:
        own = {"epoch": row["epoch"], "step": row["step"], "lr": row["lr"], "n_train": row["n_train"]}
        own.update({name[: -len(f"/{k}")]: v for name, v in row.items() if name.endswith(f"/{k}")})
        own.setdefault("train_accuracy", None)
        errors = row["member_test_errors"][k]
        own.update(test_errors=errors, n_test=row["n_test"], test_accuracy=1 - errors / row["n_test"],
                   seconds=row["seconds"])
        if "member_val_errors" in row:
            errors = row["member_val_errors"][k]
            own.update(val_errors=errors, n_val=row["n_val"], val_accuracy=1 - errors / row["n_val"])
        out.append(own)
    return out
