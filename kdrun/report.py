"""Tables and plots of results.json files: what a sweep or a pipeline measured, grouped over seeds."""

import csv
import io
import itertools
import json
import os
import statistics
from pathlib import Path

from kdrun import compare
from kdrun.errors import KdrunError, usage_error
from kdrun.io import atomic_write, read_json
from kdrun.run_config import flatten

# The fields of results.json a row carries. Runs whose results.json records its `config` are grouped by
# that config (see `setup`); older ones, without it, by these fields.
FIELDS = ("label", "role", "dataset", "teacher", "student", "loss", "T", "alpha", "temperature_schedule",
          "alpha_schedule", "epochs", "lr", "batch_size", "n_train", "n_test", "transfer_set", "labels", "augment",
          "jitter", "flip", "views", "lam", "mu", "mmd_kernel", "bandwidth", "detach_targets", "weight", "n_students")
# (header, key, shown): "always", or "any" (when some row has a value) / "varies" (when rows differ)
COLUMNS = [("model", "name", "always"), ("teacher", "teacher", "always"), ("student", "student", "always"),
           ("loss", "loss", "varies"), ("transfer", "transfer", "any"), ("epochs", "epochs", "varies"),
           ("T", "T", "always"), ("alpha", "alpha", "always"), ("test errors", "errors", "always"),
           ("after bias correction", "corrected", "any"), ("bias shift", "shift", "any"),
           ("errors on unseen classes, before -> after", "unseen", "any"),
           ("train acc", "train_accuracy", "always"), ("test acc", "accuracy", "always"), ("n", "n", "always"),
           ("gap recovered", "gap_recovered", "always"), ("ensemble gain kept", "gain_kept", "any"),
           ("vs alone", "vs_alone", "any"), ("params", "n_params", "varies")]
# top-level config keys that are not the setup: the seed (what mean and std are taken over), paths, speed
NOT_SETUP = ("seed", "teacher_ckpt", "ckpt", "compile", "channels_last")
# a preset's list of runs and its reference numbers: what a pipeline does, not what one run computes
NOT_SETUP_GROUPS = ("pipeline", "paper")
# what a role's setup leaves out: a teacher is its own config and data; a student alone has no teacher,
# so the temperature and the teacher's keys do nothing for it
ROLE_SETUP = {"teacher": {"keep": ("teacher", "dataset")},
              "student alone": {"drop": ("T", "temperature", "teacher", "teacher_seed", "loss.temperature")}}
# the essential columns that show a setting, which a config column may repeat (T: temperature.value)
SETUP_COLUMNS = ("teacher", "student", "loss", "epochs", "T", "alpha")
ROLE_ORDER = ["teacher", "student alone", "distilled", "self-distilled", "mutual student", "mutual ensemble", "ensemble"]
COMMANDS = ("train", "distill", "self-distill", "mutual", "ensemble")


def _cell(v, key=None):
    if key in ("T", "alpha") and isinstance(v, float):
        return f"{v:g}"
    if isinstance(key, str) and key.endswith("._target_") and isinstance(v, str):
        return v.rsplit(".", 1)[-1]
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) <= 1 else f"{v:g}"
    return "-" if v is None else str(v)


