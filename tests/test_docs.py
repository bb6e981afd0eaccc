"""The documentation: the site builds strictly, the generated config page covers conf/, every page is
in nav, and the README stays a front page whose links resolve."""

from pathlib import Path
import importlib.util
import re
import subprocess
import sys

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_LIMIT = 15_000  # bytes


def gen_configs():
    spec = importlib.util.spec_from_file_location("gen_configs", DOCS / "gen_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    """A broken link or anchor, or a page missing from nav, fails the build (mkdocs.yml `validation:`)."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "site" / "configs" / "index.html").read_text()
    assert "conf/base.yaml" in page  # the hook generated the config reference
    assert not list((tmp_path / "site").rglob("*.py"))  # the hook itself is not published


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
