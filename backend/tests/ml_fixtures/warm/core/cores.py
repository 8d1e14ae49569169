"""The board of a warm server's runs in progress, from which each child takes its share of the CPUs:
run in the server (which makes the board and keeps a slot per child) and in its children (which
read it between tests).

The board is anonymous shared memory made before the server forks anything, so every child sees
the same pages: one slot per child, the child's pid (written by the server at the fork, cleared at
the reap) and whether it runs models now (written by the child when it first loads one). A child
running models takes ``CPUs // runs running models`` torch threads (at least one): four concurrent
runs on two cores then run one thread each instead of eight threads fighting (OpenMP's spinning
threads make that far worse than the count suggests), and a run alone keeps every core.
"""

from __future__ import annotations

import mmap
import os
import struct

SLOTS = 256
_PID = struct.Struct("i")


class Board:
    """``SLOTS`` pids (4 bytes each), then ``SLOTS`` flags: this slot's child runs models."""

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, SLOTS * (_PID.size + 1))  # MAP_SHARED | MAP_ANONYMOUS: kept across fork
        self.flags = SLOTS * _PID.size

    def free_slot(self) -> int | None:
        """A slot no child holds, or None when all are taken (such a child counts as alone)."""
        return next((slot for slot in range(SLOTS) if self.pid(slot) == 0), None)

    def pid(self, slot: int) -> int:
        return _PID.unpack_from(self.memory, slot * _PID.size)[0]

    def hold(self, slot: int, pid: int) -> None:
        """In the server, once ``pid`` is forked into ``slot``."""
        _PID.pack_into(self.memory, slot * _PID.size, pid)

    def release(self, pid: int) -> None:
        """In the server, when ``pid`` has ended: its slot is free again."""
        for slot in range(SLOTS):
            if self.pid(slot) == pid:
                self.memory[self.flags + slot] = 0
                _PID.pack_into(self.memory, slot * _PID.size, 0)

    def running_models(self, slot: int) -> None:
        """In a child: from now on it runs models (it counts in every child's share)."""
        self.memory[self.flags + slot] = 1

    def runs_with_models(self) -> int:
        return self.memory[self.flags : self.flags + SLOTS].count(1)


#: The server's board: made at its start, inherited by every child (None in any other process).
BOARD: Board | None = None
#: In a child: its slot on the board (None elsewhere, or when the board was full).
SLOT: int | None = None


def share(cpus: int, ceiling: int) -> int | None:
    """This child's torch threads now: ``cpus`` over the runs that run models (this one counted),
    at most ``ceiling`` (an xdist worker's budget); None outside a warm child."""
    if BOARD is None or SLOT is None:
        return None
    BOARD.running_models(SLOT)
    return max(1, min(ceiling, cpus // max(1, BOARD.runs_with_models())))


def runs_with_models() -> int:
    """How many of the server's runs run models now (0 outside a warm child)."""
    return 0 if BOARD is None else BOARD.runs_with_models()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