def markdown_table(rows, columns):
    """rows: dicts; columns: (header, key) pairs. Returns a Markdown table as a string."""
    cells = [[_cell(r.get(key), key) for _, key in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(columns)]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    out = [line([h for h, _ in columns]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(c) for c in cells])


def role(result):
    if result.get("role") in ROLE_ORDER:  # the commands past train and distill say what their rows are
        return result["role"]
    if result.get("command") == "train":
        return "teacher"
    return "student alone" if result.get("teacher_key") is None else "distilled"


def collect(paths):
    """Every model's results.json under `paths` (files or folders), plus the stored results of
    each teacher a distilled run names, so a sweep dir alone yields its teacher's row. A teacher
    appears once however many runs name or reuse it."""
    runs, teachers = {}, {}
    for path in map(Path, paths):
        for f in [path] if path.is_file() else sorted(path.rglob("results.json")):
            r = read_json(f)
            if r.get("command") not in COMMANDS or r.get("role") == "fused sweep":  # its students are runs
                continue
            r = {**r, "role": role(r)}
            if r["role"] == "teacher":
                teachers.setdefault(r.get("teacher_key") or r.get("run_dir"), r)
                continue
            if r["role"] == "student alone":  # T and the soft loss mean nothing without a teacher
                r["T"] = r["loss"] = None
            runs[r.get("run_dir", str(f.parent))] = r
    for r in list(runs.values()):
        if r["role"] != "distilled":
            continue
        t = r.get("teacher_results")  # an ensemble's row, as this run measured it
        meta = Path(r["teacher_ckpt"]).with_name("teacher.json") if r.get("teacher_ckpt") else None
        if t is None and meta is not None and meta.is_file():
            t = read_json(meta)["results"]
        if t is not None:
            teachers.setdefault(t.get("teacher_key") or t["run_dir"], {**t, "role": "teacher"})
    return list(teachers.values()) + list(runs.values())


def _mean(members, get):
    values = [get(m) for m in members]
    return None if any(v is None for v in values) else statistics.fmean(values)


def summarise(runs):
    """One row per setup: mean and std of test errors over seeds, and the share of the
    teacher-student gap each distilled setup recovered."""
    done = [r for r in runs if r.get("status") in ("completed", "reused")]
    groups = {}
    for r in done:
        groups.setdefault(group_key(r), []).append(r)
    rows = []
    for members in groups.values():
        errors = [m["test_errors"] for m in members]
        row = {k: members[0].get(k) for k in FIELDS}
        row.update(setup=setup(members[0]) or {}, members=members)
        row.update(errors_mean=statistics.fmean(errors), errors_std=statistics.stdev(errors) if len(errors) > 1 else 0.0,
                   accuracy=statistics.fmean(m["test_accuracy"] for m in members), n=len(members),
                   train_accuracy=_mean(members, lambda m: m.get("train_accuracy")),
                   seeds=sorted(m.get("seed") for m in members), teacher_keys={m.get("teacher_key") for m in members})
        row["errors"] = f"{row['errors_mean']:.1f} ± {row['errors_std']:.1f}"
        row["name"] = row["label"] or row["role"]
        if row["role"] == "mutual ensemble" and row["label"]:
            row["name"] += " ensemble"
        jitter = ", ".join(filter(None, [f"{row['jitter']}px jitter" if row["jitter"] else None,
                                         "flip" if row["flip"] else None])) if not row["augment"] else None
        unlabeled = "unlabeled" if row["labels"] is False else None
        row["transfer"] = "; ".join(filter(None, [row["transfer_set"], unlabeled, row["augment"] or jitter, row["views"]])) or None
        corrected = _mean(members, lambda m: (m.get("bias_correction") or {}).get("test_errors_after"))
        if corrected is not None:
            row["corrected_mean"] = corrected
            row["corrected"] = f"{corrected:.1f}"
            row["shift"] = f"{_mean(members, lambda m: m['bias_correction']['shift']):+.2f}"
            before = _mean(members, lambda m: m["bias_correction"].get("test_errors_unseen_before"))
            after = _mean(members, lambda m: m["bias_correction"].get("test_errors_unseen_after"))
            if before is not None and after is not None:
                row["unseen"] = f"{before:g} -> {after:g} of {members[0]['bias_correction']['n_test_unseen']}"
        row["members_errors_mean"] = members[0].get("members_test_errors_mean")  # an ensemble teacher's
        row["members_n_params"] = {m.get("n_params") for m in members[0].get("members") or []}
        row["n_params"] = members[0].get("n_params")
        rows.append(row)
    for row in rows:
        if row["role"] == "distilled":
            row["gap_recovered"] = _gap(row, rows)
            row["gain_kept"], row["gain_kept_std"] = _gain_kept(row, rows)
        if row["role"] not in ("teacher", "student alone"):
            row["vs_alone"] = _vs_alone(row, rows)
    rows.sort(key=lambda r: (ROLE_ORDER.index(r["role"]), str(r["student"]), str(r["label"]), r["T"] or 0,
                             r["alpha"] or 0, json.dumps(r["setup"], sort_keys=True, default=str)))
    failed = [r for r in runs if r.get("status") not in ("completed", "reused")]
    return rows, failed


def setup(result):
    """The flattened config a run is grouped by: every resolved key but the seed (any key named seed),
    paths (NOT_SETUP's and any absolute path) and timing, as the run's role sees it (ROLE_SETUP).
    None for a results.json without `config`."""
    config = result.get("config")
    if config is None:
        return None
    rule = ROLE_SETUP.get(result.get("role"), {})
    if "keep" in rule:
        config = {k: v for k, v in config.items() if k in rule["keep"]}
    flat = flatten(config)
    dropped = rule.get("drop", ())
    return {k: v for k, v in flat.items() if k not in NOT_SETUP and k.rsplit(".", 1)[-1] != "seed"
            and k.split(".", 1)[0] not in NOT_SETUP_GROUPS
            and not any(k == d or k.startswith(d + ".") for d in dropped)
            and not (isinstance(v, str) and os.path.isabs(v))}


def group_key(result):
    """Runs with equal keys are one row: the same role, label and teacher and the same setup (or, for
    results.json without `config`, the same FIELDS). Older and newer results never share a row."""
    flat = setup(result)
    if flat is None:
        return ("fields", *(json.dumps(result.get(k), sort_keys=True, default=str) for k in FIELDS))
    return ("config", result.get("role"), result.get("label"), result.get("teacher"),
            json.dumps(flat, sort_keys=True, default=str))


def _gap(row, rows):
    """(errors alone - errors distilled) / (errors alone - errors teacher), from the group means. The
    student alone is the plain one (no jitter) on the same transfer set, or, where the recipe always
    augments (crops and flips on CIFAR), the one augmented alike; of several, the one trained as many
    epochs."""
    same_data = [r for r in rows if r["role"] == "student alone"
                 and all(r[k] == row[k] for k in ("student", "dataset", "n_train", "n_test", "transfer_set"))]
    alone = [r for r in same_data if not r["jitter"] and not r["flip"]] or [
        r for r in same_data if (r["jitter"], r["flip"]) == (row["jitter"], row["flip"])]
    if len(alone) > 1:
        alone = [r for r in alone if r["epochs"] == row["epochs"]]
    teacher = _teachers_of(row, rows)
    if len(alone) != 1 or len(teacher) != 1:
        return None
    gap = alone[0]["errors_mean"] - teacher[0]["errors_mean"]
    return (alone[0]["errors_mean"] - row["errors_mean"]) / gap if gap > 0 else None


def _teachers_of(row, rows):
    """The teacher rows a row's runs learnt from: one row where its seeds had one teacher, or one
    teacher each of the same setup (teacher_seed=same)."""
    return [r for r in rows if r["role"] == "teacher" and row["teacher_keys"] <= r["teacher_keys"]]


def _vs_alone(row, rows):
    """Mean test errors minus those of the same student alone (same data, epochs and batch size), when
    exactly one such run is there; negative is better."""
    alone = [r for r in rows if r["role"] == "student alone" and all(
        r[k] == row[k] for k in ("student", "dataset", "n_train", "n_test", "transfer_set", "epochs", "batch_size"))]
    if len(alone) > 1:
        alone = [r for r in alone if (r["jitter"], r["flip"]) == (row["jitter"], row["flip"])]
    return f"{row['errors_mean'] - alone[0]['errors_mean']:+.1f}" if len(alone) == 1 else None


def _gain_kept(row, rows):
    """Of an ensemble teacher's gain over its average member, the share a distilled model of the members'
    size kept, (members' mean errors - errors distilled) / (members' mean errors - ensemble errors): its
    mean and std over the row's runs (seeds), each run measured on its own; (None, None) where it does
    not apply."""
    teacher = _teachers_of(row, rows)
    if len(teacher) != 1 or teacher[0]["members_errors_mean"] is None or teacher[0]["members_n_params"] != {row["n_params"]}:
        return None, None
    single, ensemble = teacher[0]["members_errors_mean"], teacher[0]["errors_mean"]
    if single <= ensemble:
        return None, None
    kept = [(single - m["test_errors"]) / (single - ensemble) for m in row["members"]]
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def _gap_cell(rows):
    def percent(v):
        return None if v is None else f"{v:.1%}"

    def kept(r):
        if r.get("gain_kept") is None:
            return None
        return percent(r["gain_kept"]) + (f" ± {r['gain_kept_std']:.1%}" if r["n"] > 1 else "")

    return [{**r, "gap_recovered": percent(r.get("gap_recovered")), "gain_kept": kept(r)} for r in rows]


def top1(row):
    """A row's test accuracy in percent, mean (± std over seeds when it has several)."""
    spread = f" ± {100 * row['errors_std'] / row['n_test']:.2f}" if row["n"] > 1 else ""
    return f"{100 * row['accuracy']:.2f}{spread}"


def paper_section(rows, paper, order=()):
    """How a preset's setup differs from the paper's, and the paper's numbers beside the ones measured
    here. `paper`: {source, dataset, n_test, measure, differences: [...], rows: [{run, what, errors,
    corrected} or {run, what, accuracy (top-1 %)}], pairs: [...] (see pairs_section)}."""
    lines = [f"## Compared with {paper['source']}", ""]
    lines += [f"- {d}" for d in paper.get("differences") or []]
    refs = paper.get("rows") or []
    accuracy = any("accuracy" in ref for ref in refs)  # the paper gives top-1 %, so measured numbers are shown alike
    table = []
    for ref in refs:
        mine = [r for r in rows if r["name"] == ref["run"]]
        shown = top1 if accuracy else (lambda r: r["errors"])
        here = "; ".join(shown(r) + (f" (T={r['T']:g})" if len(mine) > 1 and r["T"] else "") for r in mine) or "not run"
        fixed = "; ".join(r["corrected"] for r in mine if r.get("corrected")) or None
        table.append({"run": ref["run"], "what": ref.get("what"), "paper": ref.get("accuracy" if accuracy else "errors"),
                      "paper_fixed": ref.get("corrected"), "here": here, "here_fixed": fixed})
    n_here = rows[0]["n_test"] if rows else "?"
    default = f"paper: errors of {paper.get('n_test', 10000)} ({paper.get('dataset', 'MNIST')})"
    here = f"here: top-1 % of {n_here} test images" if accuracy else f"here: errors of {n_here}"
    columns = [("run", "run"), ("setup in the paper", "what"), (paper.get("measure") or default, "paper"), (here, "here")]
    if any(t["paper_fixed"] is not None or t["here_fixed"] for t in table):
        columns[3:3] = [("paper: after bias fix", "paper_fixed")]
        columns.append(("here: after bias correction", "here_fixed"))
    if table:
        lines += ["", markdown_table(table, columns)]
    if paper.get("pairs"):
        lines += ["", pairs_section(rows, paper["pairs"], order)]
    return "\n".join(lines) + "\n\n## Results\n\n"


def _millions(n):
    return "-" if n is None else f"{n / 1e6:.2f}M"


def pairs_section(rows, pairs, order=()):
    """One line per teacher -> student pair: the parameters of both, the teacher's and each run's top-1 %
    measured here (runs by name, in `order`), then the published top-1 % of each of the pair's paper rows.
    `pairs`: [{teacher, student, rows: [{run, accuracy, method}]}]; a pair nothing was measured of is left out."""
    names = [n for n in order if any(r["name"] == n and r["role"] != "teacher" for r in rows)]
    names += [n for n in dict.fromkeys(r["name"] for r in rows if r["role"] != "teacher") if n not in names]
    published = list(dict.fromkeys(ref["run"] for p in pairs for ref in p.get("rows") or []))
    table = []
    for pair in pairs:
        t, s = pair["teacher"], pair["student"]
        mine = [r for r in rows if r["role"] != "teacher" and r["student"] == s
                and (r["role"] == "student alone" or r["teacher"] == t)]
        keys = set().union(*(r["teacher_keys"] for r in mine if r["role"] != "student alone"))
        teacher = [r for r in rows if r["role"] == "teacher" and (r["teacher_keys"] & keys if keys else r["teacher"] == t)]
        if not mine and not teacher:
            continue
        line = {"pair": f"{t} -> {s}", "params": f"{_millions(teacher[0]['n_params'] if teacher else None)} / "
                                                  f"{_millions(mine[0]['n_params'] if mine else None)}",
                "teacher": "; ".join(map(top1, teacher)) or "-"}
        for n in names:
            line[f"run:{n}"] = "; ".join(top1(r) for r in mine if r["name"] == n) or "-"
        for ref in pair.get("rows") or []:
            method = f" ({ref['method']})" if ref.get("method") else ""
            line[f"paper:{ref['run']}"] = f"{ref['accuracy']:g}{method}"
        table.append(line)
    if not table:
        return ""
    n_test = rows[0]["n_test"]
    columns = [("pair", "pair"), ("params T / S", "params"), ("teacher", "teacher"),
               *[(n, f"run:{n}") for n in names], *[(f"published {n}", f"paper:{n}") for n in published]]
    return (f"### Teacher -> student pairs, top-1 %\n\nMeasured here: top-1 accuracy (%) on {n_test} test images, "
            "mean ± std over seeds where a run has several; published: the papers' top-1 (%) on the 10,000 CIFAR-100 "
            "test images (each included preset's paper rows).\n\n" + markdown_table(table, columns))


def visible_columns(rows):
    """The essentials (COLUMNS) that apply, and after alpha every config key that tells two rows apart."""
    def shown(key, when):
        values = [r.get(key) for r in rows if r.get(key) is not None]
        return when == "always" or (when == "any" and values) or (when == "varies" and len(set(values)) > 1)

    columns = [(header, key) for header, key, when in COLUMNS if shown(key, when)]
    at = [key for _, key in columns].index("alpha") + 1
    setup_columns = [key for _, key in columns if key in SETUP_COLUMNS]
    return columns[:at] + [(k, k) for k in config_columns(rows, setup_columns)] + columns[at:]


def _value(row, key):
    setup = row.get("setup") or {}
    return setup[key] if key in setup else row.get(key)


def _same(a, b):
    """Equal, or a class path and its class name (kdrun.objectives.HintonKD, HintonKD)."""
    if a == b:
        return True
    return isinstance(a, str) and isinstance(b, str) and a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1]


