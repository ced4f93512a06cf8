"""The documentation: the MkDocs site builds strictly (a broken link or anchor, or a page left out
of the nav, fails it), offline; every relative link of the README leads to a file of the
repository; the README stays short (its depth lives in docs/)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 400


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="the `docs` extra (pip install -e '.[docs]', part of '.[test]')")
    pytest.importorskip("material", reason="mkdocs-material, of the `docs` extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2.0, not ours
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=300, env=env)


def test_the_docs_site_builds_strictly(tmp_path):
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    pages = {p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    for page in pages:  # every page was built (directory URLs: page/index.html)
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), f"docs/{page}.md was not built"


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The strict build is what CI relies on: a copy of the docs with a link to a page that does not
    exist, and one with a page left out of the nav, must both fail it."""
    for broken in ("link", "omitted"):
        work = tmp_path / broken
        shutil.copytree(ROOT / "docs", work / "docs")
        shutil.copy(ROOT / "mkdocs.yml", work / "mkdocs.yml")
        if broken == "link":
            with open(work / "docs" / "index.md", "a") as f:
                f.write("\nSee [nothing](no-such-page.md#nowhere).\n")
        else:
            (work / "docs" / "orphan.md").write_text("# Not in the nav\n")
        done = mkdocs_build(work / "mkdocs.yml", work / "site")
        assert done.returncode != 0, f"a {broken} that should fail the build did not"
        assert ("no-such-page.md" if broken == "link" else "orphan.md") in done.stderr


def test_the_docs_need_no_network_to_build():
    """No plugin that fetches at build time (only MkDocs' own search), and no web fonts."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    plugins = [p if isinstance(p, str) else next(iter(p)) for p in config.get("plugins", [])]
    assert plugins == ["search"], plugins
    assert config["theme"].get("font") is False


def readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_of_the_readme_resolves():
    links = [link for link in readme_links() if not re.match(r"[a-z]+:", link)]
    assert links, "the README links to the docs"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (ROOT / path) if path else README
        assert target.exists(), f"README links to {link}, which is not a file of the repository"
        if anchor and target.suffix == ".md":
            assert anchor in heading_slugs(target), f"README links to {link}: no heading #{anchor} in {path}"


def heading_slugs(page: Path) -> set[str]:
    """The anchors Python-Markdown's toc gives the page's headings (lowercase, punctuation dropped,
    spaces to dashes)."""
    slugs, fence = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        found = None if fence else re.match(r"#{1,6} (.*)", line)
        if found:
            slug = re.sub(r"[^\w\s-]", "", found.group(1).replace("`", "")).strip().lower()
            slugs.add(re.sub(r"[\s-]+", "-", slug))
    return slugs


def test_the_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move the depth to docs/"
    linked = {link.partition("#")[0] for link in readme_links()}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"the README does not link docs/{page.name}"


def test_nothing_refers_to_what_lies_outside_the_repository():
    for page in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        for outside in ("RAY-NOTES", "../shared", "/work/", "the issue", "STYLE.md"):
            assert outside not in text, f"{page.relative_to(ROOT)} refers to {outside!r}, outside the repository"
