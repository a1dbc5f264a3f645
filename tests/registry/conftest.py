"""The registry tests' fixtures: each test runs on both backends (SQLite; PostgreSQL on a
throwaway server started once per session), with an empty registry of its own."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.registry import BACKENDS, PostgresServer, require_postgres_bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = require_postgres_bindir()
    server = PostgresServer(bindir)
    try:
        server.start()
    except Exception as exc:
        server.cleanup()
        pytest.fail(f"could not start PostgreSQL from {bindir}: {exc}", pytrace=False)
    yield server
    server.cleanup()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def registry_location(backend: str, tmp_path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(database url, blob root) of an empty registry on the test's backend."""
    blobs = str(tmp_path / "blobs")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}", blobs
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    db = server.create_database()
    try:
        yield server.url(db), blobs
    finally:
        server.drop_database(db)


@pytest.fixture
def reg(registry_location):
    from minlora.registry import Registry

    url, blobs = registry_location
    r = Registry(url, blobs)
    yield r
    r.close()
