"""Test helper, run by torchrun (tests/test_train.py): the train stage, with a record per rank of the micro-batches it
drew and of the UNet weights it ended with, written to $PROBE_OUT. Nothing in the training itself is changed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate  # noqa: E402
import torch  # noqa: E402

from chibisplat.training import train as train_mod  # noqa: E402

OUT = Path(os.environ["PROBE_OUT"])
RANK = int(os.environ["RANK"])
drawn: list[list[int]] = []
real_sample_batch = train_mod.sample_batch
real_end_training = accelerate.Accelerator.end_training


def recording_sample_batch(data, batch_size, g, *args, **kwargs):  # (+ the image model's condition)
    batch = real_sample_batch(data, batch_size, g, *args, **kwargs)
    drawn.append(batch.index.tolist())
    return batch


def recording_end_training(self):
    (model,) = self._models
    state = {k: v.detach().cpu().clone() for k, v in self.unwrap_model(model).state_dict().items()}
    torch.save(state, OUT / f"weights_rank{RANK}.pt")
    (OUT / f"drawn_rank{RANK}.json").write_text(json.dumps(drawn))
    return real_end_training(self)


train_mod.sample_batch = recording_sample_batch
accelerate.Accelerator.end_training = recording_end_training

if __name__ == "__main__":
    from stages.train import main

    sys.exit(main(sys.argv[1:]))
