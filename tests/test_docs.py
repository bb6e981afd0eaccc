"""The documentation: the site builds strictly, its formulas are typeset (KaTeX's MathML, nothing
loaded from outside the site), the generated config page covers conf/, every page is in nav, and the
README stays a front page whose links resolve."""

from html import unescape
from pathlib import Path
import importlib.util
import re
import subprocess
import sys

from mkdocs.exceptions import PluginError
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_LIMIT = 15_000  # bytes


def hook(name):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gen_configs():
    return hook("gen_configs")


# The pages whose losses are written as formulas, and a piece of TeX each must show typeset.
MATH_PAGES = {
    "loss": r"\mathrm{KL}(p_T \,\|\, q_T)",
    "methods": r"\mathrm{TCKD} = \mathrm{KL}(b^p \,\|\, b^q)",
    "objectives": r"w_{hint}",
    "self-teaching": r"\mathrm{MMD}^2",
    "ensembles": r"T \log",
}
# Each section of the methods page states its loss as a display formula.
METHOD_SECTIONS = ("dkd", "dist", "logit-standardisation", "rkd", "sp", "crd")
DISPLAY_MATH = re.compile(r'<math\b[^>]*\bdisplay="block"')
# A link or resource outside the site: a scheme (https:, http:, ...) or a protocol-relative //host.
EXTERNAL = re.compile(r"""<(?:script|link|img|iframe|a)\b[^>]*\b(?:src|href)=["']?(?:[a-z][a-z0-9+.-]*:|//)""", re.I)


def nav_pages(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from nav_pages(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from nav_pages(value)


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    """A broken link or anchor, or a page missing from nav, fails the build (mkdocs.yml `validation:`);
    the built pages show their formulas as KaTeX's MathML and load nothing from outside the site."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site"
    page = (site / "configs" / "index.html").read_text()
    assert "conf/base.yaml" in page  # the hook generated the config reference
    assert not list(site.rglob("*.py"))  # the hooks themselves are not published
    pages = {p.relative_to(site).as_posix(): p.read_text() for p in site.rglob("*.html")}
    for name, tex in MATH_PAGES.items():
        check_math_typeset(pages[f"{name}/index.html"], tex)
    methods = pages["methods/index.html"]
    for section in METHOD_SECTIONS:
        body = methods.split(f'<h2 id="{section}', 1)[1].split("<h2 ", 1)[0]
        assert DISPLAY_MATH.search(body), section
    for name, html in pages.items():
        assert not EXTERNAL.findall(html), f"{name} links or loads something outside the site"
        # TeX left as text: arithmatex's delimiters, or a $ that Markdown split off a formula
        assert not re.search(r'class="arithmatex">\\[(\[]', html), f"{name} has a formula not typeset"
        assert not re.search(r'\$\s*<span class="arithmatex">|</span>\s*\$', html), f"{name} has a stray $"
    assert not any(re.search(r"katex|mathjax", p.name, re.I) for p in site.rglob("*")), "math is MathML, no assets"


def check_math_typeset(html, tex):
    """The page has KaTeX's MathML and the formula `tex` among it (as KaTeX's annotation of its source)."""
    assert '<span class="katex"><math ' in html
    sources = re.findall(r'<annotation encoding="application/x-tex">(.*?)</annotation>', html, re.S)
    assert any(tex in unescape(s) for s in sources), f"no typeset formula with {tex!r}"
    assert "cdn.jsdelivr" not in html and "katex.min" not in html


def test_math_hook_typesets_tex_and_refuses_what_katex_cannot_parse(tmp_path, monkeypatch):
    math = hook("math_hook")
    monkeypatch.setattr(math, "CACHE", tmp_path)
    page = ('<p>at <span class="arithmatex">\\(x &lt; y_i\\)</span>:</p>'
            '<div class="arithmatex">\\[h = \\begin{cases} a &amp; b \\\\ c &amp; d \\end{cases}\\]</div>')
    out = math.render(page)
    assert out.startswith('<p>at <span class="arithmatex"><span class="katex"><math ')
    assert "<mo>&lt;</mo><msub><mi>y</mi><mi>i</mi></msub>" in out  # the TeX was unescaped, then typeset
    assert DISPLAY_MATH.search(out)
    assert "<mtable" in out and "\\(" not in out and "\\[" not in out
    assert len(list(tmp_path.glob("*.html"))) == 2  # kept for the next build
    monkeypatch.setattr(math.subprocess, "run", None)  # a second render runs no KaTeX
    assert math.render(page) == out
    monkeypatch.undo()
    monkeypatch.setattr(math, "CACHE", tmp_path / "fresh")
    with pytest.raises(PluginError) as err:
        math.render('<span class="arithmatex">\\(\\lVret x\\)</span>', "methods.md")
    assert str(err.value) == ("methods.md: KaTeX cannot typeset $\\lVret x$: ParseError: KaTeX parse error: "
                              "Undefined control sequence: \\lVret at position 1: \\lVret x")
    assert not list((tmp_path / "fresh").glob("*"))  # a failure is not kept


def test_every_page_is_in_nav_and_every_nav_entry_exists():
    nav = set(nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    generated = {gen_configs().PAGE}
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk - nav == set(), "pages missing from nav in mkdocs.yml"
    assert nav - on_disk - generated == set(), "nav entries with no page"


def test_config_page_lists_every_config_file_and_key():
    module = gen_configs()
    page = module.render()
    conf = ROOT / "conf"
    for path in conf.rglob("*.yaml"):
        assert f"`{path.relative_to(ROOT).as_posix()}`" in page, path
        data = yaml.safe_load(path.read_text()) or {}
        if path.parent.name == "experiment":
            continue  # presets: listed to a depth of module.EXPERIMENT_DEPTH
        for key, _ in module.flatten({k: v for k, v in data.items() if k not in ("defaults", "hydra")}):
            assert f"| `{key}` |" in page, (path, key)


def test_config_page_takes_each_keys_comment():
    _, comments = gen_configs().scan_comments(
        "# header line\nT: 4.0   # the temperature\nouter:\n  # about inner\n  inner: 1\n  s: 'a # not a comment'\n")
    assert comments == {"T": "the temperature", "outer.inner": "about inner"}


def test_readme_is_a_short_front_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        assert not re.match(r"[a-z]+://", target), f"README links outside the repository: {target}"
        assert (ROOT / target).exists(), f"README links a missing file: {target}"
