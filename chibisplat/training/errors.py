"""Errors of the training stages (their mains print them as one line; chibisplat/params.py ``run_stage``)."""


class NonFiniteLoss(FloatingPointError):
    """A training loss became NaN or inf (train and finetune stop with it; the stages print it as an error)."""
