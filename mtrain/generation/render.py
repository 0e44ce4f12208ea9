"""Scores made audible and visible: a piano-roll PNG, a WAV through symusic's synthesizer and a
General MIDI SoundFont, and the plain MIDI file beside them."""

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic
from miditok.constants import MIDI_INSTRUMENTS

from data_pipeline.midi_file import barline_ticks

log = logging.getLogger(__name__)
# Where Debian's fluid-soundfont-gm (and musescore-general-soundfont) put a GM SoundFont.
SYSTEM_SOUNDFONTS = (
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
)
# Drum tracks are drawn in grey.
DRUM_COLOR = "0.45"
# The generated part of a piece (a filled gap, a continuation) is shaded in this colour.
GENERATED_COLOR = "#ffe08a"
# Bar numbers are written above the roll up to this many bars (beyond, lines alone).
NUMBERED_BARS = 48


@dataclass
class RenderConfig:
    """What besides the .mid is written per piece (the ``render`` keys of generate)."""

    piano_roll: bool = True
    # Render audio when a SoundFont is found; "" searches MTRAIN_SOUNDFONT and the system.
    audio: bool = True
    soundfont: str = ""
    sample_rate: int = 22050
    # Seconds one piece's audio may take (a few seconds for minutes of music): past it the piece
    # keeps its MIDI and piano roll and has no WAV, with a warning.
    audio_timeout_s: float = 120.0

    def __post_init__(self):
        if self.audio_timeout_s <= 0:
            raise ValueError(f"render.audio_timeout_s={self.audio_timeout_s} must be above 0")


# symusic's synthesizer can loop forever on a note (FluidR3's celesta at pitch 108 never
# returns) and an untrained model writes such notes: each piece renders in a child process with
# a time limit, so a hang costs one WAV and not the run. The child imports symusic alone and
# loads the SoundFont in milliseconds.
_SYNTHESIZE = """
import sys, symusic
soundfont, rate, midi, wav = sys.argv[1:]
audio = symusic.Synthesizer(soundfont, int(rate)).render(symusic.Score(midi), stereo=True)
symusic.dump_wav(wav, audio, int(rate), use_int16=True)
"""


def find_soundfont(path: str = "") -> Path | None:
    """The SoundFont to render with: ``path`` if given (it must exist), else $MTRAIN_SOUNDFONT,
    else the first system one found; None when there is none."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"render.soundfont={path} does not exist: give a .sf2/.sf3 file, or leave it "
                "empty to use the system's (Debian: apt-get install fluid-soundfont-gm)"
            )
        return Path(path)
    candidates = [os.environ.get("MTRAIN_SOUNDFONT", ""), *SYSTEM_SOUNDFONTS]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


class Renderer:
    """Writes ``<stem>.mid``, ``<stem>.png`` and ``<stem>.wav`` for each score it is given.
    The synthesizer loads its SoundFont once; without one, audio is skipped with one notice."""

    def __init__(self, cfg: RenderConfig):
        self.cfg = cfg
        self.soundfont: Path | None = None
        if cfg.audio:
            soundfont = find_soundfont(cfg.soundfont)
            if soundfont is None:
                log.warning(
                    "no SoundFont found (%s, $MTRAIN_SOUNDFONT, render.soundfont=): no WAV "
                    "files; on Debian: apt-get install fluid-soundfont-gm",
                    SYSTEM_SOUNDFONTS[0],
                )
            else:
                self.soundfont = soundfont
                log.info("rendering audio with %s at %d Hz", soundfont, cfg.sample_rate)

    def write(
        self,
        score: symusic.Score,
        stem: Path,
        title: str = "",
        generated: tuple[int, int] | None = None,
    ) -> dict[str, Path]:
        """The files of ``score``; ``generated`` ([start, end) in ticks) is shaded in the
        piano roll as what the model wrote (None: all of it, or nothing to tell apart)."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = {"midi": stem.with_suffix(".mid")}
        score.dump_midi(str(paths["midi"]))
        if self.cfg.piano_roll:
            paths["piano_roll"] = stem.with_suffix(".png")
            piano_roll_png(score, paths["piano_roll"], title or stem.name, generated)
        if self.soundfont is not None and score.note_num() > 0:
            wav = stem.with_suffix(".wav")
            if self._synthesize(paths["midi"], wav):
                paths["audio"] = wav
        return paths

    def _synthesize(self, midi: Path, wav: Path) -> bool:
        """Renders ``midi`` to ``wav``; False (and a warning) when the synthesizer fails or
        runs past ``audio_timeout_s``."""
        args = [str(self.soundfont), str(self.cfg.sample_rate), str(midi), str(wav)]
        try:
            subprocess.run(
                [sys.executable, "-c", _SYNTHESIZE, *args],
                check=True,
                capture_output=True,
                timeout=self.cfg.audio_timeout_s,
            )
            return True
        except subprocess.TimeoutExpired:
            why = f"the synthesizer ran past render.audio_timeout_s={self.cfg.audio_timeout_s:g} s"
        except subprocess.CalledProcessError as exc:
            why = f"the synthesizer failed: {exc.stderr.decode(errors='replace').strip()[-300:]}"
        wav.unlink(missing_ok=True)
        log.warning("no audio for %s: %s; its MIDI and piano roll are written", midi.name, why)
        return False


