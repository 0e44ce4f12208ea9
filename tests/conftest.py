"""What a test costs is where it lives: ``tests/unit/`` runs in the test process, ``tests/e2e/``
starts real programs (apps, launchers, process groups, servers) and is marked ``slow`` here,
by directory, so ``pytest -m "not slow"`` runs the unit layer alone."""

from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().is_relative_to(E2E):
            item.add_marker(pytest.mark.slow)
