"""Where the tokens of one forward pass stand, per row.

Inside the model every row is "packed": its real tokens come first, in order, and its pads after them (left
padding, right padding, or pads between real tokens alike). Positions count real tokens only, so pads never write
into the memory nor take attention, and every chunk and segment boundary counts from the row's own first real
token (`docs/architecture.md`, padding). `RowPacking` moves rows into that layout and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenInfo:
    """Positions and validity of the tokens of one forward pass (packed layout: real tokens first)."""

    positions: torch.Tensor  # (batch, T) long: index of the token among its row's real tokens
    valid: torch.Tensor  # (batch, T) bool: real token (False for padding)
    seen: torch.Tensor  # (batch,) real tokens written before this pass
    all_valid: bool  # no padding at all (lets the hot path skip masking)
    columns: torch.Tensor  # (batch, T) long: the token's input column, counting every column a cache consumed
    num_columns: int  # input columns so far, this pass's included (the key axis of returned attention weights)
    # The position of the first token when it is known without reading a tensor: every row real and starting there
    # (a fresh pass without padding starts at 0). Then positions are first_position + column, and attention slices
    # its keys with Python ints (no host sync, so `torch.compile` traces the pass in one graph). None otherwise.
    first_position: int | None = None

    @classmethod
    def unpadded(cls, batch_size: int, length: int, device=None) -> "TokenInfo":
        """A fresh pass over `length` real tokens per row, without a cache."""
        positions = torch.arange(length, device=device).expand(batch_size, -1)
        valid = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(positions, valid, seen, True, positions, length, first_position=0)

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    @property
    def next_position(self) -> torch.Tensor:
        """(batch,) the position of each row's next token after this pass."""
        return self.seen + self.lengths

    def slice(self, start: int, end: int) -> "TokenInfo":
        valid = self.valid[:, start:end]
        seen = self.seen + self.valid[:, :start].sum(dim=1)
        first = None if self.first_position is None else self.first_position + start
        return TokenInfo(
            self.positions[:, start:end], valid, seen, self.all_valid, self.columns[:, start:end], self.num_columns,
            first,
        )

    def closes_block(self, block_size: int) -> torch.Tensor | bool:
        """(batch,) bool: the row wrote a token in this pass and its last one ends a block of `block_size`; one
        bool for every row when `first_position` is known."""
        if self.first_position is not None:
            length = self.valid.shape[1]
            return length > 0 and (self.first_position + length) % block_size == 0
        return (self.lengths > 0) & (self.next_position % block_size == 0)


class RowPacking:
    """Packs each row of a (batch, T, ...) input so that its real tokens come first, in order, and unpacks outputs
    back to the input's columns. Rows whose real tokens already come first (no padding, right padding) stay as
    they are; otherwise pads are zero in both layouts."""

    def __init__(self, mask: torch.Tensor, all_valid: bool = False):
        """`mask` (batch, T) bool: True for real tokens; `all_valid`: known to be all True (nothing to check)."""
        self.mask = mask
        as_int = mask.long()
        self.order = None  # order[r, t]: the input column of packed slot t; None: every row is packed already
        self.valid = mask  # (batch, T) bool: real tokens in the packed layout
        packed = all_valid or mask.shape[1] == 1 or bool((as_int.cummin(dim=1).values == as_int).all())
        if not packed:
            self.order = torch.argsort(1 - as_int, dim=1, stable=True)
            self.inverse = torch.argsort(self.order, dim=1)
            self.valid = torch.arange(mask.shape[1], device=mask.device) < as_int.sum(dim=1, keepdim=True)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, T, ...) over the input columns -> the packed layout."""
        if self.order is None:
            return x
        return zero_pads(gather_rows(x, self.order, dim=1), self.valid, dim=1)

    def unpack(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """An output whose `dim` runs over the packed tokens -> the same over the input columns."""
        if self.order is None:
            return x
        return zero_pads(gather_rows(x, self.inverse, dim), self.mask, dim)


def along(t: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """A (batch, T) tensor viewed to broadcast against `x`, whose rows are on dim 0 and T on `dim`."""
    shape = [t.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = t.shape[1]
    return t.reshape(shape)


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """out[r, ..., t, ...] = x[r, ..., index[r, t], ...] along `dim`."""
    return x.gather(dim, along(index, x, dim).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1 :]))


def zero_pads(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """x with the entries where the (batch, T) `mask` is False set to zero."""
    return x * along(mask, x, dim).to(x.dtype)
