"""Keep every data test offline and away from the user's folders."""

import pytest


@pytest.fixture(autouse=True)
def _offline_data_dirs(tmp_path_factory, monkeypatch):
    """Point scikit-learn's cache at a temp folder; unset the data-root variable."""
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path_factory.mktemp("sklearn_data")))
    monkeypatch.delenv("SPAMKERN_DATA", raising=False)
