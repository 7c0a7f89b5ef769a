"""Character identity: uid, source hashes and config hashes (docs/dataset-contract.md §1)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

ASSET_SUFFIXES = (".fbx", ".blend", ".glb", ".gltf", ".vrm")
_NON_UID = re.compile(r"[^a-z0-9]+")


def uid_for(asset: Path, assets_dir: Path) -> str:
    """``heroes/Mika Chan.fbx`` -> ``heroes_mika_chan``: relative path without extension, lower-cased,
    every run of characters outside [a-z0-9] replaced by ``_``. A uid holds only [a-z0-9_], so it is always a
    safe single folder name (never ``.``, ``..`` or a path)."""
    rel = Path(asset).resolve().relative_to(Path(assets_dir).resolve())
    stem = rel.with_suffix("").as_posix().lower()
    uid = _NON_UID.sub("_", stem)
    if not uid.strip("_"):
        raise ValueError(f"{asset}: the file name gives an empty uid; rename it to contain letters or digits")
    return uid


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """Hash of several files in the given (fixed) order: name length, name, size, bytes for each."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    h = hashlib.sha256()
    for p in paths:
        name = Path(p).name.encode()
        h.update(len(name).to_bytes(4, "little") + name)
        h.update(Path(p).stat().st_size.to_bytes(8, "little"))
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_state(state: dict) -> str:
    """Hash of a module's weights themselves (a ``state_dict``: for each tensor in name order its name, dtype, shape
    and bytes), independent of the file format they came from. Tensors are read one at a time (a GPU tensor is copied
    to the host alone), so a full-size UNet needs no second copy in memory."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def sha256_sources(asset: Path, referenced: list[Path]) -> str:
    """``source_sha256`` of an asset (docs/dataset-contract.md §1): the sha256 of its bytes when it references no external
    file; otherwise a hash over the asset and every external file it references (textures, buffers, libraries), in
    the given fixed order: for each, its path relative to the asset's folder, size and sha256. So adding, removing,
    moving or changing one referenced file changes the asset's key, and only that asset's."""
    if not referenced:
        return sha256_file(asset)
    h = hashlib.sha256()
    base = Path(asset).parent
    for p in [Path(asset), *referenced]:
        name = os.path.relpath(p, base).replace(os.sep, "/").encode()
        h.update(len(name).to_bytes(4, "little") + name)
        h.update(p.stat().st_size.to_bytes(8, "little"))
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def sha256_code(paths) -> str:
    """Hash of Python sources as code: their syntax trees without docstrings (comments are not in the tree), so
    editing a comment or a docstring keeps the hash while any change to code or a constant changes it. The render
    cache keys on it: a documentation edit never re-renders a character."""
    import ast

    h = hashlib.sha256()
    for p in paths:
        tree = ast.parse(Path(p).read_text(encoding="utf-8"), filename=str(p))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        dump = ast.dump(tree, annotate_fields=True, include_attributes=False).encode()
        h.update(len(dump).to_bytes(8, "big") + dump)
    return h.hexdigest()
