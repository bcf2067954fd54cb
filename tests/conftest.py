"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the server of SSLAB_TEST_POSTGRES_URL (.ci/run starts a throwaway one)."""
    server = os.environ.get("SSLAB_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("SSLAB_TEST_POSTGRES_URL is not set (.ci/run starts a throwaway PostgreSQL and sets it)")
    name = f"sslab_test_{secrets.token_hex(4)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    yield server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(scope="session", autouse=True)
def _fixtures_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module- and session-scoped fixtures, which run before any test's own folder is set, keep trained
    weights out of the checkout's results/ too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSLAB_WEIGHTS_DIR", str(tmp_path_factory.mktemp("fixture-weights")))
        yield


@pytest.fixture(autouse=True)
def _weights_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test keeps trained weights in a folder of its own, never in the checkout's results/."""
    monkeypatch.setenv("SSLAB_WEIGHTS_DIR", str(tmp_path_factory.mktemp("weights")))


@pytest.fixture(scope="session", autouse=True)
def _fp32_on_every_cpu() -> Iterator[None]:
    """`--precision auto` computes in fp32 on every CI machine, whether or not its CPU has native bf16, so
    the tests' margins and exact comparisons hold on all of them; tests of the choice set it themselves.
    Session-wide, so that module-scoped fixtures (the processes of the multi-process tests) are covered too.
    `SSLAB_TEST_AUTO_BF16=1` lets `auto` choose as it does outside the tests (benchmarks/margins.py)."""
    with pytest.MonkeyPatch.context() as patch:
        if os.environ.get("SSLAB_TEST_AUTO_BF16") != "1":
            patch.setenv("SSLAB_CPU_BF16", "0")
        yield
