"""Export a checkpoint: ``python -m mtrain.export checkpoint=<run_dir or checkpoint dir>
output=<dir>`` writes a model directory loadable without DeepSpeed
(``mtrain.exported.writing``)."""

from dataclasses import dataclass
from pathlib import Path

from data_pipeline.app import entry_point
from mtrain.exported.writing import export


@dataclass
class ExportConfig:
    # A run directory (its newest complete checkpoint is taken) or one checkpoint directory.
    checkpoint: str = "???"
    output: str = "???"


def run(cfg: ExportConfig, _overrides: list[str]) -> None:
    export(Path(cfg.checkpoint), Path(cfg.output))


main = entry_point("export", ExportConfig, run)

if __name__ == "__main__":
    main()
