"""Fine-tuning the tiny exported model on a folder of one's own: prepared with the model's
tokenizer (a new label token), trained in full (ZeRO-0) and with LoRA adapters (ZeRO-0, and
ZeRO-3 killed with kill -9 and resumed, the new label's row trained beside them; with the
whole embedding trained too under ZeRO-3), exported
merged and as a PEFT adapter, generating with the new label."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from support import midi_factory
from support.apps import run_module
from support.trainings import kill_tree, launch, losses, run, train_args

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.loading import load_exported

STEPS = 6


def finetune_args(dataset: Path, run_dir: Path, base: Path, *extra: str) -> list[str]:
    return train_args(
        dataset,
        run_dir,
        f"init_from={base}",
        f"trainer.max_steps={STEPS}",
        "trainer.save_every=3",
        "optim.lr=3e-3",
        "logger.mode=disabled",
        *extra,
    )


def ds_bytes(run_dir: Path, step: int) -> int:
    """Bytes of DeepSpeed's files in a checkpoint (model and optimizer state)."""
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    return sum(f.stat().st_size for f in ckpt.glob("*_states.pt"))


def zero3_lora(own_folder: Path, tiny_model, tmp_path: Path, setting: str):
    """(run dir, its output, the exported model, its config) of a LoRA run under ZeRO-3 on 2
    ranks with one more setting: ``embedding_rows=...`` (finetune.) or ``precision=...``
    (deepspeed.)."""
    group = "finetune" if setting.startswith("embedding_rows") else "deepspeed"
    run_dir = tmp_path / "lora"
    args = finetune_args(own_folder, run_dir, tiny_model["export"], "deepspeed.zero_stage=3",
                         "finetune=lora", f"{group}.{setting}")  # fmt: skip
    code, out = run(args)
    assert code == 0, out[-4000:]
    export = tmp_path / "export"
    run_module("mtrain.export", f"checkpoint={run_dir}", f"output={export}")
    model, meta = load_exported(export)
    return run_dir, out, model, meta


