"""Where the tokens of one forward pass stand, per row.

Inside the model every row is "compacted": its real tokens start at column 0 (left padding moves to the end), and
positions count real tokens only, so pads never write into the memory nor take attention, and every chunk and
segment boundary counts from the row's own first real token (`docs/design.md`, padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenInfo:
    """Positions and validity of the tokens of one forward pass (compact layout: real tokens first)."""

    positions: torch.Tensor  # (batch, T) long: index of the token among its row's real tokens
    valid: torch.Tensor  # (batch, T) bool: real token (False for padding)
    seen: torch.Tensor  # (batch,) real tokens written before this pass
    all_valid: bool  # no padding at all (lets the hot path skip masking)

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
        return TokenInfo(self.positions[:, start:end], valid, seen, self.all_valid)

    def closes_block(self, block_size: int) -> torch.Tensor:
        """(batch,) bool: the row wrote a token in this pass and its last one ends a block of `block_size`."""
        return (self.lengths > 0) & (self.next_position % block_size == 0)


def shift_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[r, t] = x[r, t - shift[r]] (zero where that falls outside): moves each row along dim 1."""
    if not bool(shift.any()):
        return x
    seq_len = x.shape[1]
    source = torch.arange(seq_len, device=x.device)[None, :] - shift[:, None]
    inside = (source >= 0) & (source < seq_len)
    index = source.clamp(0, seq_len - 1)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.gather(1, index)
    inside = inside.view(*inside.shape, *([1] * (x.dim() - 2)))
    return out * inside if out.dtype != torch.bool else out & inside
