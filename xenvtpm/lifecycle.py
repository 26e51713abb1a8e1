"""The one lifecycle shape every resource holder shares (STYLE.md 4).

A class that holds a process, fd, grant, mapping or thread has an idempotent
``close()``; inheriting ``Closeable`` makes it a context manager that calls it, instead
of each class repeating the same ``__enter__``/``__exit__`` pair.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closeable:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
