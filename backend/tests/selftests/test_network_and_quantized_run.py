"""Network off in the unit trees (pytest-socket, HF_HUB_OFFLINE), and the integration tree under int8."""

import os
import subprocess
import sys

from ml_fixtures import scaffold

NETWORK = """
    import os
    import socket

    import pytest
    from pytest_socket import SocketBlockedError

    def test_offline_and_no_sockets():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        with pytest.raises(SocketBlockedError):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
"""


def test_unit_trees_have_no_network_and_integration_keeps_it(ml_tree):
    ml_tree.write("unit/test_unit_network.py", NETWORK)
    ml_tree.write("services/test_services_network.py", NETWORK)
    ml_tree.write(
        "integration/test_integration_network.py",
        """
        import socket

        def test_sockets_work():
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        """,
    )
    ml_tree.run().assert_outcomes(passed=3)


def test_the_integration_tree_passes_on_int8_models(tmp_path):
    report = tmp_path / "int8.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(scaffold.TESTS / "integration"),
         "--ml-quantize=int8", f"--ml-model-report={report}"],
        cwd=scaffold.REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(scaffold.python_path())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "failed" not in done.stdout.splitlines()[-1] and "skipped" not in done.stdout.splitlines()[-1]
    assert "BAAI/bge-m3 [auto, int8]" in report.read_text()
