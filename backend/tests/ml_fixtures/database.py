"""The databases behind ``test_db``: in-memory SQLite by default, PostgreSQL on demand.

* default: an in-memory SQLite database per process (per xdist worker);
* ``--db-url=URL`` or ``$TEST_DATABASE_URL``: that server; for PostgreSQL a database of its own
  (``test_<name>``, per xdist worker) is created for the run with pytest-postgresql's
  ``DatabaseJanitor`` and dropped after it;
* ``--db=postgresql``: a throwaway PostgreSQL server for the run (``pg_ctl`` on PATH, or
  ``pg_config --bindir``), stopped and deleted at the end. PostgreSQL refuses to run as root, so
  as root it runs as the ``postgres`` user (``runuser``), in a data directory that user owns.

The schema is created once, when the first test asks for the database. Each test then runs inside
a transaction that is rolled back after it; the code's own ``commit()``/``rollback()`` work on a
SAVEPOINT inside it (SQLAlchemy's "joining a session into an external transaction" recipe, with
``join_transaction_mode="create_savepoint"``; pytest-django's ``TestCase`` does the same), so "a
failure leaves the database as it was" is tested for real and a test costs a transaction, not a
database. DDL rolls back with it: SQLite and PostgreSQL both have transactional DDL.

A test marked ``fresh_db``, or one that takes ``test_db_engine``, gets a database of its own
instead: a copy of the prepared one (sqlite3's backup API into a file; PostgreSQL's
``CREATE DATABASE ... TEMPLATE``), where commits are real and any number of connections may be
open, dropped after the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_socket import enable_socket
from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from ml_fixtures.options import Database
from ml_fixtures.parallel import worker_id

URL_VARIABLE = "TEST_DATABASE_URL"
#: The marker that gives a test a database of its own (registered by the plugin).
FRESH_MARKER = "fresh_db"
_run_key = pytest.StashKey["RunDatabase"]()


def make_engine(url: str | URL, **kwargs) -> Engine:
    """``create_engine``; on SQLite with SQLAlchemy, not the driver, beginning transactions.

    pysqlite's own transaction handling begins none before DDL or SAVEPOINT, so both would escape
    the test's transaction; SQLAlchemy's SQLite docs ("Enabling Non-Legacy SQLite Transactional
    Modes") turn it off and emit BEGIN from the ``begin`` event, on every Python version. BEGIN
    goes straight to the driver's connection: through SQLAlchemy's statement machinery it would
    cost each test a third of its transaction.
    """
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _without_driver_transactions)
        event.listen(engine, "begin", _begin)
    else:
        event.listen(engine, "do_connect", _connect_over_the_network)
    return engine


def _connect_over_the_network(dialect, connection_record, cargs, cparams):
    # The unit trees keep test code off the network (pytest-socket), not off the test database: a
    # connection opened in a test, to a server known by name, resolves it with Python's socket module.
    with network_allowed():
        return dialect.connect(*cargs, **cparams)


def _without_driver_transactions(dbapi_connection, connection_record) -> None:
    dbapi_connection.isolation_level = None


def _begin(connection) -> None:
    connection.connection.driver_connection.execute("BEGIN")


class RunDatabase:
    """The run's database, its schema created on first use and everything closed when the run ends.

    Kept on the config rather than in a session-scoped fixture so that ``test_db_engine`` can be
    the engine of one test's own database; a failure to start is kept too and raised again for
    every later test, as pytest does for a session fixture's.
    """

    def __init__(self, config: pytest.Config, metadata: MetaData | None) -> None:
        self.config, self.metadata = config, metadata
        self._stack = contextlib.ExitStack()
        self._engine: Engine | None = None
        self._error: BaseException | None = None
        self._connection: Connection | None = None
        config.add_cleanup(self._stack.close)

    @classmethod
    def of(cls, config: pytest.Config, metadata: MetaData | None) -> RunDatabase:
        if _run_key not in config.stash:
            config.stash[_run_key] = cls(config, metadata)
        return config.stash[_run_key]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if self._error is not None:
                raise self._error
            try:
                with network_allowed():
                    self._engine = self._stack.enter_context(engine_for_run(self.config, self.metadata))
            except BaseException as exc:
                self._error = exc
                raise
            self._stack.callback(self._release)  # before the engine is disposed
        return self._engine

    def _release(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session inside a transaction rolled back afterwards; its own commits and rollbacks on a SAVEPOINT.

        Every test's transaction runs on one connection, kept open between tests (checking one out
        and in again cost a test as much as its transaction), and opened again if a test closed it.
        """
        if self._connection is None or self._connection.closed or self._connection.invalidated:
            self._connection = self.engine.connect()
        transaction = self._connection.begin()
        session = Session(bind=self._connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Engine]:
        """An engine on a database of one test's own (:func:`fresh_engine`)."""
        self._release()  # PostgreSQL copies a database only while nobody is connected to it
        with fresh_engine(self.engine) as engine:
            yield engine


@contextlib.contextmanager
def network_allowed() -> Iterator[None]:
    """pytest-socket's block lifted meanwhile, for the test database alone (started, copied or connected
    to on behalf of the run or of a test), which the unit trees' guard does not keep tests from."""
    saved = socket.socket, socket.getaddrinfo, socket.gethostbyname
    enable_socket()
    try:
        yield
    finally:
        socket.socket, socket.getaddrinfo, socket.gethostbyname = saved


@contextlib.contextmanager
def engine_for_run(config: pytest.Config, metadata: MetaData | None) -> Iterator[Engine]:
    """The run's engine with the schema (``metadata``) created: in-memory SQLite, or a server."""
    url = config.getoption("db_url") or os.environ.get(URL_VARIABLE)
    kind = Database.parse(config.getoption("db"), "--db")
    with contextlib.ExitStack() as stack:
        if url is None and kind is Database.SQLITE:
            # One connection for the engine's life: an in-memory database lives and dies with its connection.
            engine = make_engine("sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool)
        else:
            if url is None:
                url = stack.enter_context(ThrowawayPostgres())
            if make_url(url).get_backend_name() == "postgresql":
                url = stack.enter_context(_database_of_its_own(url, worker_id(config)))
            engine = make_engine(url)
        stack.callback(engine.dispose)
        (MetaData() if metadata is None else metadata).create_all(engine)
        yield engine


@contextlib.contextmanager
def fresh_engine(run_engine: Engine) -> Iterator[Engine]:
    """A database of one test's own, a copy of the run's prepared one, dropped afterwards."""
    url = run_engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        # A file, not memory: a second connection then sees the same database, as in production.
        with tempfile.TemporaryDirectory(prefix="ml-fixtures-fresh-db-") as directory:
            path = Path(directory) / "fresh.db"
            with run_engine.connect() as source, contextlib.closing(sqlite3.connect(path)) as target:
                source.connection.dbapi_connection.backup(target)
            engine = make_engine(url.set(database=str(path)), connect_args={"check_same_thread": False})
            try:
                yield engine
            finally:
                engine.dispose()
    elif backend == "postgresql":
        run_engine.dispose()  # CREATE DATABASE ... TEMPLATE needs the template without connections
        janitor = _janitor(url, f"{url.database}_fresh", template=url.database)
        with network_allowed():
            janitor.init()
        try:
            engine = make_engine(url.set(database=janitor.dbname))
            try:
                yield engine
            finally:
                engine.dispose()
        finally:
            with network_allowed():
                janitor.drop()
    else:
        raise pytest.UsageError(
            f"{FRESH_MARKER} and test_db_engine make a database of the test's own on SQLite and PostgreSQL only; "
            f"this run's database is {backend} ({url.render_as_string()})"
        )


def _janitor(url: URL, name: str, template: str | None = None):
    from pytest_postgresql.janitor import DatabaseJanitor

    return DatabaseJanitor(
        user=url.username or "postgres",
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        dbname=name,
        template_dbname=template,
        password=url.password,
    )


@contextlib.contextmanager
def _database_of_its_own(url: str, worker: str | None) -> Iterator[str]:
    """Create ``test_<name>`` (one per xdist worker) on the server, yield its URL, drop it after."""
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    janitor = _janitor(parsed, "_".join(filter(None, ["test", parsed.database or "main", worker])))
    janitor.init()
    try:
        yield parsed.set(database=janitor.dbname).render_as_string(hide_password=False)
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
