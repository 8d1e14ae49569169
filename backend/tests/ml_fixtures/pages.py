"""Which weights were written, exactly: pages of the model files that are no longer the files' pages.

The loaders memory-map the weight files privately (copy on write): ``model.safetensors`` through
transformers, FlagEmbedding's ``colbert_linear.pt`` and ``sparse_linear.pt`` through
``torch.load(mmap=True)``. The first write to any byte of such a page gives the process a private,
anonymous copy of that 4 KiB page, whatever wrote it (``w.data[r, c] += 5`` included). The kernel says
which pages of an address range are anonymous: the ``PAGEMAP_SCAN`` ioctl on ``/proc/self/pagemap``
(Linux 6.7+) returns only those, and older kernels give the same answer as one 64-bit entry per page
of ``/proc/self/pagemap`` (bit 63 present, bit 62 swapped, bit 61 file page).

:class:`FileBackedWeights` finds the mappings that hold each tensor's bytes, and after a test names
the tensors whose bytes lie on a page written since the snapshot. Tensors outside any file mapping
(buffers made at load, int8 or CUDA copies), or on a page that was already anonymous at the snapshot,
get a :class:`Checksums` entry instead.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import sys
from collections.abc import Iterable
from enum import Enum
from typing import Any, NamedTuple

PAGE = os.sysconf("SC_PAGE_SIZE")
PAGEMAP = "/proc/self/pagemap"

# <linux/fs.h>: struct pm_scan_arg, struct page_region, the categories and the ioctl number.
PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED = 1 << 2, 1 << 3, 1 << 4
# A pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
ENTRY_PRESENT, ENTRY_SWAPPED, ENTRY_FILE = 1 << 63, 1 << 62, 1 << 61


class _ScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size flags start end walk_end vec vec_len max_pages "
            "category_inverted category_mask category_anyof_mask return_mask"
        ).split()
    ]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_LIBC = ctypes.CDLL(None, use_errno=True)
_IOC_READ_WRITE = 3
PAGEMAP_SCAN = (_IOC_READ_WRITE << 30) | (ctypes.sizeof(_ScanArg) << 16) | (ord("f") << 8) | 16
_REGIONS = 256


class Method(Enum):
    """How written pages are asked for."""

    SCAN = "PAGEMAP_SCAN ioctl"
    READ = "/proc/self/pagemap entries"


def written_pages(ranges: Iterable[tuple[int, int]], method: Method) -> list[tuple[int, int]]:
    """The runs ``(start, end)`` of anonymous pages (written copies, present or swapped) in ``ranges``."""
    ranges = list(ranges)
    if not ranges:
        return []
    fd = os.open(PAGEMAP, os.O_RDONLY)
    try:
        read = _scan if method is Method.SCAN else _read
        return [run for start, end in ranges for run in read(fd, start, end)]
    finally:
        os.close(fd)


def _scan(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    regions = (_Region * _REGIONS)()
    runs = []
    while start < end:
        arg = _ScanArg(
            size=ctypes.sizeof(_ScanArg),
            start=start,
            end=end,
            vec=ctypes.addressof(regions),
            vec_len=_REGIONS,
            # Not a file page, and present or swapped out: a page copied on write.
            category_inverted=PAGE_IS_FILE,
            category_mask=PAGE_IS_FILE,
            category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask=PAGE_IS_FILE,
        )
        found = _LIBC.ioctl(fd, PAGEMAP_SCAN, ctypes.byref(arg))
        if found < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"PAGEMAP_SCAN: {os.strerror(code)}")
        runs += [(regions[i].start, regions[i].end) for i in range(found)]
        start = arg.walk_end
    return runs


def _read(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    import numpy as np

    entries = np.frombuffer(os.pread(fd, (end - start) // PAGE * 8, start // PAGE * 8), dtype=np.uint64)
    copied = ((entries & np.uint64(ENTRY_PRESENT | ENTRY_SWAPPED)) != 0) & ((entries & np.uint64(ENTRY_FILE)) == 0)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], copied.view(np.int8), [0]))))
    return [(start + int(a) * PAGE, start + int(b) * PAGE) for a, b in zip(edges[::2], edges[1::2])]


def best_method() -> Method | None:
    """``PAGEMAP_SCAN`` where the kernel has it (6.7+), else reading pagemap entries; None where
    there is no ``/proc/self/pagemap`` (not Linux): then every tensor is checksummed."""
    if not os.path.exists(PAGEMAP):
        return None
    probe = ctypes.create_string_buffer(PAGE)
    start = ctypes.addressof(probe) // PAGE * PAGE
    try:
        written_pages([(start, start + PAGE)], Method.SCAN)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return Method.READ
        raise
    return Method.SCAN


class Mapping(NamedTuple):
    start: int
    end: int
    offset: int  # in the file
    path: str


def private_file_mappings() -> list[Mapping]:
    """This process's private mappings of files (``/proc/self/maps``), by address."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[1][3] == "p" and fields[4] != "0" and fields[5].startswith("/"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                found.append(Mapping(start, end, int(fields[2], 16), fields[5].rstrip("\n")))
    return sorted(found)


