"""The documentation: docs/spec.md's generated tables are current, README.md stays short, and
every relative link in README.md, docs/*.md and bench/README.md points to an existing file (and,
into a Markdown file, to an existing heading)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "spec_docs.py"
README_LIMIT = 12 * 1024  # bytes

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _spec_docs():
    spec = importlib.util.spec_from_file_location("spec_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(text: str):
    """Lines outside fenced code blocks, with inline code spans removed."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, re.sub(r"`[^`]*`", "", line)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_spec_docs_check_passes():
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_spec_docs_regenerates_the_identical_file():
    mod = _spec_docs()
    text = (ROOT / "docs" / "spec.md").read_text()
    assert mod.regenerate(text, mod.load_models()) == text


def test_spec_docs_check_reports_a_stale_file(tmp_path):
    text = (ROOT / "docs" / "spec.md").read_text()
    stale = tmp_path / "spec.md"
    written = text.replace("| field | type | default | description |", "| field | type |", 1)
    stale.write_text(written)
    r = subprocess.run([sys.executable, str(SCRIPT), "--check", "--doc", str(stale)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert len(r.stdout.strip().splitlines()) == 1 and "stale" in r.stdout
    assert stale.read_text() == written  # --check writes nothing


def test_every_spec_model_has_a_block():
    mod = _spec_docs()
    text = (ROOT / "docs" / "spec.md").read_text()
    blocks = re.findall(r"<!-- generated: (\w+) -->", text)
    assert sorted(blocks) == sorted(d.rpartition(".")[2] for d in mod.MODELS)


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ or bench/README.md"


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert doc.is_file(), doc
    bad = []
    for n, line in _prose_lines(doc.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"line {n}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"line {n}: {target} (no such heading in {dest.name})")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)
