"""Checks of a composed config that Hydra cannot make, each with one exact message."""

import math
import numbers

from omegaconf import OmegaConf

from kdrun.errors import KdrunError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16")


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise KdrunError(f"{name} must be a number, got {value!r}")
    return value


def integer(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        tail = " or null" if allow_none else ""
        raise KdrunError(f"{name} must be an integer >= {minimum}{tail}, got {value!r}")


def boolean(name, value):
    if not isinstance(value, bool):
        raise KdrunError(f"{name} must be true or false, got {value!r}")


def _int_list(name, value):
    shown = list(value) if OmegaConf.is_list(value) else value
    if not isinstance(shown, list) or not shown or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                         for v in shown):
        raise KdrunError(f"{name} must be a non-empty list of integers >= 1, got {shown!r}")


def _in_range(name, value, lo, hi, hi_open=False):
    v = _number(name, value)
    if v < lo or v > hi or (hi_open and v == hi):
        bracket = ")" if hi_open else "]"
        raise KdrunError(f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}")


def _positive(name, value):
    if _number(name, value) <= 0:
        raise KdrunError(f"{name} must be > 0, got {value!r}")


def model_spec(role, spec):
    """A model config and its recipe (`role`: how messages name it, e.g. teacher or student)."""
    m = spec.model
    if str(m.get("_target_", "")).startswith("kdrun."):  # kdrun's own models' keys; another model checks its own
        _own_model_keys(role, m)
    _recipe(role, spec.recipe)


def _own_model_keys(role, m):
    for key in ("dropout_input", "dropout_hidden", "dropout"):
        if key in m:
            _in_range(f"{role}.model.{key}", m[key], 0, 1, hi_open=True)
    for key in ("hidden", "channels", "widths"):
        if key in m:
            _int_list(f"{role}.model.{key}", m[key])
    if "fc" in m:  # one hidden layer (SmallCNN) or several (LeNet5)
        if OmegaConf.is_list(m.fc):
            _int_list(f"{role}.model.fc", m.fc)
        else:
            integer(f"{role}.model.fc", m.fc, 1)
    if "depth" in m:
        integer(f"{role}.model.depth", m.depth, 8)
    if m.get("max_norm") is not None:
        _positive(f"{role}.model.max_norm", m.max_norm)


def _recipe(role, r):
    integer(f"{role}.recipe.epochs", r.epochs, 1)
    integer(f"{role}.recipe.batch_size", r.batch_size, 1)
    integer(f"{role}.recipe.jitter", r.jitter, 0)
    boolean(f"{role}.recipe.flip", r.get("flip", False))
    integer(f"{role}.recipe.val_size", r.get("val_size", 0), 0)
    _positive(f"{role}.recipe.optimizer.lr", r.optimizer.lr)
    _choice(f"{role}.recipe.precision", r.get("precision", "fp32"), PRECISIONS)


def _choice(name, value, options):
    if value not in options:
        raise KdrunError(f"{name} must be one of {', '.join(options)}, got {value!r}")


