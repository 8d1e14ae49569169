"""An ML fixture library for pytest: real models shared safely, fakes elsewhere, nothing of the app imported.

A project declares its models once (``declaration.py``: ``ModelSpec``, ``ModelCall``, ``Project``)
and returns its ``Project`` from the ``pytest_ml_project`` hook in its root conftest, which assigns
each model's fixtures (``fixtures.py``). One concern a module: ``options`` (command-line options),
``pool`` (the shared model pool), ``mutation`` (noticing a test that changed a pooled model, and
restoring it), ``pages`` (which weight pages were written), ``load_report`` (the load report),
``fakes`` (a fake tokenizer for the project's fake models), ``guard`` (the blocker of real loads
in unit trees), ``cassettes`` (recorded model responses), ``parallel`` (xdist workers' thread
budget, a memory-aware ``-n auto``), ``database`` (``test_db``), ``warm`` (``--ml-warm``),
``scaffold`` (throwaway trees for self-tests and benchmarks), ``plugin`` (the hooks and the run's
state). Nothing here imports torch, transformers or FlagEmbedding; the project's loaders do, when
a test needs a real model.
"""
