"""The project carries its own design document: every citation of one points into the repository,
at a section that exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"(\S*)(DESIGN|METHOD)\.md(?:\s*\"([^\"]+)\")?")


def _sources() -> list[Path]:
    out = []
    for folder in ("node", "dicom_io", "models", "sim", "bench", "tests", "deploy", ".ci"):
        out += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in
                (".py", ".toml", ".lua", ".json", ".yaml", ".md", "") and "__pycache__" not in p.parts]
    return out + [ROOT / "pyproject.toml", ROOT / "README.md"]


def test_design_citations_point_into_the_repository_at_real_sections() -> None:
    headings: dict[str, set[str]] = {}
    for name in ("DESIGN", "METHOD"):
        doc = ROOT / "docs" / f"{name}.md"
        if doc.is_file():
            headings[name] = {m[1].strip() for m in re.finditer(r"^#+ (.+)$", doc.read_text(), re.M)}
    assert "DESIGN" in headings, "docs/DESIGN.md is missing"
    bad = []
    for path in _sources():
        if path.name == "test_docs.py":
            continue
        text = path.read_text(errors="replace")
        if "/work/" + "shared" in text or "../" + "shared" in text:
            bad.append(f"{path.relative_to(ROOT)}: cites a document outside the repository")
        for m in CITED.finditer(text):
            where, name = m[1], m[2]
            section = None if m[3] is None else " ".join(m[3].split())  # a quote may wrap a line
            if not where.endswith("docs/"):
                bad.append(f"{path.relative_to(ROOT)}: cites {m[0]!r}, not docs/{name}.md")
            elif name not in headings:
                bad.append(f"{path.relative_to(ROOT)}: cites docs/{name}.md, which does not exist")
            elif section is not None and section not in headings[name]:
                bad.append(f"{path.relative_to(ROOT)}: cites section {section!r} of docs/{name}.md, "
                           f"which has {sorted(headings[name])}")
    assert not bad, "\n".join(bad)
