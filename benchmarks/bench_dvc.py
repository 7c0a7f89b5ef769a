"""DVC overhead benchmark: `dvc status` and no-op `dvc repro` as the render folder grows.

    python benchmarks/bench_dvc.py [--sizes 100 300 1000] [--skip-samples] [--file-bytes 2048]

Two parts, each in a throwaway git + DVC repository under a temp folder:

* ``samples``: this repository's real pipeline (render -> pack -> embed [-> ...]) on the 7 bundled characters at
  32 px / 1 sample: `dvc repro` from scratch, then `dvc status` and a no-op `dvc repro`.
* ``synthetic N``: a two-stage pipeline whose first stage writes N render folders of 122 small files each
  (40 views + 40 normal/depth + 40 camera JSON + meta.json + contact_sheet.png, the render stage's layout, but
  random bytes of ``--file-bytes`` instead of Blender renders) into ``data/renders`` (a cached, persisted output),
  and a second stage that depends on that directory. 1,000 characters = 122,000 files.

For each it prints: the first `dvc repro` (generate + hash + copy into the cache), `dvc status` right after (file
hashes known: DVC's state DB keys them by inode/mtime/size, so status only stat()s the files), a second `dvc
status`, a no-op `dvc repro`, `dvc status` after touching one file (one re-hash) and a *cold* `dvc status` with
the state DB wiped (every file re-hashed), all wall-clock seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")
ENV = {
    **os.environ,
    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@chibisplat.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@chibisplat.invalid",
}

GENERATE = textwrap.dedent(
    """\
    # Writes N synthetic render folders in the render stage's layout (122 files each).
    import json, os, random, sys
    from pathlib import Path
    n, size = int(sys.argv[1]), int(sys.argv[2])
    out = Path("data/renders")
    rng = random.Random(0)
    for c in range(n):
        d = out / f"chibi_{c:05d}"
        if (d / "meta.json").is_file():
            continue  # incremental, like the real render stage (persist: true)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(40):
            (d / f"{i:05d}.png").write_bytes(rng.randbytes(size))
            (d / f"{i:05d}_nd.png").write_bytes(rng.randbytes(size))
            (d / f"{i:05d}.json").write_text(json.dumps({"index": i, "uid": d.name, "noise": rng.random()}))
        (d / "contact_sheet.png").write_bytes(rng.randbytes(size * 4))
        (d / "meta.json").write_text(json.dumps({"uid": d.name, "views": 40}))
    """
)

COUNT = textwrap.dedent(
    """\
    # Stands in for pack: depends on the whole render directory, writes one small file.
    import os, sys
    n = sum(len(files) for _, _, files in os.walk("data/renders"))
    os.makedirs("data/packed", exist_ok=True)
    open("data/packed/count.txt", "w").write(f"{n}\\n")
    """
)


def sh(cmd: list[str], cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def timed(cmd: list[str], cwd: Path, timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    out = sh(cmd, cwd, timeout)
    return time.perf_counter() - t, out


def git_dvc_init(repo: Path) -> None:
    sh(["git", "init", "-q"], repo)
    if not (repo / ".dvc").is_dir():
        sh([DVC, "init", "-q"], repo)
    # A state DB of our own, so the cold measurement can wipe it without touching the user's site cache.
    sh([DVC, "config", "--local", "core.site_cache_dir", str(repo.parent / "site-cache")], repo)


def commit(repo: Path, msg: str) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "--allow-empty", "-m", msg], repo)


def measure(repo: Path, touch: Path) -> dict:
    r = {}
    r["status"], out = timed([DVC, "status"], repo)
    assert "up to date" in out.stdout, out.stdout
    r["status2"], _ = timed([DVC, "status"], repo)
    r["noop_repro"], out = timed([DVC, "repro"], repo)
    assert "Running stage" not in out.stdout, out.stdout
    os.utime(touch)  # same bytes, new mtime: DVC re-hashes this one file and finds it unchanged
    r["touched_status"], out = timed([DVC, "status"], repo)
    assert "up to date" in out.stdout, out.stdout
    shutil.rmtree(repo.parent / "site-cache", ignore_errors=True)
    r["cold_status"], out = timed([DVC, "status"], repo)
    assert "up to date" in out.stdout, out.stdout
    r["files"] = sum(1 for p in (repo / "data" / "renders").rglob("*") if p.is_file())
    return r


def bench_samples(tmp: Path) -> dict:
    repo = tmp / "samples" / "repo"
    repo.mkdir(parents=True)
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["render"].update(resolution=32, samples=1, workers=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_dvc_init(repo)
    commit(repo, "copy")
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    # Only the data stages: training (if present) is not what this benchmark measures.
    targets = [s for s in ("render", "pack", "embed") if s in stages]
    first, _ = timed([DVC, "repro", *targets], repo)
    commit(repo, "repro")
    r = {}
    r["status"], _ = timed([DVC, "status", *targets], repo)
    r["status2"], _ = timed([DVC, "status", *targets], repo)
    r["noop_repro"], out = timed([DVC, "repro", *targets], repo)
    assert "Running stage" not in out.stdout, out.stdout
    os.utime(repo / "data" / "renders" / "cat_girl" / "00000.png")
    r["touched_status"], _ = timed([DVC, "status", *targets], repo)
    shutil.rmtree(repo.parent / "site-cache", ignore_errors=True)
    r["cold_status"], _ = timed([DVC, "status", *targets], repo)
    r["files"] = sum(1 for p in (repo / "data" / "renders").rglob("*") if p.is_file())
    r["first_repro"] = first
    return r


def bench_synthetic(tmp: Path, n: int, file_bytes: int) -> dict:
    repo = tmp / f"synthetic-{n}" / "repo"
    repo.mkdir(parents=True)
    (repo / "gen.py").write_text(GENERATE)
    (repo / "count.py").write_text(COUNT)
    (repo / "params.yaml").write_text(f"render:\n  characters: {n}\n  file_bytes: {file_bytes}\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "render": {"cmd": "python gen.py ${render.characters} ${render.file_bytes}", "deps": ["gen.py"],
                   "params": ["render"], "outs": [{"data/renders": {"persist": True}}]},
        "pack": {"cmd": "python count.py", "deps": ["count.py", "data/renders"], "outs": ["data/packed"]},
    }}, sort_keys=False))
    git_dvc_init(repo)
    commit(repo, "synthetic pipeline")
    first, _ = timed([DVC, "repro"], repo)
    commit(repo, "repro")
    r = measure(repo, repo / "data" / "renders" / "chibi_00000" / "00000.png")
    r["first_repro"] = first
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 300, 1000])
    ap.add_argument("--file-bytes", type=int, default=2048, help="bytes per synthetic view file")
    ap.add_argument("--skip-samples", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp repositories")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_dvc_"))
    rows = []
    try:
        if not args.skip_samples:
            rows.append(("7 samples (real pipeline)", bench_samples(tmp)))
            print(f"  done: 7 samples ({rows[-1][1]['files']} render files)", file=sys.stderr)
        for n in args.sizes:
            rows.append((f"{n} synthetic", bench_synthetic(tmp, n, args.file_bytes)))
            print(f"  done: {n} synthetic ({rows[-1][1]['files']} files)", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    cores = os.cpu_count()
    print(f"\nDVC overhead (dvc {sh([DVC, '--version'], REPO).stdout.strip()}, {cores} CPU cores; seconds, wall-clock)")
    cols = ["files", "first_repro", "status", "status2", "noop_repro", "touched_status", "cold_status"]
    head = ("characters", "render files", "first repro", "status", "status again", "no-op repro",
            "status, 1 touched", "status, cold")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows:
        cells = [name, str(r["files"])] + [f"{r[c]:.2f}" for c in cols[1:]]
        print("| " + " | ".join(cells) + " |")
    print(
        "\nfirst repro: the stage command + hashing every output file + copying it into the cache."
        "\nstatus / no-op repro: every file is stat()ed and looked up in DVC's state DB (hashes keyed by"
        " inode/mtime/size), nothing re-read; 'cold': state DB wiped, every file re-hashed."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