@pytest.fixture(scope="module")
def own_folder(tiny_model, tmp_path_factory) -> Path:
    """12 pieces of a collection the tiny model never saw, prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("own")
    midi_factory.write_corpus(root / "midi", 12, collections=("mine",))
    run_module(
        "data_pipeline.prepare",
        f"source={root / 'midi'}",
        f"output={root / 'ds'}",
        f"tokenizer_from={tiny_model['export']}",
        "workers=1",
        f"hydra.run.dir={root / 'hydra'}",
    )
    return root / "ds"


@pytest.fixture(scope="module")
def full_run(own_folder, tiny_model, tmp_path_factory) -> Path:
    """Every weight trained, on one rank (its checkpoint is rank 0's under ZeRO-0 on any
    number): the size the adapter runs' checkpoints are held against."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    code, out = run(
        finetune_args(own_folder, run_dir, tiny_model["export"], "deepspeed.zero_stage=0"),
        ranks=1,
    )
    assert code == 0, out[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def lora_straight(own_folder, tiny_model, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    args = finetune_args(
        own_folder, run_dir, tiny_model["export"], "deepspeed.zero_stage=0", "finetune=lora"
    )
    code, out = run(args)
    assert code == 0, out[-4000:]
    return run_dir


def test_the_models_tokenizer_gets_a_token_for_the_new_label(own_folder, tiny_model):
    parent = MusicTokenizer.load(str(tiny_model["export"] / "tokenizer"))
    tokenizer = MusicTokenizer.load(str(own_folder / "tokenizer"))
    assert tokenizer.labels == [*parent.labels, "collection=mine"]
    assert tokenizer.vocab_size == parent.vocab_size + 1
    card = json.loads((own_folder / "dataset.json").read_text())
    assert card["tokenizer"]["lineage"] == {
        "parent": parent.hash,
        "added_labels": ["collection=mine"],
    }


def test_full_fine_tuning_grows_the_row_and_generates_with_the_new_label(
    full_run, own_folder, tiny_model, tmp_path
):
    out = tmp_path / "gen"
    # Given the run directory, generate exports it first (to <run>/export): one process.
    run_module(
        "mtrain.generate",
        f"checkpoint={full_run}",
        f"output={out}",
        "label=collection:mine",
        "num_samples=2",
        "sampling.max_new_tokens=60",
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
    )
    assert len(list(out.glob("sample-*.mid"))) == 2
    report = json.loads((out / "samples.json").read_text())
    assert report["mode"] == "label" and report["prompt_tokens"] == 2  # BOS, collection=mine
    base, _ = load_exported(tiny_model["export"])
    model, meta = load_exported(full_run / "export")
    parent = MusicTokenizer.load(str(tiny_model["export"] / "tokenizer"))
    assert meta["tokenizer_lineage"]["parent"] == parent.hash
    assert model.wte.weight.shape[0] == base.wte.weight.shape[0] + 1


def test_lora_killed_under_zero3_resumes_exactly_and_saves_the_adapters_alone(
    own_folder, tiny_model, lora_straight, full_run, tmp_path
):
    run_dir = tmp_path / "lora3"
    args = finetune_args(
        own_folder,
        run_dir,
        tiny_model["export"],
        "deepspeed.zero_stage=3",
        "deepspeed.param_persistence_threshold=0",
        "finetune=lora",
    )
    proc = launch(args)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    kill_tree(proc)  # kill -9 of the whole job: no chance to save
    proc.communicate()
    code, out = run(args)
    assert code == 0, out[-4000:]
    assert "resumed from" in out and "trainable" in out
    expected, got = losses(lora_straight), losses(run_dir)
    assert [got[s] for s in range(4, STEPS + 1)] == [expected[s] for s in range(4, STEPS + 1)]
    # The frozen base is in init_from, not in the checkpoints.
    assert ds_bytes(run_dir, STEPS) < ds_bytes(full_run, STEPS) / 4
    assert ds_bytes(lora_straight, STEPS) < ds_bytes(full_run, STEPS) / 4


def test_lora_export_merges_and_its_peft_adapter_loads_onto_the_base(
    lora_straight, tiny_model, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export = tmp_path / "export"
    run_module("mtrain.export", f"checkpoint={lora_straight}", f"output={export}")
    model, meta = load_exported(export)
    assert meta["adapter"]["peft_logits_max_abs_diff"] < 1e-4
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    hf_base = AutoModelForCausalLM.from_pretrained(str(tiny_model["export"] / "hf"))
    hf_base.resize_token_embeddings(model.config.vocab_size, mean_resizing=False)
    peft_model = PeftModel.from_pretrained(hf_base, str(export / "adapter")).eval()
    base, _ = load_exported(tiny_model["export"])
    known = base.config.vocab_size  # ids the base has too
    inputs = torch.randint(known, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(inputs).logits
        inputs[:, 1] = model.config.vocab_size - 1  # the new label token, for the two below
        merged = model(inputs).logits
        adapted = peft_model(input_ids=inputs).logits
    assert torch.allclose(adapted, merged, atol=1e-4)
    assert (merged[:, :1, :known] - before[:, :1]).abs().max() > 1e-2  # adapters changed it
    # The default trains the new label's row (and the tokens the base has not learned): those
    # rows moved, every other row is the base's.
    rows = json.loads((lora_straight / "adapter_base.json").read_text())["embedding_rows"]
    assert known in rows
    others = [i for i in range(known) if i not in rows]
    assert torch.equal(model.wte.weight[others], base.wte.weight[others])
    parent = MusicTokenizer.load(str(tiny_model["export"] / "tokenizer"))
    labels = [parent.label_offset + i for i, _ in enumerate(parent.labels)]  # all collection=
    start = base.wte.weight[labels].mean(dim=0)
    assert (model.wte.weight[known] - start).abs().max() > 1e-3


def test_lora_with_the_whole_embedding_trains_every_row_and_exports_it(
    own_folder, tiny_model, tmp_path
):
    _, out, model, meta = zero3_lora(own_folder, tiny_model, tmp_path, "embedding_rows=all")
    assert "and the token embedding" in out
    assert meta["adapter"]["peft_logits_max_abs_diff"] < 1e-4  # every row as trainable tokens
    base, _ = load_exported(tiny_model["export"])
    known = base.config.vocab_size
    moved = (model.wte.weight[:known] - base.wte.weight).abs().amax(dim=1)
    assert (moved > 0).float().mean() > 0.5  # the base's rows trained too
    # The new label's row left the mean of the collection rows it started from.
    parent = MusicTokenizer.load(str(tiny_model["export"] / "tokenizer"))
    rows = [parent.label_offset + i for i, name in enumerate(parent.labels)]  # all collection=
    start = base.wte.weight[rows].mean(dim=0)
    assert (model.wte.weight[known] - start).abs().max() > 1e-3


def test_lora_in_bf16_under_zero3_trains_its_rows_and_exports_them(
    own_folder, tiny_model, tmp_path
):
    """The default rows (the new label's and the unlearned tokens') under ZeRO-3 in bf16: the
    base is held in bf16, the rows and adapters train in DeepSpeed's fp32 master copy."""
    run_dir, out, model, meta = zero3_lora(own_folder, tiny_model, tmp_path, "precision=bf16")
    assert "rows of the token embedding" in out
    assert meta["adapter"]["peft_logits_max_abs_diff"] < 1e-3
    base, _ = load_exported(tiny_model["export"])
    known = base.config.vocab_size
    rows = json.loads((run_dir / "adapter_base.json").read_text())["embedding_rows"]
    others = [i for i in range(known) if i not in rows]
    # Every other row is the base's as the run held it: rounded to bf16.
    held = base.wte.weight[others].to(torch.bfloat16).float()
    assert torch.equal(model.wte.weight[others], held)
    assert known in rows  # the new label's
