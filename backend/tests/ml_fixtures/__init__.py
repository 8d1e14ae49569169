"""An ML fixture library for pytest: real models shared safely, fakes elsewhere, nothing of the app imported.

A project declares its models once (``declaration.py``: ``ModelSpec``, ``ModelCall``, ``Project``)
and returns its ``Project`` from the ``pytest_ml_project`` hook (``hookspecs.py``) in its root
conftest, which assigns each model's fixtures (``fixtures.py``). One concern a module:

- the run: ``plugin`` (the hooks and the run's state), ``options`` (command-line options and settings);
- real models: ``pool`` (the shared model pool), ``load_report`` (the load report), ``guard`` (the
  blocker of real loads in unit trees);
- sharing safely: ``modification`` (a test that changed a pooled model fails), ``mutation`` (what
  changed, per model), ``pages`` (which weight pages were written), ``tokenizer_backend`` and
  ``tokenizer_calls`` (a fast tokenizer's backend, and the state its calls leave);
- fakes and recordings: ``fakes`` (a fake tokenizer for the project's fake models), ``cassettes``
  (recorded model responses), ``keys`` (a call's input as a cassette key, and back);
- trusting recordings: ``drift`` (how a model's outputs compare), ``verify`` (``--ml-record=verify``
  and ``accept``, the drift report), ``usage`` (which entries each test used, what a run selected),
  ``unused`` (the entries no test used, prune, the shards' merge);
- processes: ``parallel`` (xdist workers' thread budget, a memory-aware ``-n auto``), ``warm``
  (``--ml-warm``: a package split by the process that runs each part);
- ``database`` (``test_db``), ``scaffold`` (throwaway trees for self-tests and benchmarks).

Nothing here imports torch, transformers or FlagEmbedding; the project's loaders do, when a test
needs a real model. Importing the package loads the warm machinery's standard-library core under
its private name (``warm/core``), so that every module can import it as ``_ml_fixtures_warm_core``.
"""

from ml_fixtures.warm import load_core

load_core()
