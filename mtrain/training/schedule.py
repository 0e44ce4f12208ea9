"""Learning-rate schedules as a multiplier of the peak rate at each optimizer step."""

import math

from mtrain.training.config import OptimConfig, Schedule


def lr_multiplier(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Warmup from 0 to 1, then cosine (to ``min_lr_ratio``) or warmup-stable-decay."""
    warmup = cfg.warmup_for(max_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == Schedule.cosine:
        progress = (step - warmup) / max(1, max_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, max_steps - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)
