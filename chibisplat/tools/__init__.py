"""Developer tools run from the repository root (``python -m chibisplat.tools.<name>``); no stage imports them."""
