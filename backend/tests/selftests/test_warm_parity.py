"""--ml-warm against cold on the same probes: what a test can observe of its process (the model hub's
offline constant, torch's threads, umask, limits, nice value, ignored signals, warning options,
environment, sys.path, argv, temporary directory), the debugger and --pdb on a pipe under pytest's
capture (the terminal and input() are in test_warm.py), a warning that PYTHONWARNINGS makes an
error, the load report, and fresh random draws in every run. The server preloads torch,
transformers and the hub, started by a run in another state than the probes' (umask, nice value,
limits, SIGINT, PYTHONWARNINGS, no offline variables): the child must take the probing caller's
over, not the server's. The first warm run also runs inference multi-threaded on a real model: a
child forked after the torch imports must not deadlock (cold, the integration tree runs it)."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from _ml_fixtures_warm_core import protocol
from ml_fixtures.warm import lifecycle

pytestmark = pytest.mark.slow  # real processes: `make test-slow` (pytest.ini)

PROBES = """
    import json, os, random, resource, signal, sys, tempfile, warnings
    import numpy, torch

    def test_1_state():
        import huggingface_hub.constants as hub

        umask = os.umask(0)
        os.umask(umask)
        state = {
            "hub_offline": hub.HF_HUB_OFFLINE,
            "torch_threads": torch.get_num_threads(),
            "umask": umask,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "affinity": sorted(os.sched_getaffinity(0)),
            "sigint": str(signal.getsignal(signal.SIGINT)),
            "signal_mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            "warnoptions": sys.warnoptions,
            "flags": list(sys.flags),
            "argv": sys.argv,
            "path": sys.path,
            "environ": dict(os.environ),
            "cwd": os.getcwd(),
            "tempdir": tempfile.gettempdir(),
            "main": getattr(sys.modules["__main__"], "__file__", None),
            "stdout": [sys.__stdout__.isatty(), sys.__stdout__.line_buffering, sys.__stdout__.encoding],
            "draws": [random.random(), float(numpy.random.random()), torch.rand(1).item()],
        }
        with open(os.environ["PROBE_OUT"], "w") as out:
            json.dump(state, out)

    def test_2_breakpoint():
        x = 42
        breakpoint()
        assert x == 43

    def test_3_warning():
        warnings.warn("warm-probe: an error under PYTHONWARNINGS=error:warm-probe")
"""
INFERENCE = """
    import os
    import pytest
    import torch
    from app.services.ml_classification_service import MLClassificationService

    @pytest.mark.use_real_models
    def test_5_inference(test_db):
        assert torch.get_num_threads() > 1 or os.cpu_count() == 1
        texts = ["The striker scored a goal"] * 4 + ["Bake the bread in a hot oven"] * 4
        labels = [r.top.label for r in MLClassificationService(test_db).predict_batch(texts)]
        assert labels == ["sports"] * 4 + ["cooking"] * 4
"""
#: The keys: breakpoint(), then --pdb's post-mortem of test_3.
KEYS = "x = 43\nc\np 6*7\nc\n"


def probing_state() -> None:
    """The probing caller's process: other than the server's (started by a plain run)."""
    os.umask(0o077)
    os.nice(3)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_probes_give_the_same_results_cold_and_warm(ml_tree, tmp_path, monkeypatch):
    ml_tree.write("integration/test_probes.py", PROBES)
    ml_tree.write("integration/test_probes_inference.py", INFERENCE)
    warm_dir = tmp_path / "warm"
    env = {
        # As a shell has it: the offline variables are what the plugin sets during each run.
        **{name: value for name, value in os.environ.items() if name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")},
        "ML_WARM_DIR": str(warm_dir),
        "ML_WARM_PRELOAD": "torch,transformers,transformers.models.bert.modeling_bert,huggingface_hub,sqlalchemy",
        "PYTHONDONTWRITEBYTECODE": "",
    }
    monkeypatch.setenv("ML_WARM_DIR", str(warm_dir))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]

    out = tmp_path / "probe.json"  # the same for every run: the environments must be equal
    reports = []

    def run(*args: str, silent_client: bool = False, inference: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
        out.unlink(missing_ok=True)
        ml_tree.report.unlink(missing_ok=True)
        silent = protocol.connect(next(warm_dir.glob("server-*.sock")), timeout=5) if silent_client else None
        try:
            done = subprocess.run(
                [*command, "--pdb", f"--ml-model-report={ml_tree.report}", "integration/test_probes.py", *args,
                 *(["integration/test_probes_inference.py"] if inference else [])], cwd=ml_tree.root, input=KEYS,
                capture_output=True,
                text=True, timeout=300, preexec_fn=probing_state,
                env={**env, "PROBE_OUT": str(out), "PYTHONWARNINGS": "error:warm-probe"},
            )  # fmt: skip
        finally:
            if silent is not None:
                silent.close()
        assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
        reports.append(ml_tree.loads())
        return done, json.loads(out.read_text())

    try:
        # The server starts (and imports) while the cold run runs.
        start = subprocess.Popen(
            [*command, "--ml-warm", "--collect-only", "-q", "integration"], cwd=ml_tree.root, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        cold = run()
        output, errors = start.communicate(timeout=300)
        assert "ml-warm: starting a warm server" in errors, output + errors
        first, again = run("--ml-warm", inference=True), run("--ml-warm", silent_client=True)
    finally:
        lifecycle.stop()
    for (done, _), passed in zip((cold, first, again), (2, 3, 2)):
        assert done.returncode == 1 and f" 1 failed, {passed} passed in " in done.stdout, done.stdout[-3000:]
        assert "(Pdb) 42" in done.stdout and "UserWarning: warm-probe" in done.stdout
        assert "ml-warm" not in done.stderr, done.stderr
    assert reports[0].keys() == reports[1].keys() == reports[2].keys()  # the same load report
    assert [report["loads"] for report in reports] == [0, 1, 0]
    (_, cold_state), (_, first_state), (_, again_state) = cold, first, again
    assert cold_state["hub_offline"] is True and cold_state["umask"] == 0o077 and cold_state["nofile"][0] == 512
    assert cold_state["sigint"] == str(signal.SIG_IGN) and cold_state["nice"] == os.getpriority(os.PRIO_PROCESS, 0) + 3
    draws = [state.pop("draws") for state in (cold_state, first_state, again_state)]
    first_state["argv"].remove("integration/test_probes_inference.py")
    for state in (first_state, again_state):
        state["argv"].remove("--ml-warm")  # the one difference asked for
        assert difference(state, cold_state) == {}
    for generator in range(3):  # random, numpy's global RandomState, torch's default generator
        assert len({run[generator] for run in draws}) == 3, draws


def difference(warm_state: dict, cold_state: dict) -> dict:
    """What differs, key by key (one level into the environment)."""
    differing = {
        key: (warm_state.get(key), cold_state.get(key))
        for key in {*warm_state, *cold_state}
        if warm_state.get(key) != cold_state.get(key)
    }
    if "environ" in differing:
        warm_env, cold_env = differing.pop("environ")
        differing |= {
            f"${name}": (warm_env.get(name), cold_env.get(name))
            for name in {*warm_env, *cold_env}
            if warm_env.get(name) != cold_env.get(name)
        }
    return differing
