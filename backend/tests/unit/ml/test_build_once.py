"""Embedded models are built once per recipe, atomically, under a file lock."""

import multiprocessing
import time
from pathlib import Path

import pytest

from app.ml.embedded import build_once


def slow_build(dest):
    (dest / "weights.bin").write_bytes(b"w" * 1000)
    time.sleep(0.2)
    with open(dest.parent / "builds.log", "a") as log:
        log.write("built\n")


def build_in_child(cache_dir, queue):
    queue.put(str(build_once("model", {"recipe": 1}, slow_build, cache_dir)))


def test_racing_processes_build_once_and_see_a_whole_model(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=build_in_child, args=(tmp_path, queue)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    paths = {queue.get(timeout=5) for _ in children}
    assert len(paths) == 1
    assert (tmp_path / "builds.log").read_text() == "built\n"
    assert (Path(paths.pop()) / "weights.bin").read_bytes() == b"w" * 1000


def test_a_changed_recipe_builds_a_new_directory(tmp_path):
    first = build_once("model", {"recipe": 1}, slow_build, tmp_path)
    assert build_once("model", {"recipe": 1}, slow_build, tmp_path) == first
    second = build_once("model", {"recipe": 2}, slow_build, tmp_path)
    assert second != first and (second / "recipe.json").read_text() == '{\n  "recipe": 2\n}'


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def failing(dest):
        (dest / "half.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once("model", {"recipe": 1}, failing, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_without_building_an_absent_model_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not built yet"):
        build_once("model", {"recipe": 1}, slow_build, tmp_path, allow_build=False)


def test_the_ci_cache_key_names_the_directories_the_models_are_built_in(tmp_path):
    """``python -m app.ml.embedded --fingerprint``: a CI job keys its model cache on it."""
    from app.ml import embedded

    directories = []
    for model_dir in (embedded.embedded_bge_m3_dir, embedded.embedded_classifier_dir, embedded.embedded_reranker_dir):
        with pytest.raises(FileNotFoundError) as absent:  # not built in an empty cache: the error names it
            model_dir(tmp_path, build=False)
        directories.append(Path(str(absent.value).split()[0]).name)
    assert embedded.fingerprint() == "+".join(directories)