def config_columns(rows, shown):
    """Config keys (dotted) that differ between two rows of the same role, left out where that is
    explained by a differing choice above the key (another `name` or `_target_` of an enclosing node:
    student=cnn vs student=mlp800 differ in every student.* key) or where the column would repeat,
    row for row, one already shown (temperature.value and T)."""
    keys = sorted({k for r in rows for k in r.get("setup") or {}}, key=lambda k: (k.count("."), k))  # shortest first
    chosen = []
    for key in keys:
        if _differs(rows, key) and not any(_repeats(rows, key, other) for other in [*shown, *chosen]):
            chosen.append(key)
    return chosen


def with_config_values(rows, columns):
    """Copies of rows holding the value of each config column among `columns` ((header, key) pairs)."""
    essentials = {key for _, key, _ in COLUMNS}
    keys = [k for _, k in columns if k not in essentials]
    return [{**r, **{k: (r.get("setup") or {}).get(k) for k in keys}} for r in rows]


def _differs(rows, key):
    parents = [key.rsplit(".", i)[0] for i in range(key.count("."), 0, -1)]
    choices = [f"{p}.{c}" for p in parents for c in ("name", "_target_") if f"{p}.{c}" != key]
    for a, b in itertools.combinations([r for r in rows if key in (r.get("setup") or {})], 2):
        if a["role"] == b["role"] and a["setup"][key] != b["setup"][key] and all(
                a["setup"].get(c) == b["setup"].get(c) for c in choices):
            return True
    return False


