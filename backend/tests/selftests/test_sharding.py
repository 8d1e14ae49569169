"""CI shards the suite with pytest-split (``--splits N --group k``, by the committed ``.test_durations``):
the groups of the workflow's matrix must run every test once."""

import yaml

from selftests.conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "tests.yml"


def collected(pytester, *args):
    result = pytester.runpytest_inprocess(
        "--collect-only", "-q", "-p", "no:cacheprovider", f"--rootdir={REPO}", "-c", str(REPO / "pytest.ini"),
        f"--durations-path={REPO / '.test_durations'}", str(REPO / "backend" / "tests"), *args,
    )
    assert result.ret == 0, result.stdout.str()[-3000:]
    return [line for line in result.outlines if "::" in line]


def test_the_ci_groups_partition_the_suite(pytester):
    groups = yaml.safe_load(WORKFLOW.read_text())["jobs"]["tests"]["strategy"]["matrix"]["group"]
    splits = len(groups)
    assert splits > 1 and groups == list(range(1, splits + 1))
    everything = collected(pytester)
    shards = [collected(pytester, f"--splits={splits}", f"--group={k}") for k in groups]
    assert all(shards), "every group runs something"
    assert sum(len(shard) for shard in shards) == len(everything), "no test in two groups"
    assert set().union(*shards) == set(everything), "every test in a group"
