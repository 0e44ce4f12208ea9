"""Listening in on a run: every ``trainer.sample_every`` steps rank 0 draws a few short pieces
from the model being trained and logs their musical metrics, MIDI files, piano rolls and audio.

The cost is bounded by ``sample_count`` x ``sample_tokens`` tokens with the KV cache, on a copy
of the weights: under ZeRO-3 every rank takes part in gathering the partitioned parameters once
(a collective), then rank 0 samples alone with a plain model while the others wait at the next
step's collective, instead of gathering each layer again for every generated token.
"""

import json
import logging
import time

import numpy as np
import torch

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.music_metrics import METRICS
from mtrain.evaluation.reports import measure, summarize
from mtrain.generation.compose import DEFAULT_MIN_P, compose
from mtrain.generation.render import RenderConfig, Renderer, wandb_media
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import RunDir
from mtrain.runs.tracking import Tracker
from mtrain.training.config import TrainerConfig

log = logging.getLogger(__name__)


class TrainingSamples:
    """A step component: due every ``sample_every`` steps, at the same steps on every rank."""

    def __init__(
        self,
        cfg: TrainerConfig,
        module: torch.nn.Module,
        tokenizer: MusicTokenizer,
        run: RunDir,
        tracker: Tracker | None,
        is_main: bool,
    ):
        self.cfg, self.module, self.tokenizer = cfg, module, tokenizer
        self.model_cfg: GPTConfig = module.config
        self.run_dir, self.tracker, self.is_main = run, tracker, is_main
        self.copy: GPT | None = None
        self.renderer = Renderer(RenderConfig()) if is_main and cfg.sample_every else None

    def due(self, step: int) -> bool:
        return bool(self.cfg.sample_every) and step % self.cfg.sample_every == 0

    def run(self, step: int, metrics: dict) -> dict:
        """This step's samples' metrics on rank 0 (their media go to wandb now); {} on the
        others. Every rank must call it at the same step."""
        self._copy_weights(self.module)
        if not self.is_main:
            return {}
        started = time.perf_counter()
        sampling = SamplingConfig(
            max_new_tokens=self.cfg.sample_tokens, min_p=DEFAULT_MIN_P, seed=step
        )
        count = self.cfg.sample_count
        pieces = compose(self.copy, self.tokenizer, [self.tokenizer.bos_id], count, sampling, count)
        folder = self.run_dir.samples_at(step)
        files = [
            self.renderer.write(piece.score, folder / f"sample-{i}")
            for i, piece in enumerate(pieces)
        ]
        stats = [piece.stats() for piece in pieces]
        rows = [{"ids": piece.ids, **row} for piece, row in zip(pieces, stats, strict=True)]
        (folder / "samples.json").write_text(json.dumps(rows))
        found = {
            f"samples/{key}": float(np.mean([s[key] for s in stats]))
            for key, value in stats[0].items()
            if isinstance(value, int | float) and key not in METRICS  # not what stopped it
        }
        # The musical metrics and the empty rate as an evaluation counts them.
        measured = measure({f"sample-{i}": piece.score for i, piece in enumerate(pieces)}, folder)
        found |= {f"samples/{key}": row["mean"] for key, row in summarize(measured).items()}
        found["samples/empty_rate"] = measured.empty_rate
        found["samples/seconds_spent"] = time.perf_counter() - started
        log.info(
            "step %d: %d samples in %s (%.1f s; %.0f notes, %.1f repairs on average)",
            step,
            count,
            folder,
            found["samples/seconds_spent"],
            found["samples/notes"],
            found["samples/repairs"],
        )
        media = wandb_media(files, "samples")
        if self.tracker is not None and media:
            self.tracker.log(media, step)
        return found

    def _copy_weights(self, module: torch.nn.Module) -> None:
        import deepspeed

        params = list(module.parameters())
        partitioned = any(hasattr(p, "ds_id") for p in params)
        with deepspeed.zero.GatheredParameters(params, enabled=partitioned):
            if not self.is_main:
                return
            if self.copy is None:
                # On the meta device first: building it must not draw from the training RNG.
                with torch.device("meta"):
                    self.copy = GPT(self.model_cfg)
                self.copy.to_empty(device=params[0].device).to(params[0].dtype).eval()
                if self.model_cfg.tie_embeddings:
                    self.copy.lm_head.weight = self.copy.wte.weight
            mine = dict(self.copy.named_parameters())
            with torch.no_grad():
                for name, param in module.named_parameters():
                    mine[name].copy_(param.data)
