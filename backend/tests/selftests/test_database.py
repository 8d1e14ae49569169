"""test_db on in-memory SQLite (default) and on PostgreSQL: a throwaway server, or one given by URL."""

import psycopg
import pytest

from ml_fixtures.database import ThrowawayPostgres

ISOLATION = """
    import pytest
    from sqlalchemy import func, select, text
    from app.models import Resource
    from app.services.sparse_embedding_service import SparseEmbeddingService

    def test_the_backend(test_db):
        import os
        assert test_db.bind.dialect.name == os.environ["EXPECTED_DIALECT"]

    @pytest.mark.parametrize("i", range(2))
    def test_each_test_starts_empty_even_after_a_commit(test_db, i):
        assert test_db.scalar(select(func.count(Resource.id))) == 0
        test_db.add(Resource(title=f"committed {i}", content="python"))
        test_db.commit()
        assert test_db.scalar(select(func.count(Resource.id))) == 1

    def test_a_failed_write_leaves_the_committed_rows(test_db, monkeypatch):
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
"""
@pytest.fixture
def db_tree(ml_tree):
    ml_tree.write("unit/test_isolation.py", ISOLATION)
    return ml_tree


def test_the_default_is_a_fresh_in_memory_sqlite_per_test(db_tree):
    db_tree.run(EXPECTED_DIALECT="sqlite").assert_outcomes(passed=4)


def test_a_throwaway_postgresql_server_for_the_run(db_tree):
    result = db_tree.run("--db=postgresql", EXPECTED_DIALECT="postgresql")
    result.assert_outcomes(passed=4)


def test_a_server_given_by_url_gets_a_database_of_its_own_dropped_after(db_tree, monkeypatch):
    with ThrowawayPostgres() as url:
        server = url.replace("postgresql+psycopg", "postgresql").rsplit("/", 1)[0]
        monkeypatch.setenv("TEST_DATABASE_URL", f"{server}/shop")
        db_tree.run(EXPECTED_DIALECT="postgresql").assert_outcomes(passed=4)
        with psycopg.connect(f"{server}/postgres") as connection:
            names = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        assert "test_shop" not in names and "shop" not in names


def test_a_bad_db_value_lists_the_valid_ones(db_tree):
    result = db_tree.run("--db=mysql")
    result.stdout.fnmatch_lines(["*--db must be one of sqlite, postgresql; got 'mysql'*"])
