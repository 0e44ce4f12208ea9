"""Bar controls through the apps: a tiny model trained a few steps with
``data.attribute_controls``, exported, then ``generate controls=...`` places the asked control
tokens before the asked bars and decodes them away; bad requests are one line each."""

import json
import os

import numpy as np
import pytest
from support import midi_factory
from support.apps import prepare_train_export, run_module

from data_pipeline.app import EXIT_INPUT
from mtrain.exported.loading import load_for_inference
from mtrain.generation.compose import compose
from mtrain.generation.controls import ControlPlan
from mtrain.generation.sampling import SamplingConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
ASKED = "1:note_density=16,1:polyphony_max=3,2:note_density=8"


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    midi_factory.write_corpus(root / "midi", 16)
    prepare_train_export(
        root,
        0.1,
        0.1,
        8,
        "data.attribute_controls.attributes=[note_density,polyphony_max]",
        "data.attribute_controls.piece_rate=1",
        "optim.warmup_steps=2",
    )
    return root


def generate(model, out, *overrides, check=True):
    return run_module(
        "mtrain.generate",
        f"checkpoint={model}",
        f"output={out}",
        f"hydra.run.dir={out}/hydra",
        "num_samples=2",
        "batch_size=2",
        "sampling.max_new_tokens=600",
        "render.audio=false",
        *overrides,
        env=ENV,
        check=check,
    )


def test_controls_train_export_and_steer_generation(controlled, tmp_path):
    export = controlled / "export"
    model, _, tok, _ = load_for_inference(str(export), "cpu")
    # The run's vocabulary is the dataset's with the controls appended: the same ids before.
    data = json.loads((controlled / "ds" / "tokenizer" / "artifact.json").read_text())
    assert tok.vocab_size == data["vocab_size"] + 19 + 6
    assert tok.lineage["parent"] == data["hash"]

    generate(export, tmp_path, f"controls='{ASKED}'", "max_bars=3")
    for row in json.loads((tmp_path / "samples.json").read_text())["samples"]:
        assert row["controls_asked"] == 3 and 0 <= row["controls_met"] <= 3
        assert row["repairs"] == 0 and row["notes"] > 0

    # The tokens themselves: the asked ids right before the asked bars, nowhere else (a model
    # this briefly trained writes long bars: a sample may stop within bar 1 or 2).
    index = tok.control_index
    expected = {
        0: [index["ACBarNoteDensity_16"], index["ACBarOnsetPolyphonyMax_3"]],
        1: [index["ACBarNoteDensity_8"]],
    }
    sampling = SamplingConfig(max_new_tokens=600, min_p=0.05)
    plan = ControlPlan.of(tok, ASKED)
    for piece in compose(model, tok, [tok.bos_id], 2, sampling, 2, max_bars=3, controls=plan):
        ids = np.array(piece.ids)
        bars = np.flatnonzero(ids == tok.bar_id)
        placed = np.flatnonzero(np.isin(ids, list(index.values())))
        assert len(bars) >= 1
        wanted = []
        for bar, at in enumerate(bars[:2]):
            asked = expected[bar]
            assert ids[at - len(asked) : at].tolist() == asked
            wanted += range(at - len(asked), at)
        assert placed.tolist() == wanted
        assert np.array_equal(tok.decode_base(ids), tok.decode_base(np.delete(ids, placed)))


@pytest.mark.parametrize(
    ("controls", "says"),
    [
        ("2:pitch_range=4", "not trained to control pitch_range; it controls note_density"),
        ("2:note_density=40", "note_density=40 is not a value of note_density; valid: 0, 1,"),
        ("two:note_density=4", "is not BARS:ATTRIBUTE=VALUE"),
    ],
)
def test_bad_controls_are_one_line(controlled, tmp_path, controls, says):
    proc = generate(controlled / "export", tmp_path, f"controls='{controls}'", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_INPUT and len(lines) == 1 and says in lines[0], lines
