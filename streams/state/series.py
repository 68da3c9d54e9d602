"""In-memory series a long run keeps, bounded at any age: the figures they give stay those of
the whole run (exact for recent parts, within a stated resolution for old ones).

- `FlagSeries`: one flag per scored trajectory (selected or not): the count, the share of any
  span. The newest `tail` flags are kept as they are; older ones as running counts every
  `stride` flags, the stride doubling whenever more than `marks` counts pile up.
- `ThinnedList`: points of a curve; past `cap` points every other older point is dropped, so
  the curve keeps its shape (first and newest points stay) in bounded memory.
- `KeepFirstAndLast`: a dict by increasing key (e.g. version) keeping the first key and the
  newest `keep` ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class FlagSeries:
    def __init__(self, tail: int = 4096, marks: int = 2048):
        self.n = 0  # flags appended over the run
        self.selected = 0
        self.tail: deque[int] = deque(maxlen=tail)
        self.max_marks, self.stride = marks, 1
        self.marks: list[int] = []  # marks[i]: selected among the first (i + 1) * stride flags

    def append(self, flag: int | bool) -> None:
        flag = int(bool(flag))
        self.n += 1
        self.selected += flag
        self.tail.append(flag)
        if self.n % self.stride == 0:
            self.marks.append(self.selected)
            if len(self.marks) > self.max_marks:  # coarser: keep every other count
                self.marks = self.marks[1::2]
                self.stride *= 2

    def extend(self, flags: Iterable[int | bool]) -> None:
        for flag in flags:
            self.append(flag)

    def __len__(self) -> int:
        return self.n

    def _prefix(self, x: int) -> float:
        """Selected among the first x flags: exact in the tail and on a mark, else interpolated."""
        x = max(0, min(x, self.n))
        start_of_tail = self.n - len(self.tail)
        if x >= start_of_tail:
            return self.selected - sum(list(self.tail)[x - start_of_tail:])
        i, rest = divmod(x, self.stride)
        lo = self.marks[i - 1] if i else 0
        hi = self.marks[i] if i < len(self.marks) else self.selected
        return lo + (hi - lo) * rest / self.stride

    def share(self, part: slice) -> float | None:
        """The selected share of a span of the run, as `flags[part]` would give it."""
        start, stop, _ = part.indices(self.n)
        if stop <= start:
            return None
        return round((self._prefix(stop) - self._prefix(start)) / (stop - start), 4)


class ThinnedList(list):
    def __init__(self, cap: int = 2000):
        super().__init__()
        self.cap = cap

    def append(self, item) -> None:
        super().append(item)
        if len(self) > self.cap:
            newest = self[-1]
            self[:] = self[:-1:2] + [newest]  # every other point, the first and the newest kept


class KeepFirstAndLast(dict):
    def __init__(self, keep: int = 64):
        super().__init__()
        self.keep = keep

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if len(self) > self.keep + 1:
            keys = sorted(self)
            for old in keys[1:len(keys) - self.keep]:
                del self[old]
