"""The KV cache's page accounting, apart from the tensors that hold the pages (torch-free, as vLLM's KV manager).

Pages are numbered 0..num_pages-1; page 0 is scratch (rows without a request point at it, so a graph replay over a
bucket with holes writes only memory nobody owns) and is never handed out. Every page handed out carries a
reference count: a request's own pages have one; a later change can let requests share a prompt prefix's pages
(vLLM's prefix caching) by `incref`, and a page goes back to the free list when its count reaches 0.
"""

from __future__ import annotations

from collections.abc import Iterable


class KvPageManager:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"a KV cache needs at least 2 pages (page 0 is scratch), not {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, not {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Popped from the end: the lowest pages go out first, and a freed page is the next one handed out.
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._refs: list[int] = [0] * num_pages

    @property
    def usable_pages(self) -> int:
        """Pages a request can ever hold: all but the scratch page."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_pages(self) -> list[int]:
        """The free list (a copy), next page out last."""
        return list(self._free)

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` tokens."""
        return -(-max(0, tokens) // self.page_size)

    def can_allocate(self, pages: int) -> bool:
        return pages <= len(self._free)

    def allocate(self, pages: int) -> list[int]:
        """`pages` free pages, each with one reference; raises (and takes none) when fewer are free."""
        if pages < 0:
            raise ValueError(f"cannot allocate {pages} pages")
        if pages > len(self._free):
            raise RuntimeError(f"{pages} KV pages asked for, {len(self._free)} free")
        taken = [self._free.pop() for _ in range(pages)]
        for page in taken:
            self._refs[page] = 1
        return taken

    def incref(self, pages: Iterable[int]) -> None:
        """One more owner for pages already handed out (a shared prompt prefix)."""
        for page in pages:
            self._check_owned(page)
            self._refs[page] += 1

    def decref(self, pages: Iterable[int]) -> list[int]:
        """One owner fewer; returns the pages that went back to the free list (count 0), in the order given."""
        freed: list[int] = []
        for page in pages:
            self._check_owned(page)
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
                freed.append(page)
        return freed

    def free(self, pages: Iterable[int]) -> list[int]:
        """A request lets go of its pages: `decref`."""
        return self.decref(pages)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def _check_owned(self, page: int) -> None:
        if not 0 < page < self.num_pages:
            raise ValueError(f"page {page} is not a handed-out page (1..{self.num_pages - 1})")
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is free")
