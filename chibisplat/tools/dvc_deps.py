"""dvc.yaml's code deps, generated from each stage's import closure, so they cannot drift from the code.

    python -m chibisplat.tools.dvc_deps --check   # exit 1 naming each stage whose code deps are out of date
    python -m chibisplat.tools.dvc_deps --write   # rewrite them (`make deps`)

A stage's code is the module its ``cmd`` runs (``python -m stages.<name>``) and every file of this repository's
Python packages (``chibisplat/``, ``stages/``: the top-level folders with an ``__init__.py``) that it can import,
found statically from the source (AST; nothing is executed):

- ``import a.b`` / ``from a.b import c`` / ``from . import c`` / ``from ..x import y``, at module level and inside
  functions, ``try`` blocks and ``if TYPE_CHECKING``; ``c`` counts as a module when ``a/b/c.py`` (or a package)
  exists; importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``;
- any string literal that names one of those modules: exactly (``importlib.import_module("...")``, a worker started
  as ``[sys.executable, "-m", "chibisplat.render.worker", ...]``) or as ``"module:attr"`` / ``"module.attr"`` (an
  entry point or a task named by string);
- ``chibisplat/config_schema.py``'s ``Ref("module", ...)`` facts, per stage: a stage validates only its sections
  (``STAGE_SECTIONS``; all sections for a stage not listed there), so it depends on the ``Ref`` modules of those
  sections only. (Counting every ``Ref`` for every stage would make ``render`` depend on the training code.)

The deps are per file (exact: a new file under a folder re-runs nothing until some stage imports it). Code deps are
the entries of ``deps:`` that name a ``.py`` file or a folder inside one of those packages; they are replaced, in
sorted order after the stage's entry module. Every other dep (data folders, models, a non-Python file) and every
comment on it stays where it is; ``params:``, ``outs:`` and the rest of the file are untouched (ruamel round trip).
A stage whose ``cmd`` runs no Python module of this repository keeps its deps as written.
"""

from __future__ import annotations

import argparse
import ast
import re
import importlib.util
import io
import shlex
import sys
import uuid
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from chibisplat.files import write_atomic

FIX_COMMAND = "make deps  (python -m chibisplat.tools.dvc_deps --write)"
SCHEMA_MODULE = "config_schema"  # <package>.config_schema (chibisplat/config_schema.py): SCHEMA, STAGE_SECTIONS, Ref
REF_CALL = "Ref"


class DepsError(ValueError):
    """dvc.yaml or a stage's code cannot be analysed; the message names the stage or file."""


def _yaml() -> YAML:
    y = YAML()  # round trip: comments, order and quoting kept
    y.indent(mapping=2, sequence=4, offset=2)  # dvc.yaml's layout (`deps:` then `  - path`)
    y.width = 4096  # never re-wrap long `desc:` lines
    y.preserve_quotes = True
    return y


# ---------------------------------------------------------------------------------------------------------------
# Modules of the repository.


def package_roots(root: Path) -> list[str]:
    """The top-level Python packages of the repository (folders holding an ``__init__.py``)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
                  and not p.name.startswith("."))


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file (relative to ``root``), for every ``.py`` file of the packages."""
    modules: dict[str, Path] = {}
    for pkg in package_roots(root):
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts or any(not (root / Path(*rel.parts[:i]) / "__init__.py").is_file()
                                                 for i in range(1, len(rel.parts))):
                continue  # a folder without __init__.py is not importable as part of the package
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = rel
    return modules


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``: those that are modules here."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules}


