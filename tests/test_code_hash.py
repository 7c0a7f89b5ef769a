"""The render cache keys on the Blender-side code as code: documentation edits never re-render a character."""

from pathlib import Path

from chibisplat import cameras, protocol
from chibisplat.identity import sha256_code
from chibisplat.render import stage

SOURCE = '''"""Module docstring."""
X = 1.4  # a comment


def f(a):
    """Function docstring."""
    return a * X


class C:
    """Class docstring."""

    def g(self):
        return "not a docstring"
'''


def _hash(tmp_path: Path, text: str) -> str:
    p = tmp_path / "m.py"
    p.write_text(text)
    return sha256_code([p])


def test_comments_and_docstrings_do_not_change_the_hash(tmp_path):
    base = _hash(tmp_path, SOURCE)
    edited = (SOURCE.replace("Module docstring.", "Another text, docs/x.md §3.")
              .replace("# a comment", "# docs/diffsplat-reference.md §4")
              .replace("Function docstring.", "Changed.\n\n    More lines.\n    ")
              .replace('    """Class docstring."""\n\n', ""))
    assert _hash(tmp_path, edited) == base


def test_code_and_constants_change_the_hash(tmp_path):
    base = _hash(tmp_path, SOURCE)
    assert _hash(tmp_path, SOURCE.replace("X = 1.4", "X = 1.5")) != base
    assert _hash(tmp_path, SOURCE.replace("a * X", "a / X")) != base
    # a string that is not the first statement is code, not a docstring
    assert _hash(tmp_path, SOURCE.replace('"not a docstring"', '"other"')) != base


def test_render_config_hashes_the_blender_side_code_as_code():
    files = (Path(stage.__file__).with_name("blender.py"), cameras.__file__, protocol.__file__)
    params = {"missing_textures": None}
    assert stage.render_config(params)["render_code_sha256"] == sha256_code(files)