def _repeats(rows, key, other):
    pairs = [(r["setup"][key], _value(r, other)) for r in rows if key in (r.get("setup") or {})]
    pairs = [(a, b) for a, b in pairs if b is not None]
    return bool(pairs) and all(_same(a, b) for a, b in pairs)


def render(rows, failed, title, notes=""):
    columns = visible_columns(rows)
    text = f"# {title}\n\n{notes}{markdown_table(with_config_values(_gap_cell(rows), columns), columns)}\n"
    text += "\nTest errors are the last epoch's, mean ± std over seeds (n runs); gap recovered = " \
            "(errors alone - errors distilled) / (errors alone - errors teacher), against the plain student " \
            "alone (no jitter) on the same transfer set, of the same epochs where there are several.\n"
    if any(r.get("vs_alone") is not None for r in rows):
        text += "vs alone = mean test errors minus those of the same network trained alone on the same data (negative: " \
                "fewer errors).\n"
    if any(r.get("gain_kept") is not None for r in rows):
        text += "Ensemble gain kept = (members' mean errors - errors distilled) / (members' mean errors - " \
                "ensemble errors): the paper's measure for Table 1 (it reports more than 80%), mean ± std of each seed's.\n"
    if any(r.get("corrected") for r in rows):
        text += "Bias correction: one additive shift of the affected classes' logits, tuned on a validation " \
                "split carved from the training data (never the test set).\n"
    if failed:
        text += "\nFailed runs:\n\n" + "\n".join(f"- {r.get('run_dir')}: {r.get('error')}" for r in failed) + "\n"
    return text


