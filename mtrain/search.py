"""The pieces nearest to a MIDI file or a piece, from an index built by ``mtrain.embed``
(``mtrain.evaluation.search_job``): ``python -m mtrain.search index=<embed output>
query=<file.mid or piece id> [k=10] [add=<MIDI file or dir>]``."""

from data_pipeline.app import entry_point
from mtrain.evaluation.search_job import SearchConfig, markdown, search


def run(cfg: SearchConfig, _overrides: list[str]) -> None:
    print(markdown(search(cfg)))


main = entry_point("search", SearchConfig, run)

if __name__ == "__main__":
    main()
