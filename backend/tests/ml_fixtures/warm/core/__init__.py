"""The warm machinery's processes that are not a pytest session: standard library only.

The warm server and the xdist worker launcher start from this directory as a script
(``python .../warm/core serve|worker ...``, see ``__main__.py``), with nothing of the repository
importable: edits to the application and the tests are then always picked up by the runs they
fork. So nothing here imports ``ml_fixtures``, pytest or the checkout (a self-test checks it), and
the modules import each other relatively.

Every process loads this package under one private name, :data:`NAME`: the script's bootstrap and
the pytest side (``ml_fixtures.warm.load_core``) alike. A child forked from the server therefore
holds one copy of it, the server's: the pytest side there knows the objects the child was made with.

- ``protocol``: the socket directory, the server's files, the framed JSON messages (caller, server, launcher);
- ``identity``: what a server must share with its callers, and its manifest (caller and server);
- ``server``: the server's loop: accept, read, fork, reap (the server);
- ``child``: what a forked child does to become the caller's process and run (the forked child);
- ``caller``: the caller's state sent to the server, and its signals and exit while a child runs (caller, launcher);
- ``launcher``: an xdist worker's interpreter, forked from the server (the launcher).
"""

#: The name under which every process imports this package (never ``ml_fixtures.warm.core``).
NAME = "_ml_fixtures_warm_core"
