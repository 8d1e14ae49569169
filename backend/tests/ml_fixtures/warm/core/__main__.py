"""The script entry of the warm core: ``python .../warm/core serve SOCKET`` starts a server
(``server.py``), ``python .../warm/core worker SOCKET NOTES ...`` an xdist worker's launcher
(``launcher.py``).

Run as a directory, Python puts it first on ``sys.path``; it goes, so that nothing of the checkout
is importable, and the package is loaded under its private name (``__init__.py``).
"""

import importlib.util
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == here:
    del sys.path[0]
spec = importlib.util.spec_from_file_location("_ml_fixtures_warm_core", os.path.join(here, "__init__.py"))
core = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = core
spec.loader.exec_module(core)

if sys.argv[1:2] == ["serve"]:
    from _ml_fixtures_warm_core import server

    server.main(sys.argv[2])
elif sys.argv[1:2] == ["worker"]:
    from _ml_fixtures_warm_core import launcher

    launcher.main(sys.argv[2:])
else:
    sys.exit(f"usage: {sys.executable} {here} serve SOCKET | worker SOCKET NOTES [NAME=VALUE...] PYTHON-ARGS")