def _ref_literals(tree: ast.AST) -> set[int]:
    """ids of the string constants that are the module argument of a ``Ref(...)`` call (handled per stage)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if fname == REF_CALL:
                out.add(id(node.args[0]))
    return out


_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_][\w.]*)?")


def named_module(text: str, modules: dict[str, Path]) -> str | None:
    """The module a string literal names: ``"a.b"``, ``"a.b:attr"`` or ``"a.b.attr"`` (a.b at least two levels deep
    for the last form, so that ``"chibisplat.json"``-like text does not count); None otherwise."""
    if not _DOTTED.fullmatch(text):
        return None
    name, _, attr = text.partition(":")
    if name in modules:
        return name
    if attr:
        return None
    head = name.rpartition(".")[0]
    return head if head in modules and "." in head else None


def module_imports(name: str, modules: dict[str, Path], root: Path) -> set[str]:
    """The modules of this repository that module ``name`` can import (see the module docstring)."""
    path = root / modules[name]
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise DepsError(f"{modules[name]}: cannot parse ({e}); fix the syntax error, then rerun {FIX_COMMAND}") from e
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    refs = _ref_literals(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _with_parents(alias.name, modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                if not base or not base[0]:
                    raise DepsError(f"{modules[name]}, line {node.lineno}: relative import beyond the top-level "
                                    "package")
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= _with_parents(target, modules)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found |= _with_parents(sub, modules)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in refs:
            named = named_module(node.value, modules)
            if named is not None:
                found |= _with_parents(named, modules)
    found.discard(name)
    return found


# ---------------------------------------------------------------------------------------------------------------
# config_schema's Ref facts, per stage.


def _load_schema(root: Path, modules: dict[str, Path]):
    """``chibisplat/config_schema.py`` of ``root`` (stdlib only), loaded under a private name; None if absent."""
    name = schema_module(modules)
    if name is None:
        return None
    private = f"_dvc_deps_schema_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(private, root / modules[name])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[private] = mod  # dataclasses look their module up while the class body runs
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(private, None)
    for attr in ("SCHEMA", "STAGE_SECTIONS", REF_CALL):
        if not hasattr(mod, attr):
            raise DepsError(f"{modules[name]} has no {attr}: chibisplat/tools/dvc_deps.py reads the Ref "
                            "facts of each stage's sections from it; update the generator to the new layout")
    return mod


def schema_module(modules: dict[str, Path]) -> str | None:
    """The parameter schema module (``<top-level package>.config_schema``), or None."""
    found = sorted(m for m in modules if m.count(".") == 1 and m.endswith("." + SCHEMA_MODULE))
    if len(found) > 1:
        raise DepsError(f"more than one parameter schema: {', '.join(found)}")
    return found[0] if found else None


def _refs_in(obj, ref_cls, seen: set[int]) -> set[str]:
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    if isinstance(obj, ref_cls):
        return {obj.module}
    if is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    else:
        return set()
    out: set[str] = set()
    for item in items:
        out |= _refs_in(item, ref_cls, seen)
    return out


@dataclass(frozen=True)
class SchemaRefs:
    per_stage: dict[str, set[str]]  # stage -> Ref modules of the sections it validates
    every: set[str]  # Ref modules of all sections (a stage not in STAGE_SECTIONS validates them all)

    def for_stage(self, stage: str) -> set[str]:
        return self.per_stage.get(stage, self.every)


def schema_refs(root: Path, modules: dict[str, Path]) -> SchemaRefs | None:
    mod = _load_schema(root, modules)
    if mod is None:
        return None
    ref_cls = getattr(mod, REF_CALL)
    by_section = {name: _refs_in(sec, ref_cls, set()) for name, sec in mod.SCHEMA.items()}
    every = set().union(*by_section.values()) if by_section else set()
    per_stage = {stage: set().union(set(), *(by_section.get(s, set()) for s in sections))
                 for stage, sections in mod.STAGE_SECTIONS.items()}
    unknown = sorted(m for m in every if m not in modules)
    if unknown:
        raise DepsError(f"{modules[schema_module(modules)]}: Ref to module(s) {', '.join(unknown)} that do not exist here")
    return SchemaRefs(per_stage, every)


# ---------------------------------------------------------------------------------------------------------------
# Stages.


def stage_entry(cmd, modules: dict[str, Path]) -> str | None:
    """The module of this repository that a stage's ``cmd`` runs (``python -m X`` / ``python path.py``), or None."""
    text = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    for i, tok in enumerate(tokens):
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] in modules:
            return tokens[i + 1]
        if tok.endswith(".py"):
            for name, rel in modules.items():
                if rel.as_posix() == Path(tok).as_posix():
                    return name
    return None


def stage_closure(entry: str, stage: str, modules: dict[str, Path], root: Path,
                  refs: SchemaRefs | None) -> set[str]:
    """Every module of this repository that running ``entry`` as stage ``stage`` can import."""
    todo = list(_with_parents(entry, modules))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(module_imports(name, modules, root) - seen)
        if refs is not None and name == schema_module(modules):
            for ref in refs.for_stage(stage):
                todo.extend(_with_parents(ref, modules) - seen)
    return seen


def is_code_dep(dep: str, root: Path) -> bool:
    """A dep that this tool owns: a ``.py`` file or a folder inside one of the repository's packages."""
    path = Path(dep)
    if path.is_absolute() or not path.parts or path.parts[0] not in package_roots(root):
        return False
    return dep.endswith(".py") or (root / path).is_dir() or not path.suffix


def _dep_path(item) -> str:
    return str(next(iter(item))) if isinstance(item, dict) else str(item)


@dataclass(frozen=True)
class StageDeps:
    stage: str
    entry: str | None
    current: list[str]  # the code deps dvc.yaml lists now
    expected: list[str]  # the code deps of the import closure

    @property
    def missing(self) -> list[str]:
        return [d for d in self.expected if d not in self.current]

    @property
    def extra(self) -> list[str]:
        return [d for d in self.current if d not in self.expected]

    @property
    def up_to_date(self) -> bool:
        return self.entry is None or self.current == self.expected


