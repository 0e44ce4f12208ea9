"""Which built-in collections a ``music21:`` source names: some, all, or all but some."""

import re

import pytest

from data_pipeline.music21_corpus import CorpusSpec, list_works

KNOWN = ["bach", "essenFolksong", "nottingham-dataset", "palestrina", "ryansMammoth"]


@pytest.mark.parametrize(
    ("source", "chosen"),
    [
        ("music21:bach", {"bach"}),
        ("music21:bach+palestrina", {"bach", "palestrina"}),
        ("music21:bach,palestrina", {"bach", "palestrina"}),
        ("music21:all", set(KNOWN)),
        ("music21:all-palestrina", set(KNOWN) - {"palestrina"}),
        # a name with '-' in it is one name, wherever it stands
        ("music21:all-nottingham-dataset-bach", {"essenFolksong", "palestrina", "ryansMammoth"}),
        ("music21:all-palestrina-nottingham-dataset", {"bach", "essenFolksong", "ryansMammoth"}),
    ],
)
def test_a_source_chooses_its_collections(source, chosen):
    assert CorpusSpec.parse(source).select(KNOWN) == chosen


@pytest.mark.parametrize(
    ("source", "unknown"),
    [("music21:all-palestrin", "['palestrin']"), ("music21:bach+chopn", "['chopn']")],
)
def test_an_unknown_collection_is_refused_naming_the_known_ones(source, unknown):
    message = rf"unknown collection\(s\) {re.escape(unknown)}; known: bach,"
    with pytest.raises(ValueError, match=message):
        CorpusSpec.parse(source).select(KNOWN)


def test_an_empty_source_is_refused():
    with pytest.raises(ValueError, match="name at least one collection"):
        CorpusSpec.parse("music21:")


def test_all_but_one_lists_every_other_work_of_the_corpus():
    every = list_works(CorpusSpec.parse("music21:all"))
    but = list_works(CorpusSpec.parse("music21:all-palestrina"))
    palestrina = [w for w in every if w.collection == "palestrina"]
    assert len(palestrina) > 1000
    assert but == [w for w in every if w.collection != "palestrina"]
