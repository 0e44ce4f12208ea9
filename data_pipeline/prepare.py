"""MIDI -> tokens -> WebDataset shards: ``python -m data_pipeline.prepare source=... output=...``.

With ``num_slices=N slice_index=i`` the run handles one slice (a Slurm array task) and
``python -m data_pipeline.merge`` joins the slices; with one slice it merges itself.
"""

import logging

from data_pipeline.app import entry_point
from data_pipeline.card import format_card
from data_pipeline.config import PrepareConfig
from data_pipeline.slice_merge import merge_slices
from data_pipeline.slice_run import run_slice

log = logging.getLogger(__name__)


def run(cfg: PrepareConfig, _overrides: list[str]) -> None:
    run_slice(cfg)
    if cfg.num_slices == 1 and cfg.merge:
        print(format_card(merge_slices(cfg.output), cfg.output))
    else:
        log.info(
            "slice %d of %d done; run `python -m data_pipeline.merge output=%s` when "
            "every slice is",
            cfg.slice_index,
            cfg.num_slices,
            cfg.output,
        )


main = entry_point("prepare", PrepareConfig, run)

if __name__ == "__main__":
    main()
