"""``python -m mtrain.generate`` on a tiny trained model: every mode writes valid MIDI, piano
rolls and (with a SoundFont) audio; labels steer the style; a continuation keeps its prompt;
max_bars stops sampling; a piece may be longer than the context; bad requests fail with a
message that names the key."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import symusic
from support.apps import run_module

from data_pipeline.midi_file import read_score
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.music_metrics import compute_all
from mtrain.exported.loading import load_for_inference
from mtrain.generation.compose import DEFAULT_MIN_P
from mtrain.generation.decoding import Stop, decode
from mtrain.generation.prompts import banned_for
from mtrain.generation.render import find_soundfont
from mtrain.generation.repair import to_midi
from mtrain.generation.sampling import SamplingConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
DUO_PROGRAMS = {73, 42}


def generate(model_dir: Path, output: Path, *overrides: str, check: bool = True):
    return run_module(
        "mtrain.generate",
        f"checkpoint={model_dir}",
        f"output={output}",
        "sampling.max_new_tokens=120",
        *overrides,
        env=ENV,
        check=check,
    )


def samples(output: Path) -> list[dict]:
    return json.loads((output / "samples.json").read_text())["samples"]


def programs(output: Path) -> Counter:
    notes = Counter()
    for midi in sorted(output.glob("sample-*.mid")):
        for track in symusic.Score(str(midi)).tracks:
            notes["drums" if track.is_drum else track.program] += track.note_num()
    return notes


@pytest.fixture(scope="module")
def unconditional(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unconditional")
    generate(tiny_model["export"], out, "num_samples=3", "batch_size=2", "logger.mode=offline")
    return out


def test_unconditional_samples_are_valid_midi_with_piano_rolls(unconditional):
    rows = samples(unconditional)
    assert [r["sample"] for r in rows] == ["sample-000", "sample-001", "sample-002"]
    for row in rows:
        midi = unconditional / f"{row['sample']}.mid"
        score = read_score(midi.read_bytes())  # the strict reader: whole chunks, parseable
        assert score.note_num() == row["notes"] > 0
        assert (unconditional / f"{row['sample']}.png").read_bytes()[:4] == b"\x89PNG"
        assert 0 < row["new_tokens"] <= 120
        # The reported metrics are those of the file written, not of some other score.
        assert row["pitch_class_entropy"] == pytest.approx(
            compute_all(score)["pitch_class_entropy"]
        )


@pytest.mark.skipif(find_soundfont() is None, reason="no GM SoundFont (fluid-soundfont-gm)")
def test_audio_is_rendered_with_the_soundfont(unconditional):
    for wav in sorted(unconditional.glob("sample-*.wav")):
        data = wav.read_bytes()
        assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) > 10_000
    assert len(list(unconditional.glob("sample-*.wav"))) == 3


def test_samples_are_logged_to_wandb_with_images(unconditional):
    runs = list((unconditional / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].glob("files/media/images/**/*.png"))
    assert len(images) == 3


def test_a_label_steers_the_style(tiny_model, tmp_path):
    """The duo collection is flute and cello without drums: asking for it gives a larger
    share of those instruments than asking for the band."""
    shares = {}
    for style in ("duo", "band"):
        generate(
            tiny_model["export"], tmp_path / style, "num_samples=6", f"label=collection:{style}"
        )
        notes = programs(tmp_path / style)
        shares[style] = sum(notes[p] for p in DUO_PROGRAMS) / sum(notes.values())
    assert shares["duo"] > shares["band"] + 0.2, shares


def test_a_continuation_keeps_its_prompt_and_goes_on(tiny_model, tmp_path):
    prompt = sorted((tiny_model["dataset"].parent / "midi" / "duo").glob("*.mid"))[0]
    out = tmp_path / "continued"
    generate(tiny_model["export"], out, "num_samples=2", f"prompt={prompt}", "prompt_bars=2")
    original = symusic.Score(str(prompt))
    bar_2 = 8 * original.ticks_per_quarter  # 4/4
    head = {(n.time, n.pitch) for t in original.tracks for n in t.notes if n.time < bar_2}
    for midi in sorted(out.glob("sample-*.mid")):
        score = symusic.Score(str(midi))
        scale = original.ticks_per_quarter / score.ticks_per_quarter
        notes = [(round(n.time * scale), n.pitch) for t in score.tracks for n in t.notes]
        assert {n for n in notes if n[0] < bar_2} == head
        assert any(n[0] >= bar_2 for n in notes), "nothing generated after the prompt"
    assert json.loads((out / "samples.json").read_text())["mode"] == "continuation"


def test_a_run_directory_is_exported_once_and_reused(tiny_model, tmp_path):
    shutil.rmtree(tiny_model["run"] / "export", ignore_errors=True)
    procs = [generate(tiny_model["run"], tmp_path / a, "num_samples=1") for a in "ab"]
    logs = [proc.stdout + proc.stderr for proc in procs]
    assert ["exported" in log for log in logs] == [True, False]
    assert (tiny_model["run"] / "export" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("label=composer:bach", "this tokenizer knows: collection=band, collection=duo"),
        ("label=bach", "write each label as kind:value"),
        ("prompt=PROMPT", "is not a readable MIDI file"),
        ("checkpoint=/nonexistent/run", "checkpoint=/nonexistent/run"),
        ("sampling.top_p=0", "sampling.top_p=0.0 must be in (0, 1]"),
    ],
)
def test_bad_requests_fail_with_the_key_named(tiny_model, tmp_path, override, message):
    truncated = tmp_path / "truncated.mid"
    good = sorted((tiny_model["dataset"].parent / "midi" / "band").glob("*.mid"))[0]
    truncated.write_bytes(good.read_bytes()[:200])
    override = override.replace("PROMPT", str(truncated))
    proc = generate(tiny_model["export"], tmp_path / "out", override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stdout + proc.stderr


def test_a_head_with_some_labels_lets_the_model_name_the_other_kinds(tiny_model):
    tok = MusicTokenizer.load(str(tiny_model["export"] / "tokenizer"))
    labels = list(range(tok.label_offset, tok.vocab_size))  # collection=band, collection=duo
    specials = [tok.pad_id, tok.bos_id, 3, *tok.infill_ids]
    assert banned_for(tok, [tok.bos_id]) == specials
    assert banned_for(tok, [tok.bos_id, labels[1]]) == specials + labels
    music = tok.encode_base(np.array([4, 5])).tolist()
    assert banned_for(tok, [tok.bos_id, *music]) == specials + labels


def test_a_checkpoint_directory_generates_pieces_cut_to_max_bars(tiny_model, tmp_path):
    """A DeepSpeed checkpoint directory works as checkpoint= directly, and max_bars=2 stops
    sampling at the third bar line, long before max_new_tokens, and cuts every piece (4/4
    here) before its third bar."""
    (step,) = (tiny_model["run"] / "checkpoints").glob("step_*")
    out = tmp_path / "cut"
    generate(step, out, "num_samples=3", "max_bars=2", "sampling.max_new_tokens=1000")
    assert (step / "export" / "model.safetensors").exists()
    rows = samples(out)
    # A piece may also end at EOS within two bars; none runs on to max_new_tokens.
    assert {row["stopped_by"] for row in rows} <= {"max_bars", "stop_token"}
    assert "max_bars" in {row["stopped_by"] for row in rows}
    assert all(row["new_tokens"] < 1000 and row["bars"] <= 2 for row in rows)
    for midi in sorted(out.glob("sample-*.mid")):
        score = symusic.Score(str(midi))
        assert score.note_num() > 0
        assert max(n.time for t in score.tracks for n in t.notes) < 8 * score.ticks_per_quarter


def test_a_piece_four_times_the_context_is_valid_midi(tiny_model, tmp_path):
    """The window slides three times over: 4 x 128 tokens decode to a valid MIDI file whose
    music goes on after the first window's, not a piece that stops where the context does."""
    model, _, tok, _ = load_for_inference(str(tiny_model["export"]), "cpu")
    context, prompt = model.config.max_seq_len, [tok.bos_id]
    cfg = SamplingConfig(min_p=DEFAULT_MIN_P, max_new_tokens=4 * context)
    banned = [tok.eos_id, *banned_for(tok, prompt)]
    (row,) = decode(model, [prompt], cfg, tok.eos_id, banned_ids=banned)
    assert len(row.tokens) == 4 * context and row.stop == Stop.max_new_tokens
    score, _ = to_midi(tok, prompt + row.tokens)
    score.dump_midi(str(tmp_path / "long.mid"))
    long = read_score((tmp_path / "long.mid").read_bytes())  # the strict reader
    first, _ = to_midi(tok, prompt + row.tokens[:context])
    assert long.note_num() > 3 * first.note_num() > 0
    assert long.end() > 2 * first.end()
