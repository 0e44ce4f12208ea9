"""An export records the infilling rate its model was trained with, so that filling bars is
refused, or allowed, from the export alone; exports from before the record still fill."""

import json
import shutil

from support.apps import run_module
from support.midi_factory import piece


def test_an_export_alone_says_whether_its_model_learned_to_fill_bars(tiny_model, tmp_path):
    moved = tmp_path / "export"
    shutil.copytree(tiny_model["export"], moved)
    config = json.loads((moved / "config.json").read_text())
    assert config["data"] == {"infill_rate": 0.0}  # the tiny model trains on plain pieces
    # Away from its run: nothing left to read but the export.
    config["checkpoint"] = str(tmp_path / "gone" / "checkpoints" / "step_00000200")
    (moved / "config.json").write_text(json.dumps(config))
    prompt = tmp_path / "prompt.mid"
    piece(1, bars=8, drums=False).dump_midi(str(prompt))  # one bar fits the context
    fill = [f"checkpoint={moved}", f"prompt={prompt}", "infill=bars:3", "num_samples=1"]
    refused = run_module("mtrain.generate", *fill, f"output={tmp_path / 'no'}", check=False)
    assert refused.returncode == 2
    said = refused.stdout + refused.stderr
    assert "infill=bars:3: the model was trained with data.infill_rate=0" in said

    del config["data"]  # as exported before the rate was recorded
    (moved / "config.json").write_text(json.dumps(config))
    out = tmp_path / "filled"
    filled = run_module("mtrain.generate", *fill, f"output={out}", "sampling.max_new_tokens=16")
    assert "the export records no data.infill_rate" in filled.stdout + filled.stderr
    assert (out / "sample-000.mid").exists()
