"""dvc.yaml's code deps are each stage's import closure (chibisplat/tools/dvc_deps.py, issue 13 item 1).

Fast: dvc.yaml is up to date with the code (the failure names the stage, the missing / extra files and the fix);
the analyser on a small hand-made repository whose closures are written out by hand here; the rewrite keeps
non-code deps, their comments and the rest of the file.
Slow: real DVC in a throwaway git + DVC copy of this repository. Every stage is recorded in dvc.lock over stub
outputs (`dvc commit -f`, nothing is run), then every code file is edited and `dvc status` must report every stage,
with every module it imports (an oracle independent of the generator: what importing the stage module actually
loads, plus the two gaps issue 13 names) among its changed deps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chibisplat.tools import dvc_deps
from chibisplat.tools.dvc_deps import FIX_COMMAND, analyse, expected_code_deps, write

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# This repository.


def test_dvc_yaml_code_deps_match_each_stage_import_closure():
    _, result = analyse(REPO)
    stale = [s for s in result if not s.up_to_date]
    assert not stale, ("dvc.yaml's code deps are out of date:\n" + "\n".join(dvc_deps.describe(s) for s in stale)
                       + f"\nfix: {FIX_COMMAND}")


def test_every_stage_has_a_python_entry_and_the_issue_13_gaps_are_closed():
    _, result = analyse(REPO)
    by_stage = {s.stage: s for s in result}
    assert all(s.entry == f"stages.{s.stage}" for s in result), {s.stage: s.entry for s in result}
    # finetune calls training/latents.py's gsrecon_splatter; generate reaches dataset/loader.py through cli.py.
    assert "chibisplat/training/latents.py" in by_stage["finetune"].current
    assert "chibisplat/dataset/loader.py" in by_stage["generate"].current
    # The render stage's Blender workers run as `python -m chibisplat.render.worker` (a string, not an import).
    assert "chibisplat/render/worker.py" in by_stage["render"].current


# ---------------------------------------------------------------------------------------------------------------
# The analyser on a hand-made repository (expected closures written out by hand).


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))


MINI = {
    "pkg/__init__.py": "",
    "pkg/a.py": """
        import json
        from . import b
        def later():
            from .sub.c import thing  # function-level, relative
            return thing
        """,
    "pkg/b.py": "import importlib\nmod = importlib.import_module('pkg.dyn')\n",
    "pkg/dyn.py": "X = 1\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/c.py": "from ..d import *\nthing = 1\n",
    "pkg/d.py": "",
    "pkg/unused.py": "import pkg.a\n",
    "pkg/worker_main.py": "",
    "pkg/spawn.py": "CMD = ['python', '-m', 'pkg.worker_main']\nTASK = 'pkg.sub.task:run'\nFN = 'pkg.sub.fn.go'\n"
                    "LOG = 'pkg.logs'  # names no module\n",
    "pkg/sub/task.py": "",
    "pkg/sub/fn.py": "",
    "pkg/config_schema.py": """
        from dataclasses import dataclass, field
        @dataclass(frozen=True)
        class Ref:
            module: str
            attr: str
            heavy: bool = False
        @dataclass(frozen=True)
        class Section:
            keys: dict = field(default_factory=dict)
            fields_of: Ref | None = None
        SHARED = Ref("pkg.ref_shared", "X")
        SCHEMA = {"one": Section(fields_of=Ref("pkg.ref_one", "P")), "two": Section(keys={"k": SHARED})}
        STAGE_SECTIONS = {"s_one": ("one",), "s_two": ("two",)}
        """,
    "pkg/ref_one.py": "",
    "pkg/ref_shared.py": "from pkg import d\n",
    "stages/__init__.py": "",
    "stages/s_one.py": "from pkg import a, config_schema\n",
    "stages/s_two.py": "import pkg.config_schema\nimport pkg.spawn\n",
    "stages/s_all.py": "from pkg.config_schema import SCHEMA\n",
    "tools/not_a_package.py": "",
}


def test_closure_follows_function_level_relative_and_literal_imports_and_per_section_refs(tmp_path):
    _tree(tmp_path, MINI)
    stages = {s: {"cmd": f"python -m stages.{s}"} for s in ("s_one", "s_two", "s_all")}
    stages["shell"] = {"cmd": "echo hi"}
    got = expected_code_deps(tmp_path, stages)
    common = ["pkg/__init__.py", "pkg/config_schema.py", "stages/__init__.py"]
    assert got["s_one"] == ("stages.s_one", ["stages/s_one.py", *sorted(
        common + ["pkg/a.py", "pkg/b.py", "pkg/dyn.py", "pkg/sub/__init__.py", "pkg/sub/c.py", "pkg/d.py",
                  "pkg/ref_one.py"])])
    assert got["s_two"] == ("stages.s_two", ["stages/s_two.py", *sorted(
        common + ["pkg/spawn.py", "pkg/worker_main.py", "pkg/ref_shared.py", "pkg/d.py", "pkg/sub/__init__.py",
                  "pkg/sub/task.py", "pkg/sub/fn.py"])])
    # not in STAGE_SECTIONS: the stage validates every section, so every Ref module is its dep
    assert got["s_all"] == ("stages.s_all", ["stages/s_all.py", *sorted(
        common + ["pkg/ref_one.py", "pkg/ref_shared.py", "pkg/d.py"])])
    assert got["shell"] == (None, [])


DVC_YAML = """\
# header comment
stages:
  s_one:
    desc: a stage  # desc comment
    cmd: python -m stages.s_one
    deps:
      - pkg            # a folder dep: replaced by files
      - data/in        # data: kept with its comment
      - pkg/unused.py
      - pkg/notes.txt
    params:
      - one
    outs:
      - out/one
  shell:
    cmd: echo hi
    deps:
      - pkg/a.py
