"""Local folders of Hugging Face snapshots (SD1.5, DiffSplat, CLIP): the one resolver, the one error class.

Nothing is downloaded (the machines that train have no internet): a snapshot is ``path`` when params.yaml sets it,
else the Hugging Face cache at the pinned ``revision`` (``local_files_only``). A missing folder or file raises
:class:`ModelSourceError` with the exact download command. No torch here: the embed stage uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from chibisplat.config import ModelsParams, SnapshotParams

SD15_SUBFOLDERS = ("unet", "vae", "scheduler", "tokenizer", "text_encoder")
SD15_VAE_SUBFOLDER = "vae"  # SD1.5's RGB image VAE: encodes the condition image of the image model


class ModelSourceError(FileNotFoundError):
    """A configured model is not on this machine; the message says how to get it."""


def download_hint(repo: str, revision: str | None, patterns: Sequence[str] | None, target: str, key: str) -> str:
    rev = f" --revision {revision}" if revision else ""
    inc = "".join(f" --include '{p}'" for p in patterns or [])
    py_patterns = f", allow_patterns={list(patterns)!r}" if patterns else ""
    py_rev = f", revision={revision!r}" if revision else ""
    return (
        f"On a machine with internet run\n"
        f"  hf download {repo}{rev}{inc} --local-dir {target}\n"
        f"(older huggingface_hub: huggingface-cli download {repo}{rev}{inc} --local-dir {target}) or\n"
        f"  python -c \"from huggingface_hub import snapshot_download; "
        f"snapshot_download({repo!r}{py_rev}{py_patterns}, local_dir={target!r})\"\n"
        f"then copy {target} here and set params.yaml {key}.path to it, or fill the Hugging Face cache (HF_HOME) "
        f"with the same revision."
    )


def resolve_snapshot(spec: SnapshotParams, patterns: Sequence[str], required: Sequence[str], key: str) -> Path:
    """The local folder of ``spec`` (params.yaml ``key``): ``spec.path`` if set, else the HF cache at
    ``spec.revision``. ``required``: relative paths that must exist inside (a trailing ``/``: a folder)."""
    repo, revision = spec.repo, spec.revision
    target = str(spec.path) if spec.path else f"models/{repo.split('/')[-1]}"
    hint = download_hint(repo, revision, patterns, target, key)
    if spec.path:
        folder = Path(spec.path)
        if not folder.is_dir():
            raise ModelSourceError(f"{key}.path = {folder} does not exist ({repo}): no {' and '.join(required)} "
                                   f"there.\n{hint}")
    else:
        if not revision:
            raise ModelSourceError(f"params.yaml sets neither {key}.path nor both {key}.repo and {key}.revision "
                                   f"(a pinned commit hash) for {repo}.\n{hint}")
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns),
                                            local_files_only=True))
        except Exception as e:  # the hub raises several types for "not in the cache"
            raise ModelSourceError(f"{repo}@{revision} is not in the Hugging Face cache ({type(e).__name__}).\n"
                                   f"{hint}") from None
    missing = [r for r in required if not (folder / r).exists()]
    if missing:
        raise ModelSourceError(f"{folder} lacks {' and '.join(missing)} ({repo}@{revision}).\n{hint}")
    return folder


def sd15_folder(models: ModelsParams, required: Sequence[str]) -> Path:
    """The Stable Diffusion 1.5 folder of ``models.sd15`` holding ``required`` (e.g. ``text_encoder/``)."""
    return resolve_snapshot(models.sd15, [f"{s}/*" for s in SD15_SUBFOLDERS], required, "models.sd15")


__all__ = ["ModelSourceError", "SD15_SUBFOLDERS", "SD15_VAE_SUBFOLDER", "download_hint", "resolve_snapshot",
           "sd15_folder"]
