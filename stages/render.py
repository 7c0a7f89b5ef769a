"""DVC stage ``render``: assets -> 40 calibrated views + camera JSON per character.

    python -m stages.render            # reads params.yaml `render:`
"""

import sys

from chibisplat.params import section
from chibisplat.render.stage import run_render_stage


def main() -> int:
    params = section("render")
    report = run_render_stage(params)
    failed = report["counts"]["failed"]
    if failed and not params.get("allow_failures", False):
        print(
            f"render: {failed} character(s) failed (see {params.get('report')}); the others were rendered. "
            "Fix them, or set render.allow_failures: true to accept a partial dataset.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
