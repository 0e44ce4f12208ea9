"""A generation job, what ``python -m mtrain.generate`` runs.

Four modes, from what is given: unconditional (neither), conditioned on label tokens
(``label=<kind>:<value>``, as the dataset card lists them), continuation of the first bars
or seconds of a prompt MIDI file (with or without labels), and infilling of a prompt's bars
(``infill=bars:9-12``, ``mtrain.generation.infill``). Sampling follows the token grammar
(``sampling.grammar``); every sample is written as a valid ``.mid`` (anything the decoder
would still refuse is repaired, and counted), a piano-roll ``.png`` with what the model wrote
shaded and, where a General MIDI SoundFont is installed, a ``.wav``; ``samples.json`` holds
each sample's tokens, repairs and musical metrics.
"""

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import symusic

from data_pipeline.app import config_dict
from data_pipeline.errors import require
from mtrain.data.fill_in_middle import check_infillable
from mtrain.exported.loading import load_for_inference
from mtrain.generation.compose import DEFAULT_MIN_P, compose
from mtrain.generation.controls import ControlPlan, outcomes, parse_controls
from mtrain.generation.infill import (
    BAR_RANGE_FORMAT,
    BarRange,
    InfillRequest,
    gap_ticks,
    infill,
    infill_request,
)
from mtrain.generation.prompts import (
    build_prompt,
    parse_labels,
    prompt_from_midi,
    read_prompt,
    tick_at_bar,
    tick_at_second,
    validate_labels,
)
from mtrain.generation.render import RenderConfig, Renderer, wandb_media
from mtrain.generation.sampling import SamplingConfig
from mtrain.runs.tracking import LoggerConfig, WandbMode, log_report, table

log = logging.getLogger(__name__)
# Bars of a prompt MIDI file continued when neither prompt_bars nor prompt_seconds is given.
PROMPT_BARS = 4


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
    # Bars of the prompt to regenerate from the bars around them, bars:FIRST-LAST counted from
    # 1 (e.g. bars:9-12), for a model trained with data.infill_rate > 0; every note starting
    # outside them is kept as it is in the prompt.
    infill: str | None = None
    # Let a filled gap be silent; by default each filling holds a note (the grammar asks it).
    infill_rests: bool = False
    # Bar controls for a model trained with data.attribute_controls: the values MidiTok's bar
    # attributes must take in the asked bars, e.g. "5-8:note_density=16,9-12:note_density=8"
    # (quoted on the command line: 'controls="..."'); each asked control token is placed
    # before its bar by the sampling grammar.
    controls: str | None = None
    # Hold the asked values at sampling time (MIDI-GPT's constraint): a note, an onset or a
    # duration that would break one is masked, and so is ending an asked bar before it holds
    # what was asked. false leaves meeting them to the model, which reads the controls.
    hold_controls: bool = True
    # Length limits on each whole piece (prompt included) besides sampling.max_new_tokens.
    max_bars: int | None = None
    max_seconds: float | None = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(min_p=DEFAULT_MIN_P))
    render: RenderConfig = field(default_factory=RenderConfig)
    device: str = "auto"
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=WandbMode.disabled))

    def __post_init__(self):
        positive = "must be at least 1"
        require(
            self,
            "",
            [
                (self.num_samples >= 1, "num_samples", positive),
                (self.batch_size >= 1, "batch_size", positive),
                (self.prompt_bars is None or self.prompt_bars >= 1, "prompt_bars", positive),
                (
                    self.prompt_seconds is None or self.prompt_seconds > 0,
                    "prompt_seconds",
                    "must be > 0",
                ),
                (
                    self.prompt_bars is None or self.prompt_seconds is None,
                    "prompt_bars",
                    "and prompt_seconds both set: give the prompt's length in one of them",
                ),
                (self.max_bars is None or self.max_bars >= 1, "max_bars", positive),
                (self.max_seconds is None or self.max_seconds > 0, "max_seconds", "must be > 0"),
                (
                    self.infill is None or BarRange.parse(self.infill) is not None,
                    "infill",
                    f"must be {BAR_RANGE_FORMAT}",
                ),
                (
                    self.infill is None or self.prompt is not None,
                    "infill",
                    "needs prompt=<file.mid>: the piece whose bars are regenerated",
                ),
                (
                    self.controls is None or self.infill is None,
                    "controls",
                    "steer composed bars, not filled ones: drop infill= or controls=",
                ),
                (
                    self.controls is None or self.sampling.grammar,
                    "controls",
                    "are placed by the sampling grammar: drop sampling.grammar=false",
                ),
                (
                    self.infill is None or (self.prompt_bars, self.prompt_seconds) == (None, None),
                    "infill",
                    "reads the whole prompt: drop prompt_bars and prompt_seconds",
                ),
            ],
        )


def length_limits(cfg: GenerateConfig) -> str:
    """Where a sample ends, in words: 'at EOS, 512 new tokens or 8 bars'."""
    limits = [f"{cfg.sampling.max_new_tokens} new tokens"]
    if cfg.max_bars is not None:
        limits.append(f"{cfg.max_bars} bars")
    if cfg.max_seconds is not None:
        limits.append(f"{cfg.max_seconds:g} s")
    return "at EOS, " + " or ".join(limits)


def mode_of(cfg: GenerateConfig) -> str:
    if cfg.infill:
        return "infill"
    if cfg.prompt:
        return "continuation"
    return "label" if cfg.label else "unconditional"


