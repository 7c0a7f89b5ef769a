"""Import boundaries between the packages, checked statically (AST, nothing is imported or executed).

``chibisplat.render`` is the Blender package (``bpy``); training, evaluation and generation must not reach it,
directly or through another module, so that they run where Blender is not installed. No stage reaches the developer
tools (``chibisplat.tools``: the sample builder, the deps generator). The import graph is the one
``chibisplat.tools.dvc_deps`` builds for dvc.yaml's deps.
"""

from __future__ import annotations

from pathlib import Path

from chibisplat.tools.dvc_deps import module_imports, project_modules

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = "chibisplat.render"
GUARDED = "chibisplat.training"


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden_paths(root: Path, guarded: str, forbidden: str) -> dict[str, list[str]]:
    """For each module under ``guarded`` that can reach ``forbidden``: one import chain from it to there."""
    modules = project_modules(root)
    edges = {name: module_imports(name, modules, root) for name in modules}
    found = {}
    for start in sorted(m for m in modules if _inside(m, guarded)):
        parent = {start: None}
        queue = [start]
        while queue:
            here = queue.pop(0)
            if _inside(here, forbidden):
                chain = [here]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                found[start] = chain[::-1]
                break
            for nxt in sorted(edges[here]):
                if nxt not in parent:
                    parent[nxt] = here
                    queue.append(nxt)
    return found


def test_training_never_imports_the_blender_package():
    found = forbidden_paths(ROOT, GUARDED, FORBIDDEN)
    assert not found, "training modules reach the Blender package:\n" + "\n".join(
        " -> ".join(chain) for chain in found.values())


def test_no_stage_imports_the_developer_tools():
    found = forbidden_paths(ROOT, "stages", "chibisplat.tools")
    assert not found, "stages reach chibisplat.tools (developer tools, run by hand):\n" + "\n".join(
        " -> ".join(chain) for chain in found.values())


def _write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_scan_finds_direct_indirect_and_function_level_imports(tmp_path):
    for pkg in ("chibisplat", "chibisplat/training", "chibisplat/render"):
        _write(tmp_path, f"{pkg}/__init__.py")
    _write(tmp_path, "chibisplat/images.py", "import numpy\n")
    _write(tmp_path, "chibisplat/helper.py", "from chibisplat.render.sheet import tile\n")
    _write(tmp_path, "chibisplat/render/sheet.py", "def tile(): ...\n")
    _write(tmp_path, "chibisplat/training/clean.py", "from chibisplat.images import numpy\n")
    _write(tmp_path, "chibisplat/training/direct.py", "from chibisplat.render import sheet\n")
    _write(tmp_path, "chibisplat/training/indirect.py", "from chibisplat import helper\n")
    _write(tmp_path, "chibisplat/training/lazy.py", "def f():\n    from ..render.sheet import tile\n")
    found = forbidden_paths(tmp_path, GUARDED, FORBIDDEN)
    assert found == {
        "chibisplat.training.direct": ["chibisplat.training.direct", "chibisplat.render"],
        "chibisplat.training.indirect": ["chibisplat.training.indirect", "chibisplat.helper", "chibisplat.render"],
        "chibisplat.training.lazy": ["chibisplat.training.lazy", "chibisplat.render"],
    }
