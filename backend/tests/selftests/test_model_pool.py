"""ModelPool on its own: LRU under a budget, one load per key, failures remembered, thread safety."""

import threading
import time

import pytest

from app.ml import LoadedModel, ModelUnavailableError
from ml_fixtures.pool import ModelKey, ModelPool


class Weights:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def make_pool(budget, evicted=None):
    on_evict = evicted.append if evicted is not None else None
    return ModelPool(budget, on_evict=on_evict, size_of=lambda model: model.nbytes, unavailable_errors=(ModelUnavailableError,))


def loader(nbytes, calls):
    def load():
        calls.append(nbytes)
        return LoadedModel(Weights(nbytes), None, "cpu")

    return load


def test_a_key_is_loaded_once():
    pool, calls = make_pool(100), []
    first = pool.acquire(ModelKey("a"), loader(10, calls))
    assert pool.acquire(ModelKey("a"), loader(10, calls)) is first
    assert calls == [10]


def test_device_and_dtype_are_part_of_the_key():
    pool, calls = make_pool(100), []
    pool.acquire(ModelKey("a", "cpu"), loader(10, calls))
    pool.acquire(ModelKey("a", "cuda"), loader(10, calls))
    pool.acquire(ModelKey("a", "cpu", "int8"), loader(10, calls))
    assert len(calls) == 3


def test_the_least_recently_used_model_is_evicted_when_a_new_one_would_not_fit():
    evicted = []
    pool, calls = make_pool(100, evicted), []
    a, b, c = ModelKey("a"), ModelKey("b"), ModelKey("c")
    pool.acquire(a, loader(40, calls))
    pool.acquire(b, loader(40, calls))
    pool.acquire(a, loader(40, calls))  # a is now the most recently used
    pool.acquire(c, loader(40, calls))
    assert evicted == [b]
    assert pool.keys() == [a, c]
    assert pool.used_bytes == 80


def test_a_known_size_makes_room_before_loading():
    evicted, sizes_seen = [], []
    pool = make_pool(100, evicted)
    pool.acquire(ModelKey("a"), lambda: LoadedModel(Weights(60), None, "cpu"))
    pool.clear()
    pool.acquire(ModelKey("b"), lambda: LoadedModel(Weights(60), None, "cpu"))

    def load_a_again():
        sizes_seen.append(pool.used_bytes)
        return LoadedModel(Weights(60), None, "cpu")

    pool.acquire(ModelKey("a"), load_a_again)
    assert sizes_seen == [0], "b should be evicted before a is loaded again"


def test_a_model_larger_than_the_budget_is_kept_alone_with_a_warning():
    pool = make_pool(10)
    with pytest.warns(UserWarning, match="exceeds the model memory budget"):
        pool.acquire(ModelKey("big"), loader(50, []))
    assert pool.keys() == [ModelKey("big")]


def test_a_failure_is_remembered_until_clear():
    pool, attempts = make_pool(100), []

    def missing():
        attempts.append(1)
        raise ModelUnavailableError("m", ["nowhere"])

    for _ in range(3):
        with pytest.raises(ModelUnavailableError):
            pool.acquire(ModelKey("m"), missing)
    assert len(attempts) == 1
    pool.clear()
    with pytest.raises(ModelUnavailableError):
        pool.acquire(ModelKey("m"), missing)
    assert len(attempts) == 2


def test_concurrent_acquires_load_once():
    pool, calls = make_pool(100), []

    def slow_load():
        calls.append(1)
        time.sleep(0.05)
        return LoadedModel(Weights(1), None, "cpu")

    results = []
    threads = [threading.Thread(target=lambda: results.append(pool.acquire(ModelKey("a"), slow_load))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert all(result is results[0] for result in results)