def markdown(rows: list[dict]) -> str:
    columns = ["sample", "new_tokens", "stopped_by", "repairs", "notes", "bars", "seconds"]
    columns += ["pitch_range"]
    columns += ["pitch_class_entropy", "scale_consistency", "polyphony", "note_density"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [row[c] if isinstance(row[c], int | str) else f"{row[c]:.3g}" for c in columns]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def generated_region(
    cfg: GenerateConfig, score: symusic.Score, tokenizer, request: InfillRequest | None
) -> tuple[int, int] | None:
    """[start, end) in ticks of what the model wrote in ``score``: the filled bars, or all
    after the prompt's bars or seconds; None when it wrote the whole piece."""
    if request is not None:
        steps = request.steps or [request.gap]
        return gap_ticks(request.score, tokenizer, BarRange(steps[0].first, steps[-1].last))
    if not cfg.prompt:
        return None
    if cfg.prompt_seconds is not None:
        return tick_at_second(score, cfg.prompt_seconds), score.end()
    return tick_at_bar(score, cfg.prompt_bars or PROMPT_BARS), score.end()


def controls_met(cfg: GenerateConfig, piece) -> dict:
    """How many asked bar controls the sample meets, as MidiTok computes them on its bars."""
    if cfg.controls is None:
        return {}
    found = outcomes(piece.score, parse_controls(cfg.controls))
    return {"controls_met": sum(o.met for o in found), "controls_asked": len(found)}


def generate_samples(cfg: GenerateConfig, overrides: list[str] = ()) -> dict:
    model, meta, tokenizer, model_dir = load_for_inference(cfg.checkpoint, cfg.device)
    labels = parse_labels(cfg.label)
    plan = (
        None
        if cfg.controls is None
        else ControlPlan.of(tokenizer, cfg.controls, held=cfg.hold_controls)
    )
    if cfg.infill:
        check_infillable(tokenizer, f"infill={cfg.infill}", meta)
        validate_labels(tokenizer, labels)
        gap = BarRange.parse(cfg.infill)
        request = infill_request(
            tokenizer, read_prompt(cfg.prompt), gap, labels, model.config.max_seq_len, True
        )
        prompt = request.prompt
        first, stop = request.context
        if len(request.steps) > 1:
            log.info(
                "filling %s in %d steps (%s), each reading the bars around it: the gap needs "
                "more tokens than the model's context",
                gap,
                len(request.steps),
                ", ".join(map(str, request.steps)),
            )
        else:
            log.info("filling %s; the model reads bars %d-%d around them", gap, first + 1, stop)
    else:
        prompt_ids = None
        if cfg.prompt:
            bars = (
                cfg.prompt_bars
                if cfg.prompt_seconds is not None
                else (cfg.prompt_bars or PROMPT_BARS)
            )
            prompt_ids = prompt_from_midi(tokenizer, cfg.prompt, bars, cfg.prompt_seconds)
        prompt = build_prompt(tokenizer, labels, prompt_ids)
    log.info(
        "generating %d %s samples from %s (step %d) on %s: prompt of %d tokens; each ends %s; "
        "past the model's %d positions it reads the piece's head and its latest tokens",
        cfg.num_samples,
        mode_of(cfg),
        model_dir,
        meta["step"],
        model.device,
        len(prompt),
        length_limits(cfg),
        model.config.max_seq_len,
    )
    started = time.perf_counter()
    if cfg.infill:
        pieces = infill(
            model,
            tokenizer,
            request,
            cfg.num_samples,
            cfg.sampling,
            cfg.batch_size,
            cfg.infill_rests,
        )
    else:
        pieces = compose(
            model,
            tokenizer,
            prompt,
            cfg.num_samples,
            cfg.sampling,
            cfg.batch_size,
            cfg.max_bars,
            cfg.max_seconds,
            plan,
        )
    elapsed = time.perf_counter() - started
    new_tokens = sum(p.new_tokens for p in pieces)
    log.info(
        "%d tokens in %.1f s: %.0f tokens/s; %d tokens repaired; stopped by %s",
        new_tokens,
        elapsed,
        new_tokens / elapsed,
        sum(p.repairs for p in pieces),
        ", ".join(f"{stop} ({n})" for stop, n in Counter(str(p.stop) for p in pieces).items()),
    )
    out = Path(cfg.output)
    renderer = Renderer(cfg.render)
    rows, files = [], []
    for i, piece in enumerate(pieces):
        name = f"sample-{i:03d}"
        region = generated_region(cfg, piece.score, tokenizer, request if cfg.infill else None)
        title = f"{name} ({mode_of(cfg)})"
        files.append(renderer.write(piece.score, out / name, title, region))
        rows.append({"sample": name, **piece.stats(), **controls_met(cfg, piece)})
    report = {
        "checkpoint": str(model_dir),
        "step": meta["step"],
        "mode": mode_of(cfg),
        "labels": labels,
        "prompt": cfg.prompt,
        "prompt_tokens": len(prompt),
        "tokens_per_s": new_tokens / elapsed,
        "config": config_dict(cfg),
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
    log_report(
        cfg.logger,
        f"generate-{out.name}",
        out,
        report["config"],
        overrides,
        {"tokens_per_s": report["tokens_per_s"], "mode": report["mode"]},
        lambda: {"samples/stats": table(report["samples"]), **wandb_media(files, "samples")},
    )
