"""Where kdrun's config groups live: its own conf/ folder, then the user's folders, named by
`--config-dir DIR` (or `-cd DIR`), `hydra.searchpath=[file://DIR,...]` and `KDRUN_CONFIG_PATH`
(folders separated like PATH). The dispatcher takes those out of the command line and hands the folders
to Hydra through one search path plugin (`use`), after kdrun's conf/, so that every config Hydra
composes in this process sees them: the command's, the preflight's, a pipeline's runs, an ensemble's
members, `--help` and tab completion. The option lists kdrun checks and shows (`unknown student`,
"did you mean") are those of all the folders.

Kept free of heavy imports: `kdrun --help` reads it."""

import importlib.resources
import os
from pathlib import Path

from kdrun.errors import KdrunError

ENV = "KDRUN_CONFIG_PATH"
_user = []  # the user's folders of the request being handled (set by `use`)


def conf_dir():
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):  # wheel install, then source checkout
        if (candidate / "base.yaml").is_file():
            return candidate
    raise KdrunError(f"cannot find kdrun's conf/ directory next to {here}")


def use(entries):
    """Make `entries` (search path entries: `file://DIR`, `pkg://module`, or plain folders) the user's
    folders of this request, after checking each exists and names no option kdrun has already."""
    found = []
    for entry in entries:
        entry = _entry(entry)
        if entry not in found:
            found.append(entry)
    for entry in found:
        where = _folder(entry)
        if where is None or not where.is_dir():
            raise KdrunError(f"config folder not found: {entry.removeprefix('file://')}")
        for group in _own_groups():
            own = set(_options_in(conf_dir(), group))
            clash = sorted(own & set(_options_in(where, group)))
            if clash:
                raise KdrunError(f"{entry.removeprefix('file://')}/{group}/{clash[0]}.yaml has the name of kdrun's own "
                                 f"{group} option; give it another name")
    _user[:] = found
    if found:
        _register_plugin()
    return list(found)


def user_entries():
    return list(_user)


def searchpath_override():
    """The user's folders as one `hydra.searchpath=[...]` override (None when there are none), for a
    config composed where the plugin `use` registers is not there (another process). In this process
    the plugin already adds them; the override repeats them harmlessly."""
    if not _user:
        return None
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in _user)
    return f"hydra.searchpath=[{quoted}]"


def from_env():
    return [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]


def split_user_folders(words):
    """(words without --config-dir/-cd DIR and hydra.searchpath=..., the folders those named in order,
    then KDRUN_CONFIG_PATH's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    rest, folders = [], []
    it = iter(words)
    for word in it:
        if word in ("--config-dir", "-cd"):
            folder = next(it, None)
            if folder is None:
                raise KdrunError(f"{word} needs a folder: kdrun COMMAND {word} DIR")
            folders.append(folder)
        elif word.startswith("--config-dir="):
            folders.append(word.partition("=")[2])
        elif word.partition("=")[0] == "hydra.searchpath":
            try:
                value = OverridesParser.create().parse_override(word).value()
            except Exception as e:
                raise KdrunError(f"hydra.searchpath must be a list like [file://DIR]: {e}") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise KdrunError(f"hydra.searchpath must be a list like [file://DIR], got {word.partition('=')[2]}")
            folders.extend(value)
        else:
            rest.append(word)
    return rest, folders + from_env()


def group_options(group):
    """The options of a config group: kdrun's and those in the user's folders."""
    names = set(_options_in(conf_dir(), group))
    for entry in _user:
        names.update(_options_in(_folder(entry), group))
    return sorted(names)


def groups():
    names = set(_own_groups())
    for entry in _user:
        where = _folder(entry)
        names.update(p.name for p in where.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    return sorted(names)


def _own_groups():
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir())


def _options_in(folder, group):
    where = folder / group if folder is not None else None
    if where is None or not where.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in where.iterdir() if p.name.endswith(".yaml"))


def _entry(entry):
    """A search path entry as Hydra takes it: plain folders become file:// with an absolute path."""
    if entry.startswith("pkg://"):
        return entry
    return "file://" + str(Path(entry.removeprefix("file://")).expanduser().resolve())


def _folder(entry):
    if entry.startswith("file://"):
        return Path(entry.removeprefix("file://"))
    try:
        return Path(str(importlib.resources.files(entry.removeprefix("pkg://").replace("/", "."))))
    except (ModuleNotFoundError, TypeError, ValueError):
        return None


def option_file(group, name):
    """The yaml file of option `name` of `group` (kdrun's first, then the user's folders), or None."""
    for folder in [conf_dir(), *(_folder(e) for e in _user)]:
        if folder is not None and name in _options_in(folder, group):
            return folder / group / f"{name}.yaml"
    return None


_plugin = []


def _register_plugin():
    """Register, once per process, the search path plugin that appends the user's folders (Hydra's
    Plugins.register: what a plugin package would do, without one on disk)."""
    if _plugin:
        return
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class UserConfigFolders(SearchPathPlugin):
        def manipulate_search_path(self, search_path):
            for entry in _user:
                search_path.append(provider="kdrun user folder", path=entry)

    Plugins.instance().register(UserConfigFolders)
    _plugin.append(UserConfigFolders)
