"""Every "§N" citation of a document under docs/ points at a section that exists (issue 13 item 6).

Code, tests, params, dvc.yaml, the README and the docs cite `docs/dataset-contract.md §5`,
`docs/diffsplat-reference.md §11.6`, `... §2-§3`, `... §8 "Metrics", "Previews"` (inside docs/ also without the
`docs/` prefix, or as a Markdown link). Sections are the numbered `## N. Title` headings; `§N.M` is item M of a
numbered list in section N; a quoted name after the number must appear in that section. Citations in the older
forms ("contract section 5", "reference §4", `../shared/docs/...`) are reported too: they point outside the repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh"}
NUM = r"\d+(?:\.\d+)?"
# docs/<name>.md (or <name>.md, or a Markdown link [..](<name>.md)), then one or more "§N" joined by , - – "and".
CITATION = re.compile(
    rf"(?:docs/)?(?P<doc>[a-z0-9][a-z0-9_-]*)\.md\)?\s*(?P<refs>§{NUM}(?:\s*(?:,|-|–|and)\s*§{NUM})*)"
    rf"(?P<names>(?:,?\s*\"[^\"\n]+\")*)"
)
STALE = re.compile(r"(?i)(?<![./\w-])(?:dataset contract|contract|diffsplat reference|reference)(?:'s)?,?\s+"
                   r"(?:sections?\s+\d|§\s*\d)|\.\./shared/docs")


def repo_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
        files = [REPO / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in REPO.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return sorted(p for p in files if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "Makefile"))


def doc_sections(path: Path) -> dict[str, str]:
    """'N' -> the text of section N (`## N. Title` up to the next `## `), 'N.M' -> item M of a numbered list in it."""
    sections: dict[str, str] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"##\s+(\d+)\.\s", line)
        if m:
            current = m.group(1)
            sections[current] = line + "\n"
            continue
        if re.match(r"##\s", line):
            current = None
        if current is None:
            continue
        sections[current] += line + "\n"
        item = re.match(r"(\d+)\.\s", line)
        if item:
            sections[f"{current}.{item.group(1)}"] = line
    return sections


def _expand(refs: str) -> list[str]:
    """'§1-§4' -> 1, 2, 3, 4; '§4, §5' -> 4, 5; '§11.6' -> 11.6."""
    out: list[str] = []
    parts = re.split(r"\s*(,|and|-|–)\s*", refs)
    nums = [p[1:] for p in parts if p.startswith("§")]
    seps = [p for p in parts if p in {",", "and", "-", "–"}]
    out.append(nums[0])
    for sep, num in zip(seps, nums[1:]):
        prev = out[-1]
        if sep in {"-", "–"} and "." not in prev and "." not in num:
            out.extend(str(n) for n in range(int(prev) + 1, int(num) + 1))
        else:
            out.append(num)
    return out


def citations() -> list[tuple[str, int, str, str, list[str]]]:
    """(file, line, doc name, section, quoted names) of every citation in the repository."""
    found = []
    for path in repo_text_files():
        if path.name == Path(__file__).name:
            continue  # its own examples
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for m in CITATION.finditer(text):
            if not (DOCS / f"{m.group('doc')}.md").is_file() and m.group("doc") not in {
                    "dataset-contract", "diffsplat-reference"}:
                continue  # another file's "§" (not a doc of this repository)
            line = text.count("\n", 0, m.start()) + 1
            names = re.findall(r"\"([^\"\n]+)\"", m.group("names") or "")
            refs = _expand(m.group("refs"))
            for i, ref in enumerate(refs):
                found.append((path.relative_to(REPO).as_posix(), line, m.group("doc"), ref,
                              names if i == len(refs) - 1 else []))
    return found


def test_both_docs_exist_with_their_numbered_sections():
    contract = doc_sections(DOCS / "dataset-contract.md")
    reference = doc_sections(DOCS / "diffsplat-reference.md")
    assert [k for k in contract if "." not in k] == [str(n) for n in range(1, 8)]
    assert [k for k in reference if "." not in k] == [str(n) for n in range(0, 12)]
    assert [k for k in reference if k.startswith("11.")] == [f"11.{n}" for n in range(1, 12)]


def test_the_scanner_finds_citations_in_every_form():
    text = ('x (docs/diffsplat-reference.md §2-§4, §11.6) y [dataset-contract.md](dataset-contract.md) §5 '
            'docs/diffsplat-reference.md §8 "Metrics", "Previews" docs/dataset-contract.md §1, §3 and §4')
    got = []
    for m in CITATION.finditer(text):
        got.append((m.group("doc"), _expand(m.group("refs")), re.findall(r"\"([^\"\n]+)\"", m.group("names"))))
    assert got == [("diffsplat-reference", ["2", "3", "4", "11.6"], []), ("dataset-contract", ["5"], []),
                   ("diffsplat-reference", ["8"], ["Metrics", "Previews"]),
                   ("dataset-contract", ["1", "3", "4"], [])]
    assert STALE.search("(contract section 5)") and STALE.search("DiffSplat reference §4")
    assert STALE.search("see ../shared/docs/x.md") and STALE.search("the dataset contract, section 6")
    assert not STALE.search("docs/dataset-contract.md §5") and not STALE.search("the contract's table")


def test_every_citation_points_at_an_existing_section():
    cites = citations()
    # The two documents are cited from the code (about 40 places before issue 13 moved them into docs/).
    assert sum(1 for c in cites if c[2] in ("dataset-contract", "diffsplat-reference")) >= 40
    sections = {}
    bad = []
    for file, line, doc, ref, names in cites:
        path = DOCS / f"{doc}.md"
        if not path.is_file():
            bad.append(f"{file}:{line}: cites {doc}.md, which is not in docs/")
            continue
        sections.setdefault(doc, doc_sections(path))
        body = sections[doc].get(ref)
        if body is None:
            bad.append(f"{file}:{line}: cites docs/{doc}.md §{ref}, which has no such section "
                       f"(sections: {', '.join(sections[doc])})")
            continue
        for name in names:
            if name.lower() not in body.lower():
                bad.append(f"{file}:{line}: cites docs/{doc}.md §{ref} \"{name}\", not found in that section")
    assert not bad, "\n".join(bad)


def test_no_citation_points_outside_the_repository():
    stale = []
    for path in repo_text_files():
        if path.name == Path(__file__).name:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        stale += [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
                  for m in STALE.finditer(text)]
    assert not stale, ("citations in an old form (write `docs/dataset-contract.md §N` or "
                       "`docs/diffsplat-reference.md §N`):\n" + "\n".join(stale))