def byte_span(tensor: Any) -> tuple[int, int]:
    """The addresses ``[start, end)`` that hold a tensor's elements (strided tensors included)."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()


def _pages(start: int, end: int) -> tuple[int, int]:
    return start // PAGE * PAGE, -(-end // PAGE) * PAGE


class FileBackedWeights:
    """The tensors held in private file mappings, and which of them a write has reached since the snapshot."""

    def __init__(self, tensors: list[Any], method: Method | None):
        self.method = method
        mappings = private_file_mappings() if method is not None else []
        starts = [mapping.start for mapping in mappings]
        spans = []  # (start, end, index) of the tensors inside a mapping
        self.outside: list[int] = []  # the indices of the other tensors
        self.mapping_of: dict[int, Mapping] = {}  # the mapping that holds each mapped tensor
        for i, tensor in enumerate(tensors):
            start, end = byte_span(tensor) if tensor.is_cpu and tensor.data_ptr() else (0, 0)
            m = bisect.bisect_right(starts, start) - 1
            if start < end and m >= 0 and end <= mappings[m].end:
                spans.append((start, end, i))
                self.mapping_of[i] = mappings[m]
            elif start < end or not (tensor.is_cpu or tensor.is_meta):
                self.outside.append(i)
        self.ranges = _merged([_pages(start, end) for start, end, _ in spans])
        # Pages already copied at the snapshot (a loader that wrote into a mapped tensor) prove nothing.
        self.baseline = set(_each_page(written_pages(self.ranges, method)))
        tainted = {
            i for start, end, i in spans if self.baseline and not self.baseline.isdisjoint(_each_page([_pages(start, end)]))
        }
        self.outside += sorted(tainted)
        spans = sorted(span for span in spans if span[2] not in tainted)
        self.starts = [start for start, _, _ in spans]
        self.spans = spans

    @property
    def pages(self) -> int:
        """How many pages one check reads."""
        return sum(end - start for start, end in self.ranges) // PAGE

    def file_name(self, i: int) -> str:
        return os.path.basename(self.mapping_of[i].path)

    def written(self) -> tuple[list[int], list[int]]:
        """The tensors on pages written since the snapshot: those whose bytes now differ from their
        file's, and those whose pages were written with the bytes they had."""
        runs = written_pages(self.ranges, self.method)
        if self.baseline:
            runs = [(page, page + PAGE) for page in _each_page(runs) if page not in self.baseline]
        changed, rewritten = set(), set()
        for run_start, run_end in _merged(runs):
            # Spans may overlap (tied weights share bytes): every one that starts before the run ends.
            on_run = [span for span in self.spans[: bisect.bisect_left(self.starts, run_end)] if span[1] > run_start]
            differ = {i for start, end, i in on_run if self._differs(i, max(start, run_start), min(end, run_end))}
            # Pages written with the bytes they had: the tensors on them, unless a neighbour's change explains them.
            changed |= differ
            rewritten |= set() if differ else {i for _, _, i in on_run}
        return sorted(changed), sorted(rewritten - changed)

    def _differs(self, i: int, start: int, end: int) -> bool:
        """Whether memory ``[start, end)`` of tensor ``i`` differs from its file (a page shared by two
        tensors is copied whichever of them was written)."""
        mapping = self.mapping_of[i]
        try:
            fd = os.open(mapping.path, os.O_RDONLY)
        except OSError:  # the file is gone: the page was written, by all that can be told
            return True
        try:
            for at in range(start, end, _CHUNK):
                size = min(_CHUNK, end - at)
                if ctypes.string_at(at, size) != os.pread(fd, size, mapping.offset + at - mapping.start):
                    return True
            return False
        finally:
            os.close(fd)


