"""Fit a scaling law to a sweep of compute-budgeted runs (``mtrain.scaling_laws.job``):

``python -m mtrain.scaling sweep_dir=<multirun's run_dir> output=<dir>``

The sweep itself is one Hydra multirun of the trainer, e.g.
``python -m mtrain.train -m model=scaling model.depth=1,2,3,4 trainer.flops_budget=1e11,1e12``.
"""

from pathlib import Path

from data_pipeline.app import entry_point
from mtrain.scaling_laws.job import ScalingConfig, scale


def run(cfg: ScalingConfig, overrides: list[str]) -> None:
    report = scale(cfg, overrides)
    law, held = report["law"], report["holdout"]
    print(
        f"L(N, D) = {law['E']:.4f} + {law['A']:.4g}/N^{law['alpha']:.3f} "
        f"+ {law['B']:.4g}/D^{law['beta']:.3f} over {len(report['points'])} points "
        f"({len(report['set_aside'])} left out)"
    )
    if "rel_error" in held:
        print(
            f"held out {held['budget']:.0e} FLOPs: best loss predicted "
            f"{held['predicted_best_loss']:.4f}, measured {held['measured_best_loss']:.4f} "
            f"({held['rel_error']:+.2%})"
        )
    print(f"report: {Path(cfg.output) / 'law.md'}")


main = entry_point("scaling", ScalingConfig, run)

if __name__ == "__main__":
    main()
