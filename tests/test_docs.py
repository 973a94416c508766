"""docs/methods.md stays the citable method reference: every ``docs/methods.md#anchor`` cited in the
package, tests, benchmarks or README names a heading that exists, no file still cites the old
out-of-repo notes file, and every DPO ``loss_type`` has its own section."""
from __future__ import annotations

import re
from pathlib import Path

from fastpref.losses.dpo import DPO_LOSS_TYPES

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
OLD_NOTES = "METHODS" + ".md"  # split so this file does not match itself
CITATION = re.compile(r"docs/methods\.md#([A-Za-z0-9_-]+)")
SCANNED = ("fastpref", "tests", "bench", "README.md", "docs")
SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".yaml", ".yml", ".cpp", ".h", ".hpp", ".sh"}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading text: lower-case, drop punctuation but ``-``/``_``, spaces to ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set:
    """Anchors of all ATX headings outside fenced code blocks (repeated headings get ``-1``, ``-2``...)."""
    found, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def scanned_files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts:
                    yield p


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def missing_citations(files, known: set):
    """``file:line: #anchor`` for every cited anchor not in ``known``."""
    bad = []
    for path in files:
        for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for anchor in CITATION.findall(line):
                if anchor not in known:
                    bad.append(f"{_shown(path)}:{no}: #{anchor}")
    return bad


def test_slug_and_anchor_parser():
    doc = "# Title\n## dpo-sigmoid\n```\n## not-a-heading\n```\n### KL DPO (robust)!\n## dup\n## dup\n"
    assert anchors(doc) == {"title", "dpo-sigmoid", "kl-dpo-robust", "dup", "dup-1"}


def test_missing_citation_is_reported(tmp_path):
    # The check must be able to fail: a cited anchor that is not a heading is named with file:line.
    f = tmp_path / "mod.py"
    f.write_text('"""Doc (docs/methods.md#kldpo).\n\nSee docs/methods.md#no-such-anchor."""\n')
    assert missing_citations([f], {"kldpo"}) == [f"{f}:3: #no-such-anchor"]


def test_every_cited_anchor_exists():
    known = anchors(METHODS.read_text(encoding="utf-8"))
    files = [p for p in scanned_files() if p.name != "test_docs.py"]
    cited = sum(len(CITATION.findall(p.read_text(encoding="utf-8", errors="replace"))) for p in files)
    assert cited >= 30, f"expected the package to cite docs/methods.md, found {cited} citations"
    bad = missing_citations(files, known)
    assert not bad, "cited anchors missing from docs/methods.md:\n" + "\n".join(bad)


def test_internal_links_resolve():
    text = METHODS.read_text(encoding="utf-8")
    known = anchors(text)
    bad = sorted({a for a in re.findall(r"\]\(#([^)\s]+)\)", text) if a not in known})
    assert not bad, f"docs/methods.md links to missing anchors: {bad}"


def test_no_file_cites_the_old_notes():
    hits = []
    for path in scanned_files():
        if path.name == "test_docs.py":
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OLD_NOTES in line:
                hits.append(f"{_shown(path)}:{no}")
    assert not hits, f"cite docs/methods.md#<anchor> (or the paper) instead of {OLD_NOTES}: {hits}"


def test_every_dpo_loss_type_has_a_section():
    known = anchors(METHODS.read_text(encoding="utf-8"))
    # exo_pair -> dpo-exo, aot_pair -> dpo-aot, apo_down -> dpo-apo, sppo_hard -> dpo-sppo
    missing = [t for t in DPO_LOSS_TYPES if "dpo-" + t.split("_")[0] not in known]
    assert not missing, f"DPO loss types without a docs/methods.md section: {missing}"
    for anchor in ("dpo-family", "dpo-mixes", "dpo-reference-free", "dpo-rpo", "dpo-f-divergence", "simpo",
                   "orpo", "kto", "ulma", "ulma-pointwise-dpo", "ulma-unified", "kldpo", "drdpo", "wdpo",
                   "soft-label-rm", "cdr", "rlaif", "rlaif-debiasing", "rlaif-cot", "rlaif-self-consistency",
                   "d-rlaif", "core-op", "core-op-frozen-head", "core-op-prefix-sharing", "worked-numbers"):
        assert anchor in known, f"docs/methods.md: missing section ## {anchor}"