def expected_code_deps(root: Path, stages: dict) -> dict[str, tuple[str | None, list[str]]]:
    """stage -> (entry module, its code deps: the entry file first, then the rest sorted)."""
    modules = project_modules(root)
    refs = schema_refs(root, modules)
    out = {}
    for stage, spec in stages.items():
        entry = stage_entry((spec or {}).get("cmd", ""), modules)
        if entry is None:
            out[stage] = (None, [])
            continue
        files = {modules[m].as_posix() for m in stage_closure(entry, stage, modules, root, refs)}
        first = modules[entry].as_posix()
        out[stage] = (entry, [first] + sorted(files - {first}))
    return out


def analyse(root: Path, dvc_yaml: Path | None = None) -> tuple[object, list[StageDeps]]:
    """The loaded dvc.yaml (round trip) and, per stage, its current and expected code deps."""
    dvc_yaml = dvc_yaml or root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise DepsError(f"{dvc_yaml} not found: run from the repository root or pass --root")
    doc = _yaml().load(dvc_yaml.read_text(encoding="utf-8"))
    stages = (doc or {}).get("stages") or {}
    result = []
    for stage, (entry, expected) in expected_code_deps(root, stages).items():
        current = [_dep_path(d) for d in (stages[stage].get("deps") or []) if is_code_dep(_dep_path(d), root)]
        result.append(StageDeps(stage, entry, current, expected))
    return doc, result


def _rewrite_deps(seq, expected: list[str], root: Path) -> list[str]:
    """Replace the code items of a ``deps:`` sequence in place; other items keep their comments. Returns the text
    of comments that were attached to removed items (reported, since they are lost)."""
    old = list(seq)
    old_comments = dict(seq.ca.items)
    kept = [(i, item) for i, item in enumerate(old) if not is_code_dep(_dep_path(item), root)]
    lost = [str(tok.value).strip() for i, c in old_comments.items() if i < len(old)
            and is_code_dep(_dep_path(old[i]), root) for tok in c if tok is not None and hasattr(tok, "value")]
    del seq[:]
    seq.ca.items.clear()
    seq.extend(expected)
    for new_i, (old_i, item) in enumerate(kept, start=len(expected)):
        seq.append(item)
        if old_i in old_comments:
            seq.ca.items[new_i] = old_comments[old_i]
    last_old = len(old) - 1
    if last_old in old_comments and is_code_dep(_dep_path(old[last_old]), root) and len(seq):
        # a comment after the last item is usually a full-line comment before the next key: keep it at the end
        seq.ca.items.setdefault(len(seq) - 1, old_comments[last_old])
        lost = [t for t in lost if t not in {str(tok.value).strip() for tok in old_comments[last_old]
                                             if tok is not None and hasattr(tok, "value")}]
    return [t for t in lost if t]


def write(root: Path, dvc_yaml: Path | None = None) -> list[StageDeps]:
    """Rewrite the code deps of every out-of-date stage; returns what changed."""
    dvc_yaml = dvc_yaml or root / "dvc.yaml"
    doc, result = analyse(root, dvc_yaml)
    changed = [s for s in result if not s.up_to_date]
    if not changed:
        return []
    stages = doc["stages"]
    for s in changed:
        stage = stages[s.stage]
        if stage.get("deps") is None:  # no deps yet: a new `deps:` right after `cmd:`
            keys = list(stage)
            stage.pop("deps", None)
            stage.insert(keys.index("cmd") + 1 if "cmd" in keys else len(stage), "deps", CommentedSeq())
        for text in _rewrite_deps(stages[s.stage]["deps"], s.expected, root):
            print(f"dvc_deps: stage '{s.stage}': dropped the comment {text!r} of a replaced code dep", file=sys.stderr)
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    write_atomic(dvc_yaml, buf.getvalue().encode("utf-8"))
    return changed


def describe(s: StageDeps) -> str:
    lines = [f"stage '{s.stage}' ({s.entry}): code deps out of date"]
    if s.missing:
        lines.append("  missing (imported, not listed): " + ", ".join(s.missing))
    if s.extra:
        lines.append("  extra (listed, not imported): " + ", ".join(s.extra))
    if not s.missing and not s.extra:
        lines.append("  same files, different order")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chibisplat.tools.dvc_deps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if any stage's code deps are out of date")
    mode.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.write:
            changed = write(root)
            for s in changed:
                print(f"dvc_deps: stage '{s.stage}': +{len(s.missing)} -{len(s.extra)} code dep(s)"
                      + (f" (added {', '.join(s.missing)})" if s.missing else ""))
            print(f"dvc_deps: {root / 'dvc.yaml'}: {len(changed)} stage(s) updated" if changed
                  else "dvc_deps: dvc.yaml is up to date")
            return 0
        _, result = analyse(root)
    except DepsError as e:
        print(f"dvc_deps: error: {e}", file=sys.stderr)
        return 1
    stale = [s for s in result if not s.up_to_date]
    for s in stale:
        print(describe(s), file=sys.stderr)
    if stale:
        print(f"dvc.yaml: {len(stale)} stage(s) out of date; fix: {FIX_COMMAND}", file=sys.stderr)
        return 1
    print("dvc_deps: dvc.yaml is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
