"""Shared test set-up: the real-data folder, the `shared_data` marker's skip, quiet plotting, small thread use."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("USFMAE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$USFMAE_SHARED_DATA``); tests using it are marked ``shared_data``."""
    return SHARED_DATA


@pytest.fixture
def cli_error(capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """``cli_error(argv, *words)``: run ``usfmae ARGV`` in-process, check it fails with exit code 2 and a one-line
    ``usfmae: error:`` message containing every word, and return that message."""
    from usfmae_core import cli

    def check(argv: list[str], *words: str) -> str:
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, err
        assert err.startswith("usfmae: error:") and len(err.splitlines()) == 1, err
        for w in words:
            assert w in err, err
        return err

    return check


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real ultrasound not found at {SHARED_DATA} (set USFMAE_SHARED_DATA)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)