def to_csv(rows):
    buf = io.StringIO()
    shown = visible_columns(rows)
    columns = [k for _, k in shown if k not in {key for _, key, _ in COLUMNS} and k not in FIELDS]
    rows = with_config_values(rows, shown)
    fields = [*FIELDS, *columns, "errors_mean", "errors_std", "accuracy", "train_accuracy", "n", "seeds", "gap_recovered",
              "gain_kept", "gain_kept_std", "vs_alone", "n_params", "members_errors_mean", "corrected_mean", "shift"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot(rows, path):
    """Test errors against T (log axis), one line per student, with the teacher and each student
    alone as horizontal lines; error bars are the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {}  # a student's lines share a colour: its distilled runs, and it alone (dotted)
    for name, student in sorted({(r["name"], r["student"]) for r in rows if r["role"] == "distilled"}):
        points = sorted((r["T"], r["errors_mean"], r["errors_std"]) for r in rows
                        if r["role"] == "distilled" and (r["name"], r["student"]) == (name, student))
        bars = ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                           capsize=3, label=f"{student} {name}")
        colours.setdefault(student, bars.lines[0].get_color())
    teacher_styles = itertools.cycle(["--", "-.", (0, (5, 1, 1, 1, 1, 1))])  # an ensemble and its members: several teachers
    for r in rows:
        if r["role"] != "distilled":
            name = f"{r['teacher']} (teacher)" if r["role"] == "teacher" else f"{r['student']} {r['name']}"
            teacher = r["role"] == "teacher"
            ax.axhline(r["errors_mean"], linestyle=next(teacher_styles) if teacher else ":",
                       color="black" if teacher else colours.get(r["student"], "gray"), label=name)
    temperatures = sorted({r["T"] for r in rows if r["role"] == "distilled"})
    ax.set_xscale("log")
    ax.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
    ax.minorticks_off()
    ax.set_xlabel("temperature T")
    ax.set_ylabel(f"test errors (of {rows[0]['n_test']})" if rows else "test errors")
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def comparison_section(c):
    """A report section of compare.paired's result: the pairs, the mean difference, its std, the t-test."""
    def num(v, sign=False):
        if float(v).is_integer():
            return f"{v:+g}" if sign else f"{v:g}"
        return f"{v:+.2f}" if sign else f"{v:.2f}"

    pairs = [{"seed": s, "a": num(x), "b": num(y), "d": num(d, sign=True)}
             for s, x, y, d in zip(c["seeds"], c["errors_a"], c["errors_b"], c["diffs"])]
    table = markdown_table(pairs, [("seed", "seed"), (f"A: {c['a']}", "a"), (f"B: {c['b']}", "b"), ("A - B", "d")])
    test = (f"paired t-test t = {c['t']:.3f}, p = {c['p']:.4g} (two-sided)" if c["p"] is not None else
            "paired t-test undefined (every pair differs by the same amount)")
    return (f"\n## Paired comparison: {c['a']} vs {c['b']}\n\n{table}\n\n"
            f"Mean difference A - B: {num(c['mean'], sign=True)} test errors, std {c['std']:.2f} over {c['n']} seeds; "
            f"{test}. Negative: A makes fewer errors.\n")


def write(paths, out_dir, title="kdrun report", paper=None, comparisons=(), order=()):
    """Summarise, then write report.md/.csv (and .png when there are temperatures to plot).
    `paper`: a preset's reference numbers and differences from the paper (see paper_section; `order`:
    the runs' names in the order a table of pairs shows them);
    `comparisons`: (A, B) selector pairs, each a paired comparison over seeds (kdrun.compare)."""
    rows, failed = summarise(collect(paths))
    out_dir = Path(out_dir)
    compared = [compare.paired(rows, a, b) for a, b in comparisons]  # a bad selector stops before any write
    text = render(rows, failed, title, paper_section(rows, paper, order) if paper else "")
    text += "".join(comparison_section(c) for c in compared)
    atomic_write(out_dir / "report.md", lambda f: f.write(text), mode="w")
    atomic_write(out_dir / "report.csv", lambda f: f.write(to_csv(rows)), mode="w")
    if any(r["role"] == "distilled" and r["T"] is not None for r in rows):
        plot(rows, out_dir / "report.png")
    return text, rows


def write_sweep_summary(sweep_dir, task_overrides):
    """summary.csv: one row per job of a sweep with every swept key, its status and its numbers.
    A job with no results.json (killed) still gets a row."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    rows = []
    for job in sorted((p for p in Path(sweep_dir).iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                      key=lambda p: int(p.name) if p.name.isdigit() else p.name):
        values = dict(o.partition("=")[::2] for o in _overrides_of(job))
        result = read_json(job / "results.json") if (job / "results.json").is_file() else {"status": "missing"}
        rows.append({"job": job.name, **{k: values.get(k) for k in swept},
                     **{k: result.get(k) for k in ("status", "test_accuracy", "test_errors", "wall_s", "error")}})
    return write_summary(sweep_dir, swept, rows)


def write_summary(sweep_dir, swept, rows):
    """summary.csv of a sweep's jobs: job, the swept keys, status, test accuracy and errors, wall time."""
    fields = ["job", *swept, "status", "test_accuracy", "test_errors", "wall_s", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(sweep_dir) / "summary.csv", lambda f: f.write(buf.getvalue()), mode="w")
    return rows


def _overrides_of(job_dir):
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]


def main(argv):
    """`kdrun report PATH... [--out DIR] [--compare A B]...`."""
    import argparse

    parser = argparse.ArgumentParser(prog="kdrun report", description="Summarise results.json files under PATHs.")
    parser.add_argument("paths", nargs="+", help="sweep dirs, run dirs, results.json files or a workdir")
    parser.add_argument("--out", help="where report.md/.csv/.png go (default: the first PATH if a folder, else .)")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                        help="paired comparison over seeds of rows A and B (test errors A - B, std, paired t-test); "
                             "A, B: a row's model name, or KEY=VALUE terms joined by commas (loss=hinton,T=2)")
    parser.error = usage_error
    args = parser.parse_args(argv)
    for p in args.paths:
        if not Path(p).exists():
            raise KdrunError(f"no such file or folder: {p}")
    out = Path(args.out or (args.paths[0] if Path(args.paths[0]).is_dir() else "."))
    rows, _ = summarise(collect(args.paths))
    if not rows:
        raise KdrunError(f"no completed train or distill results under {', '.join(args.paths)}")
    text = write(args.paths, out, comparisons=[tuple(c) for c in args.compare])[0]
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.csv'}" + (f", {out / 'report.png'}" if (out / "report.png").exists() else ""))
    return 0
