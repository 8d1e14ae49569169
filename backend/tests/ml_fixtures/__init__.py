"""Machinery behind the ML fixtures in ``backend/tests/conftest.py``.

One concern a module: ``options`` (command-line options), ``catalog`` (the models and
their services), ``pool`` (the shared model pool), ``mutation`` (noticing a test that changed
a pooled model, and restoring it), ``pages`` (which weight pages were written), ``load_report`` (the load report), ``fakes`` (fake models), ``guard`` (the
blocker of real loads in unit trees), ``cassettes`` (recorded model responses), ``scaffold``
(throwaway trees for self-tests and the benchmark), ``plugin`` (the pytest hooks that wire them
together). Nothing here imports torch, transformers or FlagEmbedding; the real loaders do, when a
test needs a real model.
"""
