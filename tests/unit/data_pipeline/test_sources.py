"""The order in which a source's files reach the shards."""

from data_pipeline.sources import mixed


def test_mixed_is_a_seeded_permutation_within_its_window():
    items = list(range(500))
    first = list(mixed(items, 100, seed=0))
    assert sorted(first) == items
    assert first == list(mixed(iter(items), 100, seed=0))  # lazy input, same order
    assert first != list(mixed(items, 100, seed=1))
    # An item leaves at most `window` places before it arrives...
    assert all(position >= item - 100 for position, item in enumerate(first))
    # ...and a window as large as the listing mixes all of it: both halves early on.
    whole = list(mixed(items, 1000, seed=0))[:50]
    assert any(i < 250 for i in whole) and any(i >= 250 for i in whole)
    assert list(mixed(items, 1, seed=0)) == items
