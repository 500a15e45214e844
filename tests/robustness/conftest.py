"""The long-run-only tests (``@pytest.mark.long``) are deselected unless the run is the
long one (``make robustness`` sets ``NAS_JANITOR_ROBUSTNESS=long``): they are not
skipped, they are not part of ``make test`` at all."""

from __future__ import annotations

import pytest

from tests.robustness import knobs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if knobs.LONG:
        return
    long_only = [i for i in items if i.get_closest_marker("long")]
    if long_only:
        config.hook.pytest_deselected(items=long_only)
        items[:] = [i for i in items if not i.get_closest_marker("long")]
