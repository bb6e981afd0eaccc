"""The configuration reference page, generated from conf/ so that it cannot drift from the configs.

mkdocs runs this file as a hook (`hooks:` in mkdocs.yml): `on_files` adds the page `configs.md` to the
site at every build, so the page exists only in the built site. `python docs/gen_configs.py` prints it.

Values come from the YAML parser; the explanations are the configs' own comments: the comment block
at the top of a file, and the comment at the end of a key's line (or the comment lines just above it).
"""

from pathlib import Path
import re
import sys

import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
PAGE = "configs.md"
MAX_VALUE = 80          # longer values are cut, with the file named for the rest
EXPERIMENT_DEPTH = 3    # presets hold long prose under `paper:`; keys deeper than this are not listed
SKIPPED_KEYS = {"hydra"}  # Hydra's own settings (run dirs, logging, --help template)

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.@-]*|'[^']*'|\"[^\"]*\"):(?:\s|$)")


def split_comment(line):
    """(text, comment) of a YAML line: the comment starts at the first ` #` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def scan_comments(text):
    """(header, {dotted key: comment}) of a config file."""
    header, comments, stack, pending = [], {}, [], []
    in_header, block_indent = True, None
    for raw in text.splitlines():
        body, comment = split_comment(raw)
        if not body.strip():
            if comment and in_header and not comment.startswith("@package"):
                header.append(comment)
            elif comment and not in_header:
                pending.append(comment)
            elif not comment:
                pending = []
            continue
        in_header = False
        indent = len(body) - len(body.lstrip(" "))
        if block_indent is not None:
            if indent > block_indent:
                continue            # inside a block scalar (| or >)
            block_indent = None
        match = KEY_LINE.match(body)
        if not match:
            pending = []
            continue                # a list item or a continuation line
        key = match["key"].strip("'\"")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        text_comment = comment or " ".join(pending)
        if text_comment:
            comments[dotted] = text_comment
        pending = []
        if re.search(r":\s*[|>][-+]?\s*$", body):
            block_indent = indent
    return header, comments


def show(value):
    """A value as one would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def flatten(data, prefix="", depth=1, max_depth=None):
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and (max_depth is None or depth < max_depth):
            yield from flatten(value, dotted + ".", depth + 1, max_depth)
        else:
            yield dotted, value


def cell(text):
    text = text.replace("|", "\\|").replace("\n", " ")
    return text


def code(text):
    """Inline code that survives a table: a backtick inside is doubled around."""
    text = cell(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def defaults_of(data):
    """The defaults list as `group: option` strings (self included as `_self_`)."""
    out = []
    for item in data.get("defaults", []) or []:
        if isinstance(item, dict):
            out.extend(f"{k}: {show(v)}" for k, v in item.items())
        else:
            out.append(str(item))
    return out


def file_section(path, level, max_depth=None):
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    header, comments = scan_comments(text)
    rel = path.relative_to(CONF.parent)
    lines = []
    if header:
        lines += [" ".join(header), ""]
    composed = [d for d in defaults_of(data) if d != "_self_"]
    if composed:
        lines += ["Composes: " + ", ".join(code(d) for d in composed) + ".", ""]
    rows = [(k, v) for k, v in flatten({k: v for k, v in data.items() if k != "defaults"},
                                       max_depth=max_depth) if k.split(".")[0] not in SKIPPED_KEYS]
    if rows:
        lines += ["| key | value | meaning |", "|---|---|---|"]
        for key, value in rows:
            shown = show(value)
            if len(shown) > MAX_VALUE:
                shown = shown[:MAX_VALUE - 1] + "…"
            lines.append(f"| {code(key)} | {code(shown)} | {cell(comments.get(key, ''))} |")
        lines.append("")
    if any(k in SKIPPED_KEYS for k in data):
        lines += [f"`hydra:` in `{rel}` sets Hydra's own run and sweep directories, logging and the "
                  "`--help` text; it is not listed here.", ""]
    return [f"{'#' * level} `{rel}`", ""] + lines


def group_users():
    """{group: [files whose defaults pull it in from inside another config]} (model, recipe, ...)."""
    users = {}
    for path in sorted(CONF.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for entry in defaults_of(data):
            name = entry.split(":")[0].strip()
            if name.startswith("/"):
                group = name[1:].split("@")[0].split("/")[0]
                users.setdefault(group, set()).add(str(path.relative_to(CONF)))
    return users


def top_level_defaults():
    """{group: option} chosen by conf/base.yaml and the commands' primary configs."""
    chosen = {}
    for path in sorted(CONF.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for entry in defaults_of(data):
            if ":" in entry and not entry.startswith(("/", "override")):
                group, option = (s.strip() for s in entry.split(":", 1))
                chosen.setdefault(group, set()).add(option)
    return chosen


def own_configs_link():
    if (Path(__file__).parent / "configs-your-own.md").exists():
        return "[Your own configs](configs-your-own.md)."
    return "[Getting started](index.md#bring-your-own-model-data-and-config)."


def render():
    primaries = sorted(CONF.glob("*.yaml"), key=lambda p: (p.name != "base.yaml", p.name))
    groups = sorted(p for p in CONF.iterdir() if p.is_dir() and list(p.glob("*.yaml")))
    chosen, users = top_level_defaults(), group_users()
    out = [
        "# Configuration reference",
        "",
        "Every config group, option and key in `conf/`, with the comments the files carry. This page is "
        "generated from `conf/` by `docs/gen_configs.py` at every `mkdocs build`, so it always matches "
        "the configs; edit the YAML files, not this page.",
        "",
        "Set any key with `KEY=VALUE` (`kdrun distill T=20 student.recipe.epochs=5`), pick an option of "
        "a group with `GROUP=OPTION` (`kdrun distill student=mlp300`), and see the resolved result "
        "with `kdrun distill --cfg job --resolve`. How to add configs of your own: " + own_configs_link(),
        "",
        "## Groups",
        "",
        "| group | options | chosen with |",
        "|---|---|---|",
    ]
    for group in groups:
        options = sorted(p.stem for p in group.glob("*.yaml"))
        if group.name in chosen:
            how = f"`{group.name}=OPTION` (default: {', '.join(sorted(chosen[group.name]))})"
        elif group.name in users:
            how = "inside " + ", ".join(f"`{u}`" for u in sorted(users[group.name])[:4])
            how += " …" if len(users[group.name]) > 4 else ""
        else:
            how = f"`{group.name}=OPTION`"
        out.append(f"| [`{group.name}`](#group-{group.name}) | {', '.join(options)} | {how} |")
    out += ["", "## Primary configs", "",
            "`kdrun COMMAND` starts from `conf/COMMAND.yaml` (dashes as underscores), which includes "
            "`conf/base.yaml`.", ""]
    for path in primaries:
        out += file_section(path, 3)
    for group in groups:
        out += [f"## Group `{group.name}` {{#group-{group.name}}}", ""]
        depth = EXPERIMENT_DEPTH if group.name == "experiment" else None
        for path in sorted(group.glob("*.yaml")):
            out += file_section(path, 3, max_depth=depth)
    return "\n".join(out).rstrip() + "\n"


def on_files(files, config):
    """mkdocs hook: add the generated page to the site."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    sys.stdout.write(render())
