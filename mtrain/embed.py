"""Piece embeddings, label retrieval and a linear probe against a pitch-class baseline
(``mtrain.evaluation.embed_job``): ``python -m mtrain.embed checkpoint=<export or run dir>
data_path=<dataset> output=<dir> [query=<piece id>]``."""

from data_pipeline.app import entry_point
from mtrain.evaluation.embed_job import EmbedConfig, embed, markdown


def run(cfg: EmbedConfig, _overrides: list[str]) -> None:
    print(markdown(embed(cfg)))


main = entry_point("embed", EmbedConfig, run)

if __name__ == "__main__":
    main()
