"""docs/methods.md agrees with the code: the headings the code cites, the objectives' traits, the methods' hooks."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from tadistill.registry import METHODS, OBJECTIVES
from tadistill.training.hooks import MethodHooks

ROOT = Path(__file__).resolve().parents[1]
METHODS_MD = ROOT / "docs" / "methods.md"
SRC = ROOT / "src" / "tadistill"


def _headings() -> list[str]:
    """Every heading of docs/methods.md, also without a trailing parenthesis: '## Layer mappings (`x`)' gives both."""
    found = []
    for line in METHODS_MD.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            found += [title, re.sub(r"\s*\(.*\)$", "", title)]
    return found


def _references() -> list[tuple[str, str]]:
    """(file, text after 'methods.md, ') for every citation in the package's Python and YAML files."""
    refs = []
    for path in sorted([*SRC.rglob("*.py"), *SRC.rglob("*.yaml")]):
        text = path.read_text(encoding="utf-8")
        refs += [(str(path.relative_to(ROOT)), m.group(1)) for m in re.finditer(r'methods\.md,\s+"?(?=([^"\n]+))', text)]
    return refs


def _names_a_heading(text: str, headings: list[str]) -> bool:
    text = text.lower()
    return any(text.startswith(h.lower()) and not text[len(h):len(h) + 1].isalnum() for h in headings)


def test_every_methods_md_reference_names_a_heading():
    headings = _headings()
    refs = _references()
    assert len(refs) >= 16  # the citations exist (the check below would pass vacuously otherwise)
    bad = [f"{where}: methods.md, {text}" for where, text in refs if not _names_a_heading(text, headings)]
    assert not bad, "no such heading in docs/methods.md:\n" + "\n".join(bad)
    # Section numbers do not resolve: the document has none.
    numbered = [str(p.relative_to(ROOT)) for p in [*SRC.rglob("*.py"), *SRC.rglob("*.yaml")]
                if re.search(r"methods\.md (section|s\.)", p.read_text(encoding="utf-8"))]
    assert not numbered


def test_a_wrong_reference_is_caught():
    headings = _headings()
    assert _names_a_heading("MiniLMv2 (Wang et al.)", headings) and _names_a_heading("teacher-free)", headings)
    assert not _names_a_heading("MiniLMv3", headings) and not _names_a_heading("section 3", headings)


def objectives_table() -> str:
    """The objectives table of docs/methods.md, from registry.OBJECTIVES."""
    lines = ["| kind | config | term | teacher | head | needs teacher | offline signals | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, entry in OBJECTIVES.items():
        t = entry.traits
        term_file = entry.term.__module__.removeprefix("tadistill.").replace(".", "/") + ".py"
        cells = [f"`{kind}`", f"`{entry.config.__name__}`", f"`{term_file}` `{entry.term.__name__}`", t.teacher,
                 t.head or "-", "yes" if t.needs_teacher else "no", "yes" if t.offline else "no", entry.paper]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_objectives_table_is_the_registry():
    text = METHODS_MD.read_text(encoding="utf-8")
    start, end = "<!-- objectives-table: start -->\n", "\n<!-- objectives-table: end -->"
    assert text[text.index(start) + len(start):text.index(end)] == objectives_table()


def test_hooks_section_lists_every_method_with_its_class():
    text = METHODS_MD.read_text(encoding="utf-8")
    section = text[text.index("## Training behaviour beyond loss terms (`training/hooks.py`)"):]
    section = section[:section.index("\n## ", 1)]
    table = [r for r in section.splitlines() if r.startswith("|")]
    rows = table[2:]  # below the header and its rule
    listed = {}
    for row in rows:
        name, cls, file = (re.fullmatch(r"`([^`]+)`", c.strip()).group(1) for c in row.split("|")[1:4])
        listed[name] = (cls, file)
    assert list(listed) == list(METHODS)
    for name, (cls, file) in listed.items():
        module = importlib.import_module("tadistill." + file.removesuffix(".py").replace("/", "."))
        hooks = getattr(module, cls)
        assert issubclass(hooks, MethodHooks) and hooks.name == name
        assert METHODS[name].build is module.build  # the registry row builds the class the document names
