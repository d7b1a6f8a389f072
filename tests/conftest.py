"""Shared fixtures. Ray is not started here: tests that need it start their own local cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtlray.data import BUILTIN_DATASETS, prepare_builtin

DATA_ROOT_LIMIT = 3000
"""Rows per split of the datasets in :func:`data_root` (seed 0)."""


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with every built-in dataset prepared, at most 3,000 rows per split (seed 0).

    ``digits`` and ``faces`` are whole (1,797 and 200 rows); ``fashion-mnist`` has 3,000 rows in
    each of train, val and test. Treat it as read-only: other tests share it.
    """
    root = tmp_path_factory.mktemp("dtlray-data")
    for name in BUILTIN_DATASETS:
        prepare_builtin(name, root, seed=0, limit=DATA_ROOT_LIMIT)
    return root
