"""Habits of a run on little data: early stopping on the validation loss that keeps the best
checkpoint, and warnings with the numbers when the data is smaller than one batch or the
validation loss rises above its first value."""

import json
import logging

from mtrain.runs.run_dir import RunDir
from mtrain.training.config import TrainerConfig

log = logging.getLogger(__name__)


class StoppedEarly(Exception):
    """Raised at a step boundary once the validation loss stopped improving."""


def warn_if_smaller_than_a_batch(train_tokens: int, train_pieces: int, tokens_per_step: int):
    if train_tokens >= tokens_per_step:
        return
    log.warning(
        "the train split holds %d tokens (%d pieces), less than one optimizer step's %d: every "
        "step repeats the same pieces; lower trainer.global_batch_tokens to about %d, or add "
        "pieces",
        train_tokens,
        train_pieces,
        tokens_per_step,
        train_tokens,
    )


class ValidationWatch:
    """After each validation: a warning when the loss is above the first validation's, and with
    ``trainer.early_stop_patience`` > 0 a checkpoint at each new best (kept from pruning) and a
    stop once that many validations in a row brought none. With early stopping what it tracks
    is in the run directory (``best.json``), so that a resumed run goes on from the same
    record; without, the run directory is as it was and a resumed run warns from its own
    first validation."""

    def __init__(self, cfg: TrainerConfig, checkpointer, run: RunDir, main: bool):
        self.cfg, self.checkpointer, self.run_dir, self.main = cfg, checkpointer, run, main
        self.record = json.loads(run.best.read_text()) if run.best.exists() else {}

    def due(self, step: int) -> bool:
        return bool(self.cfg.eval_every)

    def run(self, step: int, metrics: dict) -> dict:
        loss = metrics.get("val/loss")
        if loss is None:
            return {}
        first = self.record.setdefault("first", {"step": step, "loss": loss})
        if loss > first["loss"]:
            log.warning(
                "validation loss %.4f at step %d is above the first validation's %.4f (step %d): "
                "the model overfits its train pieces (or diverges); %slower optim.lr or "
                "trainer.max_steps, or add pieces",
                loss,
                step,
                first["loss"],
                first["step"],
                "" if self.cfg.early_stop_patience else "set trainer.early_stop_patience, ",
            )
        if self.cfg.early_stop_patience:
            self._early_stop(step, loss)
        return {"val/best_loss": self.record.get("best", first)["loss"]}

    def _early_stop(self, step: int, loss: float) -> None:
        best = self.record.get("best")
        if best is None or loss < best["loss"]:
            if not self.checkpointer.due(step):  # else it saves this step after the report
                self.checkpointer.save(step)
            self.record["best"] = {"step": step, "loss": loss}
            self._write()
            return
        stale = (step - best["step"]) // self.cfg.eval_every
        if stale >= self.cfg.early_stop_patience:
            self.checkpointer.finish()  # the best may still be written in the background
            raise StoppedEarly(
                f"validation loss has not improved for {stale} validations (patience "
                f"{self.cfg.early_stop_patience}): stopped at step {step}; the best is step "
                f"{best['step']} (val loss {best['loss']:.4f}), "
                f"{self.run_dir.checkpoint(best['step']).path}: export that one"
            )

    def _write(self) -> None:
        if self.main:
            self.run_dir.best.write_text(json.dumps(self.record))


def best_step(run: RunDir) -> int | None:
    """The step of the best checkpoint an early-stopping run recorded."""
    if not run.best.exists():
        return None
    return json.loads(run.best.read_text()).get("best", {}).get("step")
