"""A checkpoint written while training goes on: the staged copy is what torch.save would have
written of the live state, whatever the update does to it afterwards; the plan counts the
copy and chooses how freed host memory is kept from its own figures."""

import io

import pytest
import torch

from mtrain.model import GPTConfig
from mtrain.training import memory_plan
from mtrain.training.background_save import stage, storages_of
from mtrain.training.config import DeepSpeedConfig
from mtrain.training.memory_plan import Layout, estimate, judge


def test_a_staged_state_keeps_its_values_and_sharing_after_the_update_changes_the_original():
    flat = torch.arange(12, dtype=torch.float32)
    state = {
        "fp32_flat_groups": [flat],
        "optimizer_state_dict": {"state": {0: {"exp_avg": flat[4:8], "step": torch.tensor(3.0)}}},
        "param": torch.nn.Parameter(torch.ones(3), requires_grad=False),
        "loss_scale": 1.0,
    }
    expected = io.BytesIO()
    torch.save(state, expected)
    staged = stage(state)
    flat.add_(100)  # the next optimizer update, in place
    state["param"].data.mul_(0)
    written = io.BytesIO()
    torch.save(staged, written)
    assert written.getvalue() == expected.getvalue()  # the same bytes as saving then
    moments = staged["optimizer_state_dict"]["state"][0]["exp_avg"]
    assert (
        moments.untyped_storage().data_ptr()
        == staged["fp32_flat_groups"][0].untyped_storage().data_ptr()
    )
    assert isinstance(staged["param"], torch.nn.Parameter) and staged["loss_scale"] == 1.0


def test_a_save_stages_into_the_buffers_mapped_ahead_and_writes_the_same_bytes():
    """The buffers of the previous staged copy (or mapped before the first save) are copied
    into, not allocated anew: the same bytes as a fresh copy, in the same memory."""
    flat = torch.arange(12, dtype=torch.float32)
    state = {"fp32_flat_groups": [flat], "exp_avg": flat[4:8], "other": torch.ones(2)}
    spare = {key: torch.UntypedStorage(s.nbytes()) for key, s in storages_of(state).items()}
    mapped = {s.data_ptr() for s in spare.values()}
    flat.add_(1)  # an update between mapping and saving
    expected = io.BytesIO()
    torch.save(stage(state), expected)
    storages = {}
    staged = stage(state, storages, spare)
    written = io.BytesIO()
    torch.save(staged, written)
    assert written.getvalue() == expected.getvalue()
    assert {s.data_ptr() for s in storages.values()} == mapped and not spare


def layout(staged: bool) -> Layout:
    model = GPTConfig(vocab_size=512, n_layer=4, n_head=4, d_model=256, max_seq_len=256)
    return Layout(model, DeepSpeedConfig(), 2, 2, staged_checkpoint=staged)


def test_the_plan_counts_a_staged_copy_of_the_ranks_checkpoint():
    with_copy, without = estimate(layout(True)), estimate(layout(False))
    copy = with_copy.parts["checkpoint staging (background save)"]
    shape = memory_plan.ModelShape.of(layout(True).model)
    # ZeRO-3 on 2 ranks: fp32 master weights and Adam moments of half the model, and the
    # probe's fp32 weights of the embedding and one block (gathered a weight at a time).
    assert copy == pytest.approx(12 * shape.params / 2 + 4 * (shape.largest + shape.block))
    assert with_copy.total == pytest.approx(without.total + copy)


@pytest.mark.parametrize(("room", "kept"), [(2.5, True), (1.5, False)])
def test_freed_host_memory_is_kept_only_where_the_plan_leaves_room(monkeypatch, room, kept):
    calls = []
    monkeypatch.setattr(memory_plan, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(memory_plan, "return_freed_memory", lambda: calls.append("return") or True)
    need = estimate(layout(False)).total
    verdict = judge(layout(False), room * need, "test")
    assert memory_plan.host_memory_policy(verdict) is kept
    assert calls == (["keep"] if kept else ["return"])
