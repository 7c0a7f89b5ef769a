"""Reading ``params.yaml`` (the single source of the pipeline's parameters)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ruamel.yaml import YAML


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stages from the repository root (where params.yaml is)")
    # YAML 1.2 (ruamel, as DVC writes it with `dvc exp run -S`): PyYAML's YAML 1.1 would read an unquoted
    # `no` as False.
    with open(path) as f:
        return YAML(typ="safe", pure=True).load(f) or {}


def section(name: str, path: str | Path = "params.yaml") -> dict:
    params = load_params(path)
    if name not in params:
        raise KeyError(f"{path} has no '{name}:' section")
    return params[name]


def run_stage(name: str, doc: str | None, body: Callable[[dict], object], errors: tuple[type[BaseException], ...],
              argv: list[str] | None = None) -> int:
    """The ``main`` of a stage module: ``--params FILE`` (default params.yaml), then ``body(params)``.

    An expected error (``errors``, plus a missing params file) prints ``<name>: error: <message>`` and returns 1,
    so DVC shows one clear line instead of a traceback; anything else propagates.
    """
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        body(load_params(args.params))
    except (FileNotFoundError, *errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return 0
