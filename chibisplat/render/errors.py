"""Errors about one asset: what went wrong and what the user should do about it."""


class AssetError(Exception):
    """A problem with one input asset. ``reason`` says what is wrong, ``action`` what to do."""

    def __init__(self, reason: str, action: str):
        super().__init__(reason)
        self.reason = reason
        self.action = action
