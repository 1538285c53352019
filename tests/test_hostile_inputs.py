"""Issue 28: no code from a checkpoint folder, no stale or silently wrong results, one clear error per bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from test_faults import TinyModel, TinyTask, images, trainer


# ----------------------------------------------------------------------------------------------------------------
# Defect 1: every checkpoint part is read with weights_only=True
# ----------------------------------------------------------------------------------------------------------------
class _Marker:
    """A pickle that, when loaded without weights_only, creates the marker file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class TwoModuleTask(TinyTask):
    """Two trained modules: the checkpoint holds optimizer.bin and optimizer_1.bin."""

    def __init__(self):
        super().__init__()
        self.other = TinyModel()

    def modules(self):
        return {"model": self.model, "other": self.other}

    def losses(self, batch, step):
        features = batch["images"].mean(dim=(2, 3))
        yield "model", (self.model.linear(features) ** 2).mean(), {}
        yield "other", (self.other.linear(features) ** 2).mean(), {}


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "optimizer_1.bin", "scheduler.bin"])
def test_resume_never_unpickles_code_from_a_checkpoint_file(tmp_path, name):
    from vfmtok.tokenizer.utils.errors import CheckpointError

    output = tmp_path / "out"
    trainer(output, images(4), task=TwoModuleTask(), max_steps=2).fit()
    checkpoint = output / "checkpoints" / "step-00000002"
    assert (checkpoint / name).is_file()
    marker = tmp_path / "marker"
    torch.save(_Marker(marker), checkpoint / name)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        trainer(output, images(4), task=TwoModuleTask(), max_steps=4).fit(resume=True)
    assert not marker.exists()
