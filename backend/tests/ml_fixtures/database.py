"""The database behind ``test_db``: in-memory SQLite by default, PostgreSQL on demand.

* default: a fresh in-memory SQLite database per test (nothing to share, nothing to clean);
* ``--db-url=URL`` or ``$TEST_DATABASE_URL``: that server; for PostgreSQL a database of its own
  (``test_<name>``, per xdist worker) is created for the run with pytest-postgresql's
  ``DatabaseJanitor`` and dropped after it;
* ``--db=postgresql``: a throwaway PostgreSQL server for the run (``pg_ctl`` on PATH, or
  ``pg_config --bindir``), stopped and deleted at the end. PostgreSQL refuses to run as root, so
  as root it runs as the ``postgres`` user (``runuser``), in a data directory that user owns.

On a server the schema is created once per run, and each test runs inside a transaction that is
rolled back after it; the code's own ``commit()``/``rollback()`` work on a SAVEPOINT inside it
(SQLAlchemy's ``join_transaction_mode="create_savepoint"``), so "a failure leaves the database as
it was" is tested for real and tests stay isolated without recreating anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from ml_fixtures.options import Database
from ml_fixtures.parallel import worker_id

URL_VARIABLE = "TEST_DATABASE_URL"


def in_memory_sqlite(metadata: MetaData | None) -> Engine:
    engine = create_engine("sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool)
    (MetaData() if metadata is None else metadata).create_all(engine)
    return engine


@contextlib.contextmanager
def engine_for_run(config: pytest.Config, metadata: MetaData | None) -> Iterator[Engine | None]:
    """The run's server engine with the schema (``metadata``) created, or None for a fresh SQLite database per test."""
    url = config.getoption("db_url") or os.environ.get(URL_VARIABLE)
    kind = Database.parse(config.getoption("db"), "--db")
    if url is None and kind is Database.SQLITE:
        yield None
        return
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(ThrowawayPostgres())
        if make_url(url).get_backend_name() == "postgresql":
            url = stack.enter_context(_database_of_its_own(url, worker_id(config)))
        engine = create_engine(url)
        stack.callback(engine.dispose)
        (MetaData() if metadata is None else metadata).create_all(engine)
        yield engine


@contextlib.contextmanager
def session_for_test(engine: Engine | None, metadata: MetaData | None) -> Iterator[Session]:
    """A session for one test: on a fresh in-memory SQLite, or in a transaction rolled back afterwards."""
    if engine is None:
        engine = in_memory_sqlite(metadata)
        with Session(engine, expire_on_commit=False) as session:
            yield session
        engine.dispose()
        return
    with engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()


@contextlib.contextmanager
def _database_of_its_own(url: str, worker: str | None) -> Iterator[str]:
    """Create ``test_<name>`` (one per xdist worker) on the server, yield its URL, drop it after."""
    from pytest_postgresql.janitor import DatabaseJanitor

    parsed = make_url(url).set(drivername="postgresql+psycopg")
    name = "_".join(filter(None, ["test", parsed.database or "main", worker]))
    janitor = DatabaseJanitor(
        user=parsed.username or "postgres",
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        dbname=name,
        password=parsed.password,
    )
    janitor.init()
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        janitor.drop()


def _postgres_bin(program: str) -> str:
    found = shutil.which(program)
    if found:
        return found
    try:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise pytest.UsageError(f"--db=postgresql needs PostgreSQL's {program}: not on PATH, and pg_config failed ({exc})")
    return str(Path(bindir) / program)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ThrowawayPostgres(contextlib.AbstractContextManager):
    """A PostgreSQL server in a temporary directory, on 127.0.0.1 and a free port, trust auth.

    As root it runs as the ``postgres`` user (PostgreSQL refuses root).
    """

    user = "postgres"

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="ml-fixtures-postgres-"))
        self.data, self.port = self.base / "data", _free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.base, "postgres", "postgres")

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self.as_postgres, *command], capture_output=True, text=True)
        if done.returncode != 0:
            log = self.base / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}{tail}")

    def __enter__(self) -> str:
        try:
            self._run(_postgres_bin("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
            options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
            log = str(self.base / "server.log")
            self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/main"

    def __exit__(self, *exc_info) -> None:
        try:
            self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
