"""`kdrun report --compare A B`: two rows of a report compared over the seeds both ran, run by run.

A and B each pick one row. A selector is one or more terms joined by commas, every term true of the row:
- a row's name, as the report's `model` column shows it (a pipeline run's name), or its role (`teacher`,
  `student alone`, `distilled`, `self-distilled`, `mutual student`, ...);
- `KEY=VALUE`: a field the row shows (`T=2`, `student=mlp30`, `loss=HintonKD`), a dotted config key
  (`temperature.start=2`, `loss.lam=0.5`), or a config group and one of its options (`loss=hinton`,
  `temperature=anneal`: the row's config has that option's `_target_`, or its `name`).
Runs pair up by seed (a seed's runs are averaged if a row holds several); the difference is A - B in
test errors, with its sample std over the pairs and the two-sided p-value of the paired t-test."""

import math
import statistics
import warnings

import yaml
from omegaconf import OmegaConf

from kdrun import configs
from kdrun.errors import KdrunError


def selector_terms(spec):
    """The terms of a selector: its comma-separated parts, stripped, empty ones dropped."""
    return [t.strip() for t in spec.split(",") if t.strip()]


def select(rows, spec):
    """The one row `spec` picks (see the module's docstring)."""
    terms = selector_terms(spec)
    if not terms:
        raise KdrunError(f"--compare: empty selector {spec!r}; name a row (its model column) or give KEY=VALUE")
    found = [r for r in rows if r.get("members") and all(_holds(r, t) for t in terms)]
    if len(found) == 1:
        return found[0]
    if not found:
        names = ", ".join(dict.fromkeys(r["name"] for r in rows))
        raise KdrunError(f"--compare: no row matches '{spec}'; rows: {names}")
    raise KdrunError(f"--compare: '{spec}' matches {len(found)} rows ({describe_rows(found)}); add KEY=VALUE terms, "
                     "joined by commas, to pick one")


def describe_rows(rows):
    """How the rows differ, in KEY=VALUE terms a selector could use."""
    keys, seen = [], []
    for k in ["T", "alpha", *sorted({k for r in rows for k in r.get("setup") or {}}, key=lambda k: (k.count("."), k))]:
        values = [repr(_get(r, k)) for r in rows]
        split = [values.index(v) for v in values]  # which rows it tells apart
        if len(set(values)) > 1 and split not in seen:  # keys that differ, each way of differing once
            keys.append(k)
            seen.append(split)
    keys = keys or ["T", "alpha"]
    return "; ".join(" ".join(f"{k}={_shown(_get(r, k))}" for k in keys[:4]) for r in rows)


def _get(row, key):
    setup = row.get("setup") or {}
    return setup[key] if key in setup else row.get(key)


def _shown(v):
    return v.rsplit(".", 1)[-1] if isinstance(v, str) else v


def _holds(row, term):
    if "=" not in term:
        return term in (row.get("name"), row.get("role"))
    key, _, text = term.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    setup = row.get("setup") or {}
    candidates = [row.get(key)] if key in row and "." not in key else []
    if key in setup:
        candidates.append(setup[key])
    if any(_equal(c, value) or _equal(c, text) for c in candidates):
        return True
    option = configs.option_file(key, text) if "." not in key and "/" not in text else None
    if option is None:
        return False
    picked = OmegaConf.to_container(OmegaConf.load(option))
    target, name = picked.get("_target_"), picked.get("name")
    return (target is not None and setup.get(f"{key}._target_") == target) or (
        name is not None and setup.get(f"{key}.name") == name)


def _equal(have, want):
    if have is None:
        return want is None
    if isinstance(have, bool) or isinstance(want, bool):
        return have is want
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return math.isclose(have, want, rel_tol=1e-12, abs_tol=0)
    if isinstance(have, str) and isinstance(want, str):
        return have == want or have.rsplit(".", 1)[-1] == want
    return have == want


def paired(rows, spec_a, spec_b):
    """{a, b, seeds, errors_a, errors_b, diffs, mean, std, t, p, n}: A - B over the seeds both rows ran."""
    from scipy import stats

    a, b = select(rows, spec_a), select(rows, spec_b)
    if a is b:
        raise KdrunError(f"--compare: '{spec_a}' and '{spec_b}' pick the same row")
    by_a, by_b = _per_seed(a), _per_seed(b)
    seeds = sorted(set(by_a) & set(by_b), key=str)
    if len(seeds) < 2:
        raise KdrunError(f"--compare: '{spec_a}' and '{spec_b}' share {len(seeds)} seed(s) "
                         f"({', '.join(map(str, seeds)) or 'none'}); a paired comparison needs 2 or more")
    errors_a, errors_b = [by_a[s] for s in seeds], [by_b[s] for s in seeds]
    diffs = [x - y for x, y in zip(errors_a, errors_b)]
    std = statistics.stdev(diffs)
    if std == 0:  # every pair differs by the same amount: the t statistic is undefined
        t = p = None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test = stats.ttest_rel(errors_a, errors_b)
        t, p = float(test.statistic), float(test.pvalue)
    return {"a": spec_a, "b": spec_b, "row_a": a["name"], "row_b": b["name"], "seeds": seeds, "errors_a": errors_a,
            "errors_b": errors_b, "diffs": diffs, "mean": statistics.fmean(diffs), "std": std, "t": t, "p": p,
            "n": len(seeds)}


def _per_seed(row):
    runs = {}
    for m in row["members"]:
        runs.setdefault(m.get("seed"), []).append(m["test_errors"])
    return {seed: statistics.fmean(errors) for seed, errors in runs.items()}
