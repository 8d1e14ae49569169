"""Machinery behind the ML fixtures in ``backend/tests/conftest.py``.

One concern a module: ``options`` (command-line options), ``catalog`` (the models and
their services), ``pool`` (the shared model pool), ``recorder`` (the load report),
``fakes`` (fake models), ``guard`` (blocking real loads in unit trees), ``cassettes``
(recorded model responses), ``scaffold`` (throwaway trees for self-tests and the benchmark),
``plugin`` (the pytest hooks that wire them together). Nothing here imports torch, transformers
or FlagEmbedding; the real loaders do, when a test needs a real model.
"""
