"""File-system helpers shared by the stages: whole folders replaced with renames only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def install_folder(staged: Path, final: Path, trash_dir: Path) -> None:
    """Replace ``final`` by ``staged`` with renames only (same file system): a kill at any point leaves either the
    old or the new folder at ``final``; the old one goes through ``trash_dir`` and is then deleted."""
    trash_dir.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = trash_dir / f"{final.name}.{os.getpid()}"
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
