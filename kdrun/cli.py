"""The `kdrun` entry point: a dispatcher on the first word, then one Hydra app per command (kdrun.launch).
Nothing in kdrun imports this module; it is what `kdrun` and `python -m kdrun` run.

Before Hydra creates any run directory, every job of the request (each point of a sweep) is composed
and checked, so bad input ends in one `kdrun: error: ...` line with nothing written. Heavy imports
(torch, the commands) happen only once a command really runs, so `--help` stays fast.
"""

import difflib
import os
import sys

from kdrun import configs, interrupt
from kdrun.configs import conf_dir
from kdrun.errors import KdrunError, usage_error
from kdrun.launch import COMMANDS, _is_user_error, check_torchrun, expand_alpha_shorthand, explain, preflight, run_hydra

PLAIN_COMMANDS = {"report": "summarise results.json files (sweeps, runs, a workdir) into report.md/.csv/.png",
                  "resume": "finish a stopped run, pipeline or sweep from its checkpoints: kdrun resume DIR",
                  "models": "list every model config with its parameters and MACs: kdrun models [dataset=NAME]"}


def usage():
    from omegaconf import OmegaConf

    width = max(map(len, COMMANDS))
    lines = [f"  {word.ljust(width)}  {OmegaConf.load(conf_dir() / f'{name}.yaml').summary}"
             for word, (name, _) in COMMANDS.items()]
    lines += [f"  {word.ljust(width)}  {summary}" for word, summary in PLAIN_COMMANDS.items()]
    return "\n".join([
        "usage: kdrun COMMAND [KEY=VALUE ...] [-m] [--cfg job] [--help]",
        "",
        "Knowledge distillation (Hinton, Vinyals & Dean 2015) as config-driven experiments.",
        "",
        "commands:",
        *lines,
        "",
        "`kdrun COMMAND --help` lists the command's config groups, options and keys.",
    ])


# ---------------------------------------------------------------- argument checks


def _parse_args(argv):
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.error = usage_error
    return parser.parse_intermixed_args(argv)  # `a=1 -m b=1,2` as well as `-m a=1 b=1,2`


def complete(argv):
    """Shell completion. Hydra's completion script runs `kdrun -sc query=bash` with the whole line in
    COMP_LINE: complete the command word here, and hand the rest to that command's Hydra app."""
    if not any(a.startswith("query") for a in argv):  # `kdrun -sc install=bash`: Hydra's script, for kdrun
        run_hydra("distill", argv)
        return 0
    words = os.environ.get("COMP_LINE", "").split()
    line_ends_word = not os.environ.get("COMP_LINE", "").endswith(" ")
    if len(words) < 2 or (len(words) == 2 and line_ends_word):
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(c for c in [*COMMANDS, *PLAIN_COMMANDS] if c.startswith(prefix)))
        return 0
    if words[1] not in COMMANDS:
        return 0
    try:
        rest, folders = configs.split_user_folders(words[2:])
        configs.use(folders)
    except KdrunError:  # completion offers what it can; the command itself says what is wrong
        rest = [w for w in words[2:] if w not in ("--config-dir", "-cd")]
        configs.use([])
    line = " ".join([words[0], *rest])  # without the command word and the folders (`use` hands those to Hydra)
    os.environ["COMP_LINE"] = line + ("" if line_ends_word else " ")
    run_hydra(words[1], argv)
    return 0


def dispatch(argv):
    configs.use([])
    if argv and argv[0] in ("-sc", "--shell-completion"):
        return complete(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from kdrun import __version__

        print(f"kdrun {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMANDS or command in PLAIN_COMMANDS:
        check_torchrun(command)
    rest, folders = configs.split_user_folders(rest)  # --config-dir, hydra.searchpath, KDRUN_CONFIG_PATH
    configs.use(folders)
    if command == "report":
        from kdrun import report

        return report.main(rest)
    if command == "resume":
        from kdrun import resume

        return resume.main(rest)
    if command == "models":
        from kdrun.commands import models

        return models.main(rest)
    if command not in COMMANDS:
        words = [*COMMANDS, *PLAIN_COMMANDS]
        close = difflib.get_close_matches(command, words, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise KdrunError(f"unknown command '{command}'{hint}; choose from: {', '.join(words)}")
    args = _parse_args(rest)
    overrides = expand_alpha_shorthand(args.overrides)
    flags = [a for a in rest if a not in args.overrides]
    informational = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    if not informational:
        preflight(command, overrides, args.multirun)
    run_hydra(command, flags + overrides)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    previous = interrupt.install()
    try:
        code = dispatch(argv)
    except interrupt.Interrupted as e:
        where = interrupt.resume_dir()
        print(f"kdrun: interrupted; resume with: kdrun resume {where}" if where else "kdrun: interrupted",
              file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("kdrun: interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:  # argparse or Hydra deciding to exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        if os.environ.get("KDRUN_DEBUG"):
            raise
        print(f"kdrun: error: {printable(explain(e, command))}", file=sys.stderr)
        code = 2 if _is_user_error(e) else 1
    finally:
        interrupt.restore(previous)
    sys.exit(code)


def printable(text):
    """One line whatever the user typed: control characters (a stray \\r or \\n) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


