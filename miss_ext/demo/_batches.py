"""The demo's training batches, made one at a time when the training loop asks for them."""
from typing import Callable, Iterator

import torch


class TokenBatches:
    """`count` batches of token ids, batch i made by `build(i)` ((batch, seq) int64, on the CPU)
    when it is asked for. Only what picks the sequences (a start and a stride per synthetic
    sequence, an index per user-data sequence) is held up front, not the tokens: building every
    batch first held steps x batch x seq ids, 8 GB at the CLI's limit of a million steps (found
    by a memory review, 2026-12-02). Indexing and iteration give the same tensors every time."""

    def __init__(self, count: int, build: Callable[[int], torch.Tensor]) -> None:
        self._count = count
        self._build = build

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self._count <= i < self._count:
            raise IndexError(f"batch {i} of {self._count}")
        return self._build(i % self._count)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self._build(i) for i in range(self._count))

    def stacked(self) -> torch.Tensor:
        """All batches as one (count, batch, seq) tensor (for tests and small counts)."""
        return torch.stack(list(self))
