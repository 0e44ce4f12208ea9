"""New music from a trained model: ``python -m mtrain.generate checkpoint=<export or run dir>
output=<dir> [num_samples=4] [label=collection:bach] [prompt=<file.mid> prompt_bars=4]``.

Three modes, from what is given: unconditional (neither), conditioned on label tokens
(``label=<kind>:<value>``, as the dataset card lists them), and continuation of the first bars
or seconds of a prompt MIDI file (with or without labels). Every sample is written as a valid
``.mid`` (token orders the decoder would refuse are repaired, and counted), a piano-roll
``.png`` and, where a General MIDI SoundFont is installed, a ``.wav``; ``samples.json`` holds
each sample's tokens, repairs and musical metrics.
"""

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import symusic
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.config import LoggerConfig, WandbMode
from mtrain.export import load_for_inference
from mtrain.generation import (
    build_prompt,
    clip_score,
    continuation_banned_ids,
    generate,
    prompt_from_midi,
    specials_but_eos,
    to_midi,
)
from mtrain.model import GPT
from mtrain.music_metrics import compute_all
from mtrain.render import RenderConfig, Renderer, wandb_media
from mtrain.sampling import SamplingConfig
from mtrain.tracking import Tracker

log = logging.getLogger(__name__)
# The apps' default min-p: the long tail of a small model's distribution (15% of the mass on
# 500 unlikely tokens after 600 steps of `tiny`) derails the token grammar within a few draws;
# cutting what is under 5% of the top token keeps every piece musical, 0 turns it off.
DEFAULT_MIN_P = 0.05


@dataclass
class GenerateConfig:
    # An exported model directory, a run directory or a checkpoint directory (exported first).
    checkpoint: str = "???"
    output: str = "???"
    num_samples: int = 4
    # Samples drawn together in one batch (one forward pass per token for all of them).
    batch_size: int = 4
    # Conditioning labels as kind:value, several joined by '+': label=collection:bach.
    label: str | None = None
    # A MIDI file (path or URL) to continue: its first prompt_bars bars, or prompt_seconds.
    prompt: str | None = None
    prompt_bars: int | None = None
    prompt_seconds: float | None = None
    # Length limits on each whole piece (prompt included) besides sampling.max_new_tokens.
    max_bars: int | None = None
    max_seconds: float | None = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(min_p=DEFAULT_MIN_P))
    render: RenderConfig = field(default_factory=RenderConfig)
    device: str = "auto"
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=WandbMode.disabled))


@dataclass
class Piece:
    """One generated piece: the model ids (prompt included) and what they decode to."""

    ids: list[int]
    prompt_tokens: int
    score: symusic.Score
    repairs: int
    stopped: bool  # drew EOS before any length limit

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prompt_tokens

    def stats(self) -> dict:
        return {
            "tokens": len(self.ids),
            "new_tokens": self.new_tokens,
            "repairs": self.repairs,
            "ended_with_eos": self.stopped,
            "notes": self.score.note_num(),
            "seconds": round(float(self.score.to("second").end()), 3),
            **compute_all(self.score),
        }


def compose(
    model: GPT,
    tokenizer: MusicTokenizer,
    prompt: list[int],
    count: int,
    sampling: SamplingConfig,
    batch_size: int = 4,
    max_bars: int | None = None,
    max_seconds: float | None = None,
) -> list[Piece]:
    """``count`` pieces continuing ``prompt`` (model ids starting with BOS), drawn
    ``batch_size`` at a time; batch b draws with seed ``sampling.seed + b`` so that any batch
    size gives reproducible music."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"num_samples={count} and batch_size={batch_size} must be >= 1")
    banned = banned_for(tokenizer, prompt)
    pieces = []
    for batch, start in enumerate(range(0, count, batch_size)):
        rows = min(batch_size, count - start)
        seeded = dataclasses.replace(sampling, seed=sampling.seed + batch)
        for new in generate(model, [prompt] * rows, seeded, tokenizer.eos_id, banned_ids=banned):
            ids = prompt + new
            score, repairs = to_midi(tokenizer, ids)
            stopped = bool(new) and new[-1] == tokenizer.eos_id
            pieces.append(
                Piece(ids, len(prompt), clip_score(score, max_bars, max_seconds), repairs, stopped)
            )
    return pieces


def banned_for(tokenizer: MusicTokenizer, prompt: list[int]) -> list[int]:
    """Ids a continuation of ``prompt`` must not draw: PAD, BOS and MASK always; while the
    prompt is still the head of a piece, the labels of the kinds it already names (the model
    completes the others, as training pieces carry all their kinds); once music has started,
    every label."""
    labels = range(tokenizer.label_offset, tokenizer.vocab_size)
    given = [i for i in prompt[1:] if i in labels]
    if len(prompt) > 1 + len(given):  # music in the prompt
        return continuation_banned_ids(tokenizer)

    def kind(label_id: int) -> str:
        return tokenizer.labels[label_id - tokenizer.label_offset].split("=")[0]

    named = {kind(i) for i in given}
    return specials_but_eos(tokenizer) + [i for i in labels if kind(i) in named]


def parse_labels(text: str | None) -> dict[str, str]:
    """'collection:bach+composer:bach' -> {'collection': 'bach', 'composer': 'bach'}; the
    colon because '=' would end a Hydra override's key, '+' because ',' makes a sweep."""
    labels = {}
    for part in filter(None, (text or "").split("+")):
        kind, sep, value = part.replace("=", ":", 1).partition(":")
        if not sep or not kind or not value:
            raise ValueError(f"label={text}: write each label as kind:value, e.g. collection:bach")
        labels[kind.strip()] = value.strip()
    return labels


