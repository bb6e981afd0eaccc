"""MkDocs hook: typesets the pages' formulas as MathML at build time, with KaTeX.

A page writes TeX between `$...$` (inline) or `$$...$$` (display); pymdownx.arithmatex (generic mode)
keeps it verbatim, away from Markdown's emphasis, as `<span class="arithmatex">\\(...\\)</span>` and
`<div class="arithmatex">\\[...\\]</div>`. This hook replaces the TeX in each by KaTeX's MathML, which
browsers draw natively: the site loads no script, stylesheet or font for its math. KaTeX is the
command-line binary that the markdown-katex package ships; its output is cached, so a rebuild only
typesets new formulas. A formula KaTeX cannot parse fails the build, naming the page and the formula.
"""

from concurrent.futures import ThreadPoolExecutor
import functools
import hashlib
import html
import os
from pathlib import Path
import re
import subprocess
import threading

from markdown_katex import wrapper
from mkdocs.exceptions import PluginError

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdrun" / "docs-katex"
FORMULA = re.compile(r'(<(span|div) class="arithmatex">)\\[(\[](.*?)\\[)\]](</\2>)', re.DOTALL)


@functools.cache
def katex_command():
    """The KaTeX binary bundled with markdown-katex; where the wheel has none for this platform, the
    `katex` (or `npx katex`) that markdown-katex finds. Looked up once: the search may start npx."""
    try:
        return (str(wrapper._get_pkg_bin_path()),)
    except NotImplementedError:
        return tuple(wrapper.get_bin_cmd())  # the same error when there is none


class TexError(ValueError):
    pass


def typeset(tex, display):
    """KaTeX's MathML for one formula (the TeX as written, not HTML-escaped). KaTeX starts a process
    per formula, so its output is kept in CACHE, under a hash of the command (the bundled binary's
    name carries KaTeX's version), its options and the TeX: a rebuild typesets only new formulas."""
    args = [*katex_command(), "--format", "mathml", *(["--display-mode"] if display else [])]
    key = hashlib.sha256("\0".join([Path(args[0]).name, *args[1:], tex]).encode()).hexdigest()
    cached = CACHE / f"{key}.html"
    try:
        return cached.read_text(encoding="utf-8")
    except OSError:
        pass
    proc = subprocess.run(args, input=tex, capture_output=True, text=True, encoding="utf-8")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "Error" in line] or proc.stderr.splitlines() or [
            f"katex exited with {proc.returncode}"]
        message = lines[0].strip().replace("\u0332", "")  # KaTeX underlines the error's position
        raise TexError(f"KaTeX cannot typeset ${tex}$: {message}")
    mathml = proc.stdout.strip()
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(mathml, encoding="utf-8")
        os.replace(partial, cached)
    except OSError:
        pass  # no cache: the next build typesets the formula again
    return mathml


def render(content, where="this page"):
    """The HTML of a page with every arithmatex formula typeset (each distinct one once, in parallel)."""
    matches = list(FORMULA.finditer(content))
    formulas = sorted({(html.unescape(m.group(3)), m.group(2) == "div") for m in matches})
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            mathml = dict(zip(formulas, pool.map(lambda f: typeset(*f), formulas)))
    except TexError as err:
        raise PluginError(f"{where}: {err}") from None

    def one(m):
        return m.group(1) + mathml[html.unescape(m.group(3)), m.group(2) == "div"] + m.group(4)

    return FORMULA.sub(one, content)


def on_page_content(content, page, **kwargs):
    try:
        return render(content, page.file.src_path)
    except NotImplementedError as err:  # no KaTeX for this platform in the wheel, none on PATH
        raise PluginError(f"{page.file.src_path}: {err}") from None
