"""Where a character's caption comes from.

For an asset ``<assets>/heroes/Mika Chan.fbx`` (meta.json ``source: heroes/Mika Chan.fbx``) the caption is, in order:

1. the sidecar text file next to the asset, same stem: ``<assets>/heroes/Mika Chan.txt``;
2. an entry in ``<assets>/captions.yaml``, keyed by the uid (``heroes_mika_chan``) or by the asset's relative
   path (``heroes/Mika Chan.fbx``);
3. ``pack.default_caption`` (a template such as ``"a chibi anime character, {name}"``), when set.

A sidecar and a captions.yaml entry that disagree, or a caption that is missing with no default, is an error
naming the asset and what to write where.

captions.yaml is read as YAML 1.2 with every key taken as the text written in the file: ``001``, ``010``, ``on`` or
``true`` are the uids ``"001"``, ``"010"``, ``"on"``, ``"true"`` (YAML 1.1 would read them as 1, 8, True and let
them collide). A duplicate key, a syntax error, a value that is not text or an empty value is an error naming the
file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode

CAPTIONS_FILE = "captions.yaml"


class CaptionError(ValueError):
    """A caption is missing, empty or ambiguous; the message names the asset and the fix."""


@dataclass(frozen=True)
class Caption:
    text: str
    origin: str  # where it came from, for the pack summary: sidecar | captions.yaml | default


def name_from_uid(uid: str) -> str:
    """``heroes_mika_chan`` -> ``heroes mika chan`` (the ``{name}`` of the default caption template)."""
    return uid.replace("_", " ").strip()


def _clean(text: str) -> str:
    # One line, single spaces: captions are prompts, and stray newlines would change their hash.
    return " ".join(str(text).split())


_NULL_TAG = "tag:yaml.org,2002:null"


def read_captions_table(path: Path) -> dict[str, str]:
    """``captions.yaml`` -> {key as written: cleaned caption} (module docstring: YAML 1.2, keys are strings)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CaptionError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    try:
        # Composing (not constructing) keeps every scalar as the text written in the file, with its line.
        root = YAML(typ="safe", pure=True).compose(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CaptionError(f"{path}{where}: YAML syntax error: {e.problem or e.context}; fix the file "
                           "(quote a caption that contains ': ' or starts with a special character)") from None
    if root is None:
        return {}
    if not isinstance(root, MappingNode):
        raise CaptionError(f"{path}, line {root.start_mark.line + 1}: expected a mapping 'uid or relative asset path: "
                           "caption', one per line")
    table: dict[str, str] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, ScalarNode) or key_node.tag == _NULL_TAG:
            raise CaptionError(f"{path}, line {line}: a key must be a uid or a relative asset path")
        key = key_node.value
        if key in lines:
            raise CaptionError(f"{path}, line {line}: duplicate key {key!r} (first on line {lines[key]}); keep one")
        if not isinstance(value_node, ScalarNode) or value_node.tag == _NULL_TAG or not _clean(value_node.value):
            raise CaptionError(f"{path}, line {line}: the caption of {key!r} must be non-empty text "
                               "(one line; quote it if it contains ': ')")
        lines[key] = line
        table[key] = _clean(value_node.value)
    return table


class CaptionBook:
    """All caption sources of one assets folder; :meth:`caption_for` resolves one character."""

    def __init__(self, assets_dir: Path, default_caption: str | None = None):
        self.assets_dir = Path(assets_dir)
        self.default_caption = default_caption or None
        self.table: dict[str, str] = {}
        self.table_path = self.assets_dir / CAPTIONS_FILE
        self._used_keys: set[str] = set()
        if self.table_path.is_file():
            self.table = read_captions_table(self.table_path)

    def caption_for(self, uid: str, source: str) -> Caption:
        """The caption of the character ``uid`` rendered from ``<assets>/<source>``."""
        rel = PurePosixPath(Path(source).as_posix())
        sidecar_path = self.assets_dir / rel.with_suffix(".txt")
        sidecar = None
        if sidecar_path.is_file():
            sidecar = _clean(sidecar_path.read_text(encoding="utf-8"))
            if not sidecar:
                raise CaptionError(f"{sidecar_path}: the caption file of {source} (uid {uid}) is empty; write a caption")

        entries = {k: self.table[k] for k in (uid, str(rel)) if k in self.table}
        if len(set(entries.values())) > 1:
            raise CaptionError(
                f"{self.table_path}: {source} (uid {uid}) has two different captions, under {' and '.join(entries)}; "
                "keep one"
            )
        self._used_keys.update(entries)
        table = next(iter(entries.values()), None)

        if sidecar is not None and table is not None and sidecar != table:
            raise CaptionError(
                f"{source} (uid {uid}): {sidecar_path} and {self.table_path} give different captions; keep one"
            )
        if sidecar is not None:
            return Caption(sidecar, "sidecar")
        if table is not None:
            return Caption(table, CAPTIONS_FILE)
        if self.default_caption:
            try:
                text = self.default_caption.format(name=name_from_uid(uid), uid=uid)
            except (KeyError, IndexError) as e:
                raise CaptionError(
                    f"pack.default_caption {self.default_caption!r}: unknown placeholder {e}; use {{name}} or {{uid}}"
                ) from None
            return Caption(_clean(text), "default")
        raise CaptionError(
            f"{source} (uid {uid}) has no caption: write it to {sidecar_path}, or add '{uid}: <caption>' to "
            f"{self.table_path}, or set pack.default_caption in params.yaml"
        )

    def unused_keys(self) -> list[str]:
        """captions.yaml keys that matched no character so far (usually a typo or a removed asset)."""
        return sorted(set(self.table) - self._used_keys)