_CHUNK = 1 << 20


def _each_page(runs: Iterable[tuple[int, int]]) -> Iterable[int]:
    for start, end in runs:
        yield from range(start, end, PAGE)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class Checksums:
    """A checksum of each given tensor's elements: their bits, as integers of their width, summed
    twice in int64 (wrapping), plainly and weighted by position, so that a change of any one element
    shows, and an exchange of two as well.

    CPU tensors are summed by numpy where they lie (no copy), the others by torch on their device:
    the same sums (``selftests/test_shared_state.py`` compares them).
    """

    def __init__(self, tensors: list[Any], indices: list[int]):
        self.indices = indices
        self.tensors = [tensors[i] for i in indices]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        # CPU elements as numpy arrays over their memory, made once, read only while the tensors keep their storage.
        self.arrays = [_elements(t) if t.is_cpu else None for t in self.tensors]
        self.positions = [_positions(0, a.size) if a is not None and a.size <= _CHUNK_ELEMENTS else None for a in self.arrays]
        self.values = self.compute()

    def compute(self) -> list[tuple[int, int]]:
        return [
            cpu_checksum(array, positions) if array is not None else device_checksum(tensor)
            for tensor, array, positions in zip(self.tensors, self.arrays, self.positions)
        ]

    def changed(self) -> list[int]:
        return [i for i, now, then in zip(self.indices, self.compute(), self.values) if now != then]


_CHUNK_ELEMENTS = 1 << 24  # bounded scratch memory: 128 MiB of int64 at most
_MASK = 2**64 - 1


def _elements(tensor: Any) -> Any:
    """The tensor's memory as a numpy array of integers as wide as its elements (its whole span if strided)."""
    import numpy as np

    start, end = byte_span(tensor)
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[tensor.element_size()]
    return np.frombuffer((ctypes.c_char * (end - start)).from_address(start), dtype=dtype)


def _positions(offset: int, size: int) -> Any:
    import numpy as np

    return np.arange(offset + 1, offset + size + 1, dtype=np.int64)


def cpu_checksum(elements: Any, positions: Any = None) -> tuple[int, int]:
    """The plain and the position-weighted int64 sums of ``elements`` (a numpy integer array);
    ``positions``: the weights of a single chunk, made once."""
    import numpy as np

    plain = weighted = 0
    for offset in range(0, elements.size, _CHUNK_ELEMENTS):
        part = elements[offset : offset + _CHUNK_ELEMENTS].astype(np.int64, copy=False)
        plain += int(part.sum())
        weighted += int(np.dot(part, positions if positions is not None else _positions(offset, part.size)))
    return plain & _MASK, weighted & _MASK


def device_checksum(tensor: Any) -> tuple[int, int]:
    """:func:`cpu_checksum` of ``tensor``'s elements, computed by torch where the tensor lives."""
    torch = sys.modules["torch"]
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    bits = tensor.detach().contiguous().view(-1).view(integer)
    plain = weighted = 0
    for offset in range(0, bits.numel(), _CHUNK_ELEMENTS):
        part = bits[offset : offset + _CHUNK_ELEMENTS].to(torch.int64)
        position = torch.arange(offset + 1, offset + part.numel() + 1, device=part.device, dtype=torch.int64)
        plain += int(part.sum())
        weighted += int((part * position).sum())
    return plain & _MASK, weighted & _MASK
