"""MIDI -> tokens -> WebDataset shards: ``python -m data_pipeline.prepare source=... output=...``.

With ``num_slices=N slice_index=i`` the run handles one slice (a Slurm array task) and
``python -m data_pipeline.merge`` joins the slices; with one slice it merges itself.
"""

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from data_pipeline.card import format_card
from data_pipeline.config import PrepareConfig, register_configs
from data_pipeline.merge import merge_slices
from data_pipeline.slice_run import run_slice

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(raw: DictConfig) -> None:
    cfg: PrepareConfig = OmegaConf.to_object(raw)
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


register_configs()

if __name__ == "__main__":
    main()
