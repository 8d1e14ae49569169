"""test_db on in-memory SQLite (default) and on PostgreSQL: a throwaway server, or one given by URL.

Each run goes through one tree whose tests change the database every way a test can (commit,
rollback, DDL, a raise after a flush, a closed connection, a second session on a database of the
test's own), each test first checking that nothing of the tests before it is left.
"""

import psycopg
import pytest

from ml_fixtures.database import ThrowawayPostgres

ISOLATION = """
    import os

    import pytest
    from sqlalchemy import Connection, func, inspect, select, text
    from sqlalchemy.orm import Session
    from app.models import Resource
    from app.services.sparse_embedding_service import SparseEmbeddingService

    def assert_untouched(session):
        assert session.scalar(select(func.count(Resource.id))) == 0
        assert "scratch" not in inspect(session.connection()).get_table_names()

    def test_the_backend(test_db):
        assert test_db.bind.dialect.name == os.environ["EXPECTED_DIALECT"]
        assert_untouched(test_db)

    @pytest.mark.parametrize("i", range(2))
    def test_each_test_starts_empty_even_after_a_commit(test_db, i):
        assert_untouched(test_db)
        test_db.add(Resource(title=f"committed {i}", content="python"))
        test_db.commit()
        assert test_db.scalar(select(func.count(Resource.id))) == 1

    def test_a_rollback_undoes_what_came_after_the_last_commit(test_db):
        assert_untouched(test_db)
        test_db.add(Resource(title="kept", content="python"))
        test_db.commit()
        test_db.add(Resource(title="undone", content="python"))
        test_db.flush()
        test_db.rollback()
        assert test_db.scalars(select(Resource.title)).all() == ["kept"]
        with test_db.begin_nested():  # a SAVEPOINT of the code's own, inside the test's
            test_db.add(Resource(title="nested", content="python"))
        assert test_db.scalar(select(func.count(Resource.id))) == 2

    @pytest.mark.parametrize("i", range(2))
    def test_a_table_created_in_a_test_is_gone_after_it(test_db, i):
        assert_untouched(test_db)
        test_db.execute(text("CREATE TABLE scratch (id INTEGER PRIMARY KEY)"))
        test_db.execute(text("INSERT INTO scratch (id) VALUES (1)"))
        test_db.commit()
        assert test_db.scalar(text("SELECT count(*) FROM scratch")) == 1

    @pytest.mark.xfail(raises=RuntimeError, strict=True)
    def test_a_test_that_raises_after_a_flush(test_db):
        assert_untouched(test_db)
        test_db.add(Resource(title="flushed", content="python"))
        test_db.flush()
        raise RuntimeError("after the flush")

    def test_a_failed_write_leaves_the_committed_rows(test_db, monkeypatch):
        assert_untouched(test_db)
        resource = Resource(title="Python", content="python programming")
        test_db.add(resource)
        test_db.commit()
        service = SparseEmbeddingService(test_db)
        service.embed_resource(resource.id)
        before = dict(resource.sparse_embedding.weights)
        monkeypatch.setattr(test_db, "flush", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
        resource.title = "changed"
        with pytest.raises(RuntimeError):
            service.embed_resource(resource.id)
        monkeypatch.undo()
        test_db.expire_all()
        assert test_db.get(Resource, resource.id).title == "Python"
        assert test_db.get(Resource, resource.id).sparse_embedding.weights == before

    def test_a_test_that_closes_the_connection(test_db):
        assert_untouched(test_db)
        test_db.add(Resource(title="flushed", content="python"))
        test_db.flush()
        test_db.connection().close()

    def test_by_default_each_test_is_a_transaction_on_the_runs_database(test_db):
        assert isinstance(test_db.get_bind(), Connection) and test_db.get_bind().in_transaction()

    @pytest.mark.parametrize("i", range(2))
    def test_a_second_session_on_the_engine_sees_the_commits(test_db, test_db_engine, i):
        assert_untouched(test_db)
        test_db.add(Resource(title="first", content="python"))
        test_db.commit()
        with Session(test_db_engine) as second:
            assert second.scalars(select(Resource.title)).all() == ["first"]
            second.add(Resource(title="second", content="python"))
            second.execute(text("CREATE TABLE scratch (id INTEGER PRIMARY KEY)"))
            second.commit()
        assert sorted(test_db.scalars(select(Resource.title))) == ["first", "second"]

    @pytest.mark.fresh_db
    def test_a_fresh_database_has_the_schema_and_real_commits(test_db):
        assert_untouched(test_db)
        test_db.add(Resource(title="real", content="python"))
        test_db.commit()
        with Session(test_db.get_bind()) as other:
            assert other.scalars(select(Resource.title)).all() == ["real"]

    def test_the_last_test_finds_nothing_either(test_db):
        assert_untouched(test_db)
"""
#: Every test of ISOLATION passes but the one that is meant to raise.
OUTCOMES = {"passed": 13, "xfailed": 1}


@pytest.fixture
def db_tree(ml_tree):
    ml_tree.write("unit/test_isolation.py", ISOLATION)
    return ml_tree


def test_the_default_is_in_memory_sqlite_each_test_in_a_rolled_back_transaction(db_tree):
    db_tree.run(EXPECTED_DIALECT="sqlite").assert_outcomes(**OUTCOMES)


def test_a_sqlite_file_given_by_url(db_tree, tmp_path):
    result = db_tree.run(f"--db-url=sqlite:///{tmp_path / 'run.db'}", EXPECTED_DIALECT="sqlite")
    result.assert_outcomes(**OUTCOMES)


@pytest.mark.slow
def test_a_throwaway_postgresql_server_for_the_run(db_tree):
    result = db_tree.run("--db=postgresql", EXPECTED_DIALECT="postgresql")
    result.assert_outcomes(**OUTCOMES)


@pytest.mark.slow
def test_a_server_given_by_url_gets_a_database_of_its_own_dropped_after(db_tree, monkeypatch):
    """By host name, as CI's service containers are reached: the unit trees' tests, which may not
    resolve one (pytest-socket), still reach their database."""
    with ThrowawayPostgres() as url:
        server = url.replace("postgresql+psycopg", "postgresql").replace("127.0.0.1", "localhost").rsplit("/", 1)[0]
        monkeypatch.setenv("TEST_DATABASE_URL", f"{server}/shop")
        db_tree.run(EXPECTED_DIALECT="postgresql").assert_outcomes(**OUTCOMES)
        with psycopg.connect(f"{server}/postgres") as connection:
            names = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        assert not names & {"test_shop", "shop", "test_shop_fresh"}


def test_a_bad_db_value_lists_the_valid_ones(db_tree):
    result = db_tree.run("--db=mysql")
    result.stdout.fnmatch_lines(["*--db must be one of sqlite, postgresql; got 'mysql'*"])
