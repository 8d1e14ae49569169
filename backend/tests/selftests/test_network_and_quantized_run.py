"""Network off in the unit trees (pytest-socket, HF_HUB_OFFLINE), and the integration tree under int8."""

import pytest

from selftests.conftest import REPO, TESTS

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


@pytest.mark.slow
def test_the_integration_tree_passes_on_int8_models(pytester):
    report = pytester.path / "int8.json"
    result = pytester.runpytest_inprocess(
        "-c", str(REPO / "pytest.ini"), "--rootdir", str(REPO), "-p", "no:cacheprovider",
        str(TESTS / "integration"), "--ml-quantize=int8", f"--ml-model-report={report}",
    )
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes["passed"] >= 30, result.stdout.str()[-3000:]
    assert "failed" not in outcomes and "skipped" not in outcomes
    assert "BAAI/bge-m3 [auto, int8]" in report.read_text()