def track_name(track: symusic.Track) -> str:
    """A track as a musician names it: its own name, else its General MIDI instrument."""
    instrument = "drums" if track.is_drum else MIDI_INSTRUMENTS[track.program]["name"]
    name = track.name.strip()
    return f"{name} ({instrument})" if name and name.lower() != instrument.lower() else instrument


def seconds_at(score: symusic.Score, ticks: list[int]) -> list[float]:
    """Seconds at each of ``ticks`` (ascending) of ``score``, through its tempo changes."""
    tempos = sorted(score.tempos, key=lambda t: t.time)
    out, tick, elapsed, mspq, index = [], 0, 0.0, 500_000, 0
    for target in ticks:
        while index < len(tempos) and tempos[index].time <= target:
            elapsed += (tempos[index].time - tick) * mspq / 1e6 / score.ticks_per_quarter
            tick, mspq = tempos[index].time, tempos[index].mspq
            index += 1
        out.append(elapsed + (target - tick) * mspq / 1e6 / score.ticks_per_quarter)
    return out


def piano_roll_png(
    score: symusic.Score, path: Path, title: str, generated: tuple[int, int] | None = None
) -> None:
    """Notes as bars over time in seconds, one colour per track named in the legend, drums in
    faint grey; bar lines (numbered) and the generated region shaded."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    seconds = score.to("second")
    end = max(seconds.end(), 1.0)
    fig, ax = plt.subplots(figsize=(12, 4), dpi=100)
    colors = plt.get_cmap("tab10")
    if generated is not None:
        start, stop = seconds_at(score, sorted(generated))
        ax.axvspan(start, min(stop, end), color=GENERATED_COLOR, alpha=0.6, zorder=0)
        ax.plot([], [], color=GENERATED_COLOR, linewidth=6, label="generated")
    lines = []
    for tick in barline_ticks(score):
        if tick > score.end():
            break
        lines.append(tick)
    for number, second in enumerate(seconds_at(score, lines), start=1):
        ax.axvline(second, color="0.8", linewidth=0.6, zorder=0.5)
        if len(lines) <= NUMBERED_BARS:
            ax.annotate(
                str(number),
                (second, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -10),
                textcoords="offset points",
                fontsize="x-small",
                color="0.4",
            )
    for i, track in enumerate(seconds.tracks):
        notes = track.notes.numpy()
        if len(notes["time"]) == 0:
            continue
        rows = notes["pitch"].astype(np.int64)
        bars = np.stack([notes["time"], np.maximum(notes["duration"], 0.02)], axis=1)
        color = DRUM_COLOR if track.is_drum else colors(i % 10)
        # A drum's pitch names a kit piece, not a height: faint, under the pitched notes.
        alpha = 0.35 if track.is_drum else 1.0
        for row in np.unique(rows):
            ax.broken_barh(bars[rows == row], (row - 0.4, 0.8), color=color, alpha=alpha)
        ax.plot([], [], color=color, linewidth=6, label=track_name(track))
    ax.set_xlabel("seconds (bars numbered above)")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(title)
    ax.set_xlim(0, end)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def wandb_media(files: list[dict[str, Path]], prefix: str) -> dict:
    """wandb images and audio of written pieces (``Renderer.write``'s dicts), captioned with
    their file names: ``<prefix>/piano_roll`` and ``<prefix>/audio``."""
    import wandb

    found = {}
    for key, kind in (("piano_roll", wandb.Image), ("audio", wandb.Audio)):
        paths = [Path(f[key]) for f in files if key in f]
        if paths:
            found[f"{prefix}/{key}"] = [kind(str(p), caption=p.stem) for p in paths]
    return found