def mode_of(cfg: GenerateConfig) -> str:
    if cfg.prompt:
        return "continuation"
    return "label" if cfg.label else "unconditional"


def markdown(rows: list[dict]) -> str:
    columns = ["sample", "new_tokens", "repairs", "notes", "seconds", "pitch_range"]
    columns += ["pitch_class_entropy", "scale_consistency", "polyphony", "note_density"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [row[c] if isinstance(row[c], int | str) else f"{row[c]:.3g}" for c in columns]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: GenerateConfig, overrides: list[str] = ()) -> dict:
    model, meta, tokenizer, model_dir = load_for_inference(cfg.checkpoint, cfg.device)
    labels = parse_labels(cfg.label)
    prompt_ids = None
    if cfg.prompt:
        bars = cfg.prompt_bars if cfg.prompt_seconds is not None else (cfg.prompt_bars or 4)
        prompt_ids = prompt_from_midi(tokenizer, cfg.prompt, bars, cfg.prompt_seconds)
    prompt = build_prompt(tokenizer, labels, prompt_ids)
    log.info(
        "generating %d %s samples from %s (step %d) on %s: prompt of %d tokens, up to %d new",
        cfg.num_samples,
        mode_of(cfg),
        model_dir,
        meta["step"],
        model.wte.weight.device,
        len(prompt),
        cfg.sampling.max_new_tokens,
    )
    started = time.perf_counter()
    pieces = compose(
        model,
        tokenizer,
        prompt,
        cfg.num_samples,
        cfg.sampling,
        cfg.batch_size,
        cfg.max_bars,
        cfg.max_seconds,
    )
    elapsed = time.perf_counter() - started
    new_tokens = sum(p.new_tokens for p in pieces)
    log.info(
        "%d tokens in %.1f s: %.0f tokens/s; %d tokens repaired",
        new_tokens,
        elapsed,
        new_tokens / elapsed,
        sum(p.repairs for p in pieces),
    )
    out = Path(cfg.output)
    renderer = Renderer(cfg.render)
    rows, files = [], []
    for i, piece in enumerate(pieces):
        name = f"sample-{i:03d}"
        files.append(renderer.write(piece.score, out / name, f"{name} ({mode_of(cfg)})"))
        rows.append({"sample": name, **piece.stats()})
    report = {
        "checkpoint": str(model_dir),
        "step": meta["step"],
        "mode": mode_of(cfg),
        "labels": labels,
        "prompt": cfg.prompt,
        "prompt_tokens": len(prompt),
        "tokens_per_s": new_tokens / elapsed,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True),
        "samples": rows,
        "files": [{k: str(v) for k, v in f.items()} for f in files],
    }
    (out / "samples.json").write_text(json.dumps(report, indent=2))
    (out / "samples.md").write_text(markdown(rows))
    log_to_wandb(cfg, out, report, files, overrides)
    return report


def log_to_wandb(
    cfg: GenerateConfig, out: Path, report: dict, files: list[dict], overrides
) -> None:
    """The samples' stats as a wandb table, their piano rolls as images and audio as audio."""
    tracker = Tracker(cfg.logger, f"generate-{out.name}", out, report["config"], None, overrides)
    if tracker.run is None:
        return
    import wandb

    rows = report["samples"]
    table = wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
    tracker.run.log({"samples/stats": table, **wandb_media(files, "samples")})
    tracker.run.summary.update({"tokens_per_s": report["tokens_per_s"], "mode": report["mode"]})
    tracker.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(raw) -> None:
    try:
        cfg: GenerateConfig = OmegaConf.to_object(raw)
        report = run(cfg, list(HydraConfig.get().overrides.task))
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(markdown(report["samples"]))
    print(f"{len(report['samples'])} samples in {cfg.output} (.mid, .png, .wav where rendered)")


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)

if __name__ == "__main__":
    main()