"""


def test_write_replaces_code_deps_only_and_check_names_stage_and_files(tmp_path, capsys):
    _tree(tmp_path, MINI)
    (tmp_path / "pkg" / "notes.txt").write_text("not code\n")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    assert dvc_deps.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stage 's_one'" in err and "extra (listed, not imported): pkg, pkg/unused.py" in err
    assert "missing (imported, not listed): stages/s_one.py, pkg/__init__.py" in err
    assert "make deps" in err and "shell" not in err

    write(tmp_path)
    expected = DVC_YAML.replace(
        "      - pkg            # a folder dep: replaced by files\n      - data/in        # data: kept with its comment\n"
        "      - pkg/unused.py\n      - pkg/notes.txt\n",
        "".join(f"      - {p}\n" for p in [
            "stages/s_one.py", "pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/config_schema.py", "pkg/d.py",
            "pkg/dyn.py", "pkg/ref_one.py", "pkg/sub/__init__.py", "pkg/sub/c.py", "stages/__init__.py"])
        + "      - data/in        # data: kept with its comment\n      - pkg/notes.txt\n")
    assert (tmp_path / "dvc.yaml").read_text() == expected
    assert dvc_deps.main(["--check", "--root", str(tmp_path)]) == 0
    write(tmp_path)  # idempotent
    assert (tmp_path / "dvc.yaml").read_text() == expected


def test_write_adds_deps_after_cmd_to_a_stage_without_any(tmp_path):
    _tree(tmp_path, MINI)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s_two:\n    cmd: python -m stages.s_two\n    outs:\n      - out/two\n")
    write(tmp_path)
    deps = ["stages/s_two.py", "pkg/__init__.py", "pkg/config_schema.py", "pkg/d.py", "pkg/ref_shared.py",
            "pkg/spawn.py", "pkg/sub/__init__.py", "pkg/sub/fn.py", "pkg/sub/task.py", "pkg/worker_main.py",
            "stages/__init__.py"]
    assert (tmp_path / "dvc.yaml").read_text() == (
        "stages:\n  s_two:\n    cmd: python -m stages.s_two\n    deps:\n" + "".join(f"      - {d}\n" for d in deps)
        + "    outs:\n      - out/two\n")


def test_syntax_error_names_the_file(tmp_path, capsys):
    _tree(tmp_path, MINI)
    (tmp_path / "pkg" / "d.py").write_text("def broken(:\n")
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    assert dvc_deps.main(["--check", "--root", str(tmp_path)]) == 1
    assert "pkg/d.py: cannot parse" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Real DVC: editing any module a stage imports makes `dvc status` report that stage.


def _runtime_imports(root: Path, module: str) -> set[str]:
    """The repository files that importing ``module`` loads (a subprocess; independent of the generator)."""
    code = ("import importlib, sys, json; importlib.import_module(sys.argv[1]); "
            "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    out = subprocess.run([sys.executable, "-c", code, module], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    files = set()
    for f in json.loads(out.stdout.strip().splitlines()[-1]):
        if f and Path(f).resolve().is_relative_to(root.resolve()):
            files.add(Path(f).resolve().relative_to(root.resolve()).as_posix())
    return files


def _stub_outputs(repo: Path, stages: dict) -> None:
    """A placeholder for every output, so that `dvc commit -f` can record every stage without running it."""
    for spec in stages.values():
        for key in ("outs", "metrics", "plots"):
            for o in spec.get(key) or []:
                path = repo / (next(iter(o)) if isinstance(o, dict) else o)
                if path.exists():
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n" if path.suffix == ".json" else "stub\n")
                else:
                    path.mkdir(parents=True)
                    (path / "stub.txt").write_text("stub\n")


@pytest.mark.slow
def test_editing_any_imported_module_makes_dvc_status_report_the_stage(tmp_path):
    import yaml
    from test_dvc_pipeline import commit, copy_worktree, dvc, git

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_worktree(REPO, repo)
    git("init", "-q", cwd=repo)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    _stub_outputs(repo, stages)
    dvc("commit", "-f", cwd=repo)  # records every stage's deps, params and outs in dvc.lock; runs nothing
    commit(repo, "stubbed pipeline")
    assert json.loads(dvc("status", "--json", cwd=repo).stdout or "{}") == {}

    oracle = {name: _runtime_imports(repo, f"stages.{name}") for name in stages}
    for name, files in oracle.items():  # the copy's modules were imported (not this checkout's editable install)
        assert {f"stages/{name}.py", "chibisplat/params.py"} <= files, (name, sorted(files))
    oracle["finetune"].add("chibisplat/training/latents.py")  # the gaps issue 13 names
    oracle["generate"].add("chibisplat/dataset/loader.py")
    code = sorted(p.relative_to(repo).as_posix() for pkg in ("chibisplat", "stages") for p in (repo / pkg).rglob("*.py"))
    for rel in code:
        with open(repo / rel, "a") as f:
            f.write("# edited\n")
    status = json.loads(dvc("status", "--json", cwd=repo).stdout)

    problems = []
    for name in stages:
        changed = set()
        for entry in status.get(name, []):
            if isinstance(entry, dict):
                changed |= set(entry.get("changed deps", {}))
        not_seen = sorted(oracle[name] - changed)
        if not_seen:
            problems.append(f"stage '{name}': editing {', '.join(not_seen)} is not reported by dvc status")
    assert not problems, "\n".join(problems) + f"\nfix: {FIX_COMMAND}"
