"""Fine-tuning on data tokenized with an extension of the model's tokenizer: the rows of the
label tokens the data adds are appended to the exported weights."""

import torch

from data_pipeline.errors import InputError
from data_pipeline.tokenizer import MusicTokenizer

# The weights indexed by token id: the input embedding, and the output layer when untied.
ROW_WEIGHTS = ("wte.weight", "lm_head.weight")


def added_labels(init_from: str, parent: MusicTokenizer, child: MusicTokenizer) -> list[str]:
    """The label tokens the run's tokenizer ``child`` appends to ``parent``, the one the model
    at ``init_from`` was trained with; refused when ``child`` is anything else."""
    added = child.added_labels_over(parent)
    if added is None:
        raise InputError(
            f"init_from={init_from} was trained with tokenizer {parent.hash[:12]}, but this "
            f"run's data was tokenized with {child.hash[:12]}, which neither is it nor extends "
            f"it with new labels: prepare the data with tokenizer_from={init_from}"
        )
    return added


def grown_rows(
    state: dict[str, torch.Tensor], parent: MusicTokenizer, child: MusicTokenizer
) -> dict[str, torch.Tensor]:
    """``state`` with a row appended to each token-indexed weight per label ``child`` adds.
    A new row starts as the mean of the existing rows of labels with the same key (a new
    ``collection=`` reads as an average collection), or of every label row when the key is
    new too, or of every row when the model has no labels: a start the model already reads,
    not noise of another scale."""
    added = child.labels[len(parent.labels) :]
    if not added:
        return state
    ids = dict(zip(parent.labels, range(parent.label_offset, parent.vocab_size), strict=True))
    grown = dict(state)
    for name in ROW_WEIGHTS:
        if name not in state:
            continue
        weight = state[name]
        rows = [_mean_row(weight, _peers(label, ids)) for label in added]
        grown[name] = torch.cat([weight, torch.stack(rows).to(weight.dtype)])
    if state.get("lm_head.weight") is state.get("wte.weight"):  # tied: one tensor, grown once
        grown["lm_head.weight"] = grown["wte.weight"]
    return grown


def _peers(label: str, ids: dict[str, int]) -> list[int]:
    key = label.split("=", 1)[0]
    same_key = [i for name, i in ids.items() if name.split("=", 1)[0] == key]
    return same_key or list(ids.values())


def _mean_row(weight: torch.Tensor, ids: list[int]) -> torch.Tensor:
    rows = weight[ids] if ids else weight
    return rows.float().mean(dim=0)
