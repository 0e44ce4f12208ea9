"""Evaluate a trained model or a folder of MIDI files (``mtrain.evaluation.job``):

``python -m mtrain.evaluate checkpoint=<export or run dir> data_path=<dataset> output=<dir>``
``python -m mtrain.evaluate midi_dir=<folder> [reference_dir=<folder>] output=<dir>``
"""

from pathlib import Path

from data_pipeline.app import entry_point
from mtrain.evaluation.job import EvaluateConfig, evaluate, markdown


def run(cfg: EvaluateConfig, overrides: list[str]) -> None:
    report = evaluate(cfg, overrides)
    print(markdown(report))
    print(f"report: {Path(cfg.output) / 'report.md'}")


main = entry_point("evaluate", EvaluateConfig, run)

if __name__ == "__main__":
    main()
