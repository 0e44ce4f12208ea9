"""Fine-tuning a model built already partitioned (deepspeed.zero_init=true under ZeRO-3): the
exported weights fill its empty placeholders, a gathered parameter at a time."""

import torch
from safetensors.torch import load_file


def test_init_from_fills_a_model_built_partitioned(zero3_export, tuned_from_export):
    """2 ranks of ZeRO-3 start from an export with zero_init, at lr 0 (AdamW then changes no
    weight, weight decay included): the export of their checkpoint holds the same weights."""
    log = (tuned_from_export["run"] / "train-rank0.log").read_text()
    share = float(log.split("parameter elements (")[1].split("%")[0])
    assert 40 <= share <= 60, share  # really partitioned over the 2 ranks
    want, got = (
        load_file(run["export"] / "model.safetensors") for run in (zero3_export, tuned_from_export)
    )
    # Not the tuned run's own initialisation: that is the source's before its 6 steps at a
    # learning rate above 0.
    assert want.keys() == got.keys()
    assert [name for name in want if not torch.equal(want[name], got[name])] == []