def validate(cfg):
    """Raise KdrunError for the first bad value in a composed (unresolved) command config."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if "T" in cfg:
        _positive("T", cfg.T)
    if "alpha" in cfg:
        _in_range("alpha", cfg.alpha, 0, 1)
    for key in ("epochs", "batch_size"):
        integer(key, cfg.get(key), 1, allow_none=True)
    if cfg.get("lr") is not None:
        _positive("lr", cfg.lr)
    integer("seed", cfg.seed, 0)
    if cfg.teacher_seed != "same":
        try:
            integer("teacher_seed", cfg.teacher_seed, 0)
        except KdrunError:
            raise KdrunError(f"teacher_seed must be an integer >= 0 or same (the run's own seed), "
                             f"got {cfg.teacher_seed!r}") from None
    for key in ("retrain", "resume", "compile", "channels_last"):
        boolean(key, cfg[key])
    if cfg.precision is not None:
        _choice("precision", cfg.precision, PRECISIONS)
    if cfg.device not in DEVICES:
        raise KdrunError(f"device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    ds = cfg.dataset
    integer("dataset.limit", ds.limit, 1, allow_none=True)
    integer("dataset.test_limit", ds.test_limit, 1, allow_none=True)
    integer("dataset.subset_seed", ds.subset_seed, 0)
    for key in ("mean", "std"):
        if ds[key] == "auto":  # computed over the train split
            continue
        values = ds[key] if OmegaConf.is_list(ds[key]) else [ds[key]]
        if len(values) not in (1, ds.shape[0]):
            raise KdrunError(f"dataset.{key} must be one number or one per channel ({ds.shape[0]}), got {list(values)}")
        for v in values:
            if key == "std":
                _positive("dataset.std", v)
            else:
                _in_range("dataset.mean", v, 0, 1)
    if ds.get("in_memory", "auto") not in ("auto", True, False):
        raise KdrunError(f"dataset.in_memory must be auto, true or false, got {ds.in_memory!r}")
    if ds.get("max_memory_gb") is not None:
        _positive("dataset.max_memory_gb", ds.max_memory_gb)
    if ds.get("workers", "auto") != "auto":
        integer("dataset.workers", ds.workers, 0)
    if ds.limit is not None and ds.limit < ds.num_classes:
        raise KdrunError(f"dataset.limit must be at least the number of classes ({ds.num_classes}), got {ds.limit}")
    if "members" in cfg.teacher:
        _ensemble(cfg)
    else:
        model_spec("teacher", cfg.teacher)
    model_spec("student", cfg.student)
    if "transfer" in cfg:
        _transfer(cfg.transfer, ds)
    if "specialists" in cfg:
        _specialists(cfg)
    for key in ("start", "end"):
        if key in cfg.get("temperature", {}):
            _positive(f"temperature.{key}", cfg.temperature[key])
        if key in cfg.get("alpha_schedule", {}):
            _in_range(f"alpha_schedule.{key}", cfg.alpha_schedule[key], 0, 1)


def _ensemble(cfg):
    """teacher=ensemble's own keys; each member's config is checked when the members are resolved."""
    from kdrun.ensemble import COMBINES

    t = cfg.teacher
    if t.combine not in COMBINES:
        raise KdrunError(f"teacher.combine must be one of {', '.join(COMBINES)}, got {t.combine!r}")
    if not OmegaConf.is_list(t.members) or not t.members:
        raise KdrunError(f"teacher.members must be a non-empty list (seeds, 'teacher=NAME seed=N' strings or "
                         f"model.pt paths), got {t.members!r}")
    integer("teacher.recipe.epochs", t.recipe.epochs, 1, allow_none=True)
    integer("teacher.recipe.batch_size", t.recipe.batch_size, 1, allow_none=True)
    integer("teacher.recipe.val_size", t.recipe.get("val_size"), 0, allow_none=True)
    if t.recipe.optimizer.lr is not None:
        _positive("teacher.recipe.optimizer.lr", t.recipe.optimizer.lr)
    if cfg.teacher_seed != 0 or cfg.get("teacher_ckpt"):
        raise KdrunError("teacher_seed and teacher_ckpt pick one teacher; an ensemble's are teacher.members")


def _specialists(cfg):
    s, t, C = cfg.specialists, cfg.transfer, cfg.dataset.num_classes
    integer("specialists.k", s.k, 2)  # one cluster would hold every class, leaving no dustbin
    if s.k > C:
        raise KdrunError(f"specialists.k must be at most the number of classes ({C}), got {s.k}")
    integer("specialists.min_size", s.min_size, 1)
    if s.min_size > C - 1:
        raise KdrunError(f"specialists.min_size must be at most {C - 1} (a specialist needs a dustbin), got {s.min_size}")
    integer("specialists.top_n", s.top_n, 1)
    if s.top_n > C:
        raise KdrunError(f"specialists.top_n must be at most the number of classes ({C}), got {s.top_n}")
    integer("specialists.only", s.only, 0, allow_none=True)
    if s.only is not None and s.only >= s.k:
        raise KdrunError(f"specialists.only must be below specialists.k ({s.k}), got {s.only}")
    integer("specialists.recipe.epochs", s.recipe.epochs, 1)
    if s.recipe.lr is not None:
        _positive("specialists.recipe.lr", s.recipe.lr)
    integer("specialists.max_iter", s.max_iter, 1)
    if t.val_size < C:
        raise KdrunError(f"kdrun specialists needs transfer.val_size >= {C} (held-out examples whose generalist "
                         f"predictions are clustered), got {t.val_size}")
    for key in ("teacher_ckpt", "retrain"):
        if cfg[key]:
            raise KdrunError(f"kdrun specialists trains (or reuses) its own generalist; {key} is not for it")
    if cfg.teacher_seed != 0:
        raise KdrunError("kdrun specialists trains its generalist with seed=N; teacher_seed is not for it")
    for key, default in (("exclude_classes", []), ("only_classes", []), ("fraction", 1.0), ("labels", True),
                         ("augment", False), ("bias_correction", False)):
        if t[key] != default:
            raise KdrunError(f"kdrun specialists uses transfer.val_size only; transfer.{key} is for kdrun distill")


def _classes(name, value, ds):
    shown = list(value) if OmegaConf.is_list(value) else value
    if not isinstance(shown, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in shown):
        raise KdrunError(f"{name} must be a list of class indices, got {shown!r}")
    for v in shown:
        if not 0 <= v < ds.num_classes:
            raise KdrunError(f"{name} has class {v}, but {ds.name} has classes 0..{ds.num_classes - 1}")
    if len(set(shown)) != len(shown):
        raise KdrunError(f"{name} lists a class twice: {shown}")


def _transfer(t, ds):
    _classes("transfer.exclude_classes", t.exclude_classes, ds)
    _classes("transfer.only_classes", t.only_classes, ds)
    if t.exclude_classes and t.only_classes:
        raise KdrunError("set transfer.exclude_classes or transfer.only_classes, not both")
    if len(t.exclude_classes) == ds.num_classes:
        raise KdrunError(f"transfer.exclude_classes leaves out every class of {ds.name}")
    v = _number("transfer.fraction", t.fraction)
    if v <= 0 or v > 1:
        raise KdrunError(f"transfer.fraction must be in (0, 1], got {t.fraction!r}")
    for key in ("labels", "augment", "cache_features", "bias_correction"):
        boolean(f"transfer.{key}", t[key])
    integer("transfer.val_size", t.val_size, 0)  # its bound, the train split's size, is checked in preflight
    if t.bias_correction and not t.val_size:
        raise KdrunError("transfer.bias_correction=true needs transfer.val_size > 0: the shift is tuned on a "
                         "validation split carved from the training data, never on the test set")
    if t.bias_correction and not (t.exclude_classes or t.only_classes):
        raise KdrunError("transfer.bias_correction=true needs transfer.exclude_classes or transfer.only_classes "
                         "(the classes whose bias is shifted)")
