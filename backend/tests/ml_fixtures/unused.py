"""The cassette entries that no test used, and merging the usage files of a split run's shards.

A run that selected every test lists them at its end; ``--ml-record=prune`` removes them when, besides,
every test passed (``usage.Selection``). The shards of a split run (pytest-split's ``--splits N
--group k``) each see a part: each writes its usage with ``--ml-cassette-usage=PATH``, and this
command merges them (with ``backend/tests`` on ``PYTHONPATH``)::

    python -m ml_fixtures.unused usage-*.json [--out merged.json] [--prune] [--cassette-dir DIR]

It says whether the shards together ran every test and all passed, lists the entries none used,
writes the merged usage (``--out``: per test, what it used) and, with ``--prune``, removes the unused
entries, only when the shards together speak for the whole suite. Exit status 0; 1 when it refused
to prune; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ml_fixtures.cassettes import Cassettes
from ml_fixtures.options import RecordMode
from ml_fixtures.usage import EntryRef, prune_refusal, read_usage, write_usage


def unused_lines(unused: list[EntryRef], limit: int | None = None) -> list[str]:
    """The entries no test used, one a line (the first ``limit``)."""
    shown = unused if limit is None else unused[:limit]
    lines = [f"{len(unused)} cassette entries no test used:"]
    lines += [f"  {ref.cassette} ({ref.model}): {ref.key[:80]!r}" for ref in shown]
    if len(shown) < len(unused):
        lines.append(f"  ... and {len(unused) - len(shown)} more (-v lists them all)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ml_fixtures.unused",
        description="Merge the cassette usage files of a split run's shards (--ml-cassette-usage); list, or prune, "
        "the cassette entries that no test used.",
    )
    parser.add_argument("usage", nargs="+", help="the shards' usage files")
    parser.add_argument("--out", help="write the merged usage here (the same format)")
    parser.add_argument(
        "--prune", action="store_true", help="remove the unused entries, if the shards ran every test and all passed"
    )
    parser.add_argument("--cassette-dir", help="the cassettes (default: the directory the usage files name, from here)")
    args = parser.parse_args(argv)
    try:
        usage, selection, directory = read_usage(args.usage)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"cannot read the usage files: {exc}")
    cassettes = Cassettes(Path(args.cassette_dir or directory), RecordMode.PRUNE if args.prune else RecordMode.NONE)
    groups = sorted({group for group, _ in selection.groups})
    where = f" (pytest-split groups {', '.join(map(str, groups))} of {selection.groups[0][1]})" if groups else ""
    print(f"{len(args.usage)} usage files{where}: {len(selection.collected)} tests, {len(usage.used())} cassette entries used")
    if args.out:
        write_usage(args.out, usage, selection, directory)
    reasons = selection.reasons()
    if not selection.selected_all:
        print("together they did not run every test, so no entry is known to be unused: " + "; ".join(reasons))
    else:
        unused = cassettes.unused(usage.used())
        print("\n".join(unused_lines(unused)))
        if reasons:
            print("(" + "; ".join(reasons) + ": an entry only those tests use is listed too)")
    if not args.prune:
        return 0
    if not selection.complete:
        print(prune_refusal(reasons, "--prune"), file=sys.stderr)
        return 1
    cassettes.prune(unused)
    for path in cassettes.save():
        print(f"pruned: {cassettes.relative(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
