"""The model card every export carries: what it says of the data, tokenizer, training, shape
and results, from a run directory's own records."""

import hashlib
import json

from mtrain.exported.model_card import card_facts, record_evaluation, write_card
from mtrain.runs.run_dir import RunDir

SHAPE = {"vocab_size": 530, "n_layer": 3, "n_head": 4, "d_model": 96, "max_seq_len": 256}


def _run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    card = {"source": "music21:all", "splits": {"train": {"tokens": 12345, "pieces": 67}}}
    (data / "dataset.json").write_text(json.dumps(card))
    run = RunDir(tmp_path / "run")
    (run.root / "hydra").mkdir(parents=True)
    run.train_config.write_text(f"data:\n  path: {data}\nmodel:\n  n_layer: 3\n")
    run.train_config.with_name("overrides.yaml").write_text(
        f"- data.path={data}\n- model=mini\n- trainer.max_steps=20\n"
    )
    rows = [{"step": s, "train/tokens_seen": s * 2048} for s in (10, 20)]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, data


def _export(tmp_path, run, step):
    export = tmp_path / "export"
    (export / "hf").mkdir(parents=True)
    meta = {
        "model": SHAPE,
        "checkpoint": str(run.checkpoint(step).path),
        "step": step,
        "tokenizer_hash": "ab" * 32,
        "tokenizer": {
            "kind": "REMI",
            "base_vocab_size": 518,
            "learned_vocab_size": None,
            "labels": {"collection=bach": 527},
        },
        "hf_architecture": "GPTNeoXForCausalLM",
        "card": card_facts(run.checkpoint(step), step),
    }
    (export / "config.json").write_text(json.dumps(meta))
    return export


def test_the_card_names_data_tokenizer_training_shape_and_command(tmp_path):
    run, data = _run(tmp_path)
    export = _export(tmp_path, run, step=10)
    text = write_card(export).read_text()
    digest = hashlib.sha256((data / "dataset.json").read_bytes()).hexdigest()
    assert f"`{digest}`" in text and str(data) in text and "music21:all" in text
    assert "train split: 67 pieces, 12345 tokens" in text
    assert "tokens trained: 20480" in text  # at the exported step, not the run's last
    assert "ab" * 32 in text and "REMI, base vocabulary 518" in text
    assert "| n_layer | 3 |" in text and "GPTNeoXForCausalLM" in text
    assert f"`python -m mtrain.train data.path={data} model=mini trainer.max_steps=20`" in text
    assert "not measured yet" in text


def test_an_evaluation_of_the_test_split_puts_its_bits_per_note_on_the_card(tmp_path):
    run, data = _run(tmp_path)
    export = _export(tmp_path, run, step=20)
    write_card(export)
    row = {
        "pieces": 9,
        "notes": 900,
        "bits_per_note": 4.9031,
        "bits_per_second": 31.5,
        "perplexity": 2.1,
    }
    collections = {"bach": row, "essenFolksong": {**row, "bits_per_note": 3.2}}
    record_evaluation(export, str(data), "test", {**row, "by_collection": collections})
    text = (export / "hf" / "README.md").read_text()
    assert "**4.903 bits per note**" in text and "not measured yet" not in text
    assert "| essenFolksong | 9 | 3.200 | 31.50 |" in text
    assert "tokens trained: 40960" in text
    # Another dataset's evaluation is added below, not in place of, the training data's.
    other = tmp_path / "other_corpus"
    record_evaluation(export, str(other), "test", {**row, "bits_per_note": 6.5})
    text = (export / "hf" / "README.md").read_text()
    assert text.index("**4.903 bits per note**") < text.index("**6.500 bits per note**")
    assert f"`{other}`" in text


def test_a_dataset_gone_since_training_is_said_unknown(tmp_path):
    run, data = _run(tmp_path)
    (data / "dataset.json").unlink()
    text = write_card(_export(tmp_path, run, step=10)).read_text()
    assert "dataset card SHA-256: unknown" in text
