"""Join the slices of a sliced prepare run into one dataset (``data_pipeline.slice_merge``):
``python -m data_pipeline.merge output=<dir|url>``, after every slice is done."""

from data_pipeline.app import entry_point
from data_pipeline.card import format_card
from data_pipeline.config import MergeConfig
from data_pipeline.slice_merge import merge_slices


def run(cfg: MergeConfig, _overrides: list[str]) -> None:
    print(format_card(merge_slices(cfg.output), cfg.output))


main = entry_point("merge", MergeConfig, run)

if __name__ == "__main__":
    main()
