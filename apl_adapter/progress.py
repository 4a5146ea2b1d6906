"""Progress on long work, counted in the things a person waits for (images), not in batches."""

from __future__ import annotations

from collections.abc import Iterator

from tqdm.auto import tqdm


def batches(
    count: int, size: int, desc: str, unit: str = "image", leave: bool = True, disable: bool = False
) -> Iterator[slice]:
    """Slices of ``range(count)``, at most ``size`` long, behind a bar that counts finished items.

    >>> [(part.start, part.stop) for part in batches(5, 2, "demo", disable=True)]
    [(0, 2), (2, 4), (4, 5)]
    """
    with tqdm(total=count, desc=desc, unit=unit, leave=leave, disable=disable) as bar:
        for start in range(0, count, size):
            part = slice(start, min(start + size, count))
            yield part
            bar.update(part.stop - part.start)
