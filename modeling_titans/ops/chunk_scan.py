"""The chunked scan of `neural_memory.py` for training and prefill, with the memory of its backward pass bounded:
one `torch.autograd.Function` that keeps the fast-weight state only at every k-th chunk boundary and recomputes
the rest in its backward pass.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663 (v1 equation
numbers); the math of a chunk (Eqs. 12-18 with momentum, Sec. 3.2) is `chunk_update` in `neural_memory.py`.

Why: differentiated by plain autograd, `neural_memory_scan` keeps every chunk's state (M, S: per head a copy of
the memory network's weights) and intermediates until backward. Per token that is the state size over the chunk
size, ~64 KiB per layer for the benchmark's memory at chunk 16, several times what the rest of a layer keeps.

How (the checkpointing of linear-attention / test-time-training kernels): the sequence's N chunks are cut into
segments of k chunks (k ~ sqrt(N)). The forward pass runs without autograd and keeps the carried state
(M_{t'}, M, S) at the start of every segment. The backward pass takes the segments in reverse: it reruns one
segment's forward from its saved state with autograd on, and `torch.autograd.grad` takes that segment's
gradients w.r.t. its inputs (q, k, v, the gate coefficients) and its starting state, given the gradients of its
reads and of its end state (carried from the segment after it). Memory: N / k saved states plus one segment's
graph (k chunks); time: one more forward pass of the op. Every gradient is the one of `neural_memory_scan`:
the recomputed segment is the same `chunk_update`, second-order terms of the inner gradient included.

The sequence is padded to whole chunks with identity tokens (alpha = 0, eta = 1, theta = 0, masked out of the
closed form by `chunk_coefficients`), so every chunk has one shape and the gate algebra of all chunks is one
batched pass. The padded tail changes nothing before it (the closed form is causal) and, being the identity, it
leaves the end state at the state after the last real token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .memory_network import MemoryMLP, Weights
from .neural_memory import (
    ChunkCoefficients,
    MemoryState,
    _to_dtype,
    chunk_coefficients,
    chunk_update,
    compute_dtype,
    mask_gates,
)


def checkpointed_memory_scan(
    network: MemoryMLP,
    state: MemoryState,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    log_retain: torch.Tensor,
    log_momentum: torch.Tensor | None,
    lr: torch.Tensor,
    chunk_size: int,
    write_mask: torch.Tensor | None = None,
    segment_chunks: int | None = None,
):
    """`neural_memory_scan` (same arguments, same results and gradients) with bounded backward memory.

    `segment_chunks` is k, the chunks between two saved states (default ceil(sqrt(chunks))); 1 keeps every
    chunk boundary's state (no replay in backward, the most memory).
    """
    dtype = compute_dtype(queries.dtype)
    queries, keys, values, log_retain, log_momentum, lr = _to_dtype(
        dtype, queries, keys, values, log_retain, log_momentum, lr
    )
    length = queries.shape[-2]
    pad = -length % chunk_size
    mask = None if write_mask is None else write_mask.to(dtype)
    if pad:  # identity tokens up to a whole chunk: zero inputs, masked out of the closed form
        queries, keys, values = (F.pad(x, (0, 0, 0, pad)) for x in (queries, keys, values))
        log_retain, log_momentum, lr = (None if x is None else F.pad(x, (0, pad)) for x in (log_retain, log_momentum, lr))
        mask = F.pad(torch.ones_like(queries[:, 0, :length, 0]) if mask is None else mask, (0, pad))
    mask = None if mask is None else mask.unsqueeze(1)  # (batch, 1, T) against the gates' (batch, heads, T)
    log_retain, log_momentum, lr = mask_gates(log_retain, log_momentum, lr, mask)

    def as_chunks(x):  # (batch, heads, T) -> (batch, heads, chunks, c)
        return None if x is None else x.unflatten(-1, (-1, chunk_size))

    coefficients = chunk_coefficients(*(as_chunks(x) for x in (log_retain, log_momentum, lr, mask)))
    num_chunks = queries.shape[-2] // chunk_size
    # Which chunks end on a real token and so close (their end weights become the next gradient point M_{t'}):
    # without padding every one, with padding per row (a (batch,) bool tensor, read by torch.where: no host sync).
    if write_mask is None:
        closes = [True] * (num_chunks - 1) + [pad == 0]
    else:
        closes = list(mask[:, 0, chunk_size - 1 :: chunk_size].bool().unbind(-1))
    segment = segment_chunks or math.ceil(math.sqrt(num_chunks))
    depth = len(state.weights)
    momentum = () if state.momentum is None else state.momentum
    coefficient_tensors = (coefficients.beta, coefficients.coeff, coefficients.carry, coefficients.surprise, coefficients.eta_total)
    outputs = _CheckpointedScan.apply(
        network, chunk_size, closes, segment, depth,
        queries, keys, values, *coefficient_tensors, *state.snapshot, *state.weights, *momentum,
    )
    reads = outputs[0][..., :length, :]
    weights, snapshot, momentum = outputs[1 : 1 + depth], outputs[1 + depth : 1 + 2 * depth], outputs[1 + 2 * depth :]
    return reads, MemoryState(weights=weights, snapshot=snapshot, momentum=momentum or None)


def _after_chunk(closes: bool | torch.Tensor, weights: Weights, snapshot: Weights) -> Weights:
    """M_{t'} after a chunk: its end weights where it closes (per row for a tensor), else unchanged."""
    if closes is True:
        return weights
    if closes is False:
        return snapshot
    row = closes.view(-1, 1, 1, 1)
    return tuple(torch.where(row, w, p) for w, p in zip(weights, snapshot))


def _run_chunks(network, chunk_size, closes, first, state, queries, keys, values, coefficients: list[ChunkCoefficients]):
    """`chunk_update` over consecutive chunks from `state` = (snapshot, weights, momentum or None); chunk `first`
    is the first one's index in `closes`. Returns the reads (one tensor per chunk) and the end state."""
    snapshot, weights, momentum = state
    reads = []
    parts = (x.split(chunk_size, dim=-2) for x in (queries, keys, values))
    for n, (q, k, v, chunk_coefficients) in enumerate(zip(*parts, coefficients), start=first):
        chunk_reads, weights, momentum = chunk_update(network, snapshot, weights, momentum, q, k, v, chunk_coefficients)
        snapshot = _after_chunk(closes[n], weights, snapshot)
        reads.append(chunk_reads)
    return reads, (snapshot, weights, momentum)


class _CheckpointedScan(torch.autograd.Function):
    """Inputs: q, k, v (batch, heads, N c, d) of whole chunks, the five `ChunkCoefficients` fields batched over
    chunks (dim 2; carry, surprise and eta_total None without momentum), then the incoming state's snapshot,
    weights and momentum (one tensor per memory layer; no momentum tensors without momentum).
    Outputs: reads (batch, heads, N c, d), then the end state's weights, snapshot and momentum."""

    @staticmethod
    def forward(ctx, network, chunk_size, closes, segment, depth, queries, keys, values, *tensors):
        coefficient_tensors, states = tensors[:5], tensors[5:]
        coefficients = ChunkCoefficients(*coefficient_tensors).unbind(2)
        state = (states[:depth], states[depth : 2 * depth], states[2 * depth :] or None)
        span = segment * chunk_size
        reads, saved = [], []
        for start in range(0, len(coefficients), segment):
            saved.append(state)
            chunk_reads, state = _run_chunks(
                network, chunk_size, closes, start, state,
                *(x[..., start * chunk_size : start * chunk_size + span, :] for x in (queries, keys, values)),
                coefficients[start : start + segment],
            )
            reads += chunk_reads
        snapshot, weights, momentum = state
        # The snapshot may be the end weights or an input (when no chunk closes); an output of its own must be
        # a tensor of its own.
        snapshot = tuple(p.clone() for p in snapshot)
        ctx.layout = (network, chunk_size, closes, segment, depth, momentum is not None)
        flat_saved = [t for s in saved for part in s if part is not None for t in part]
        ctx.save_for_backward(queries, keys, values, *(t for t in coefficient_tensors if t is not None), *flat_saved)
        ctx.has_coefficient = [t is not None for t in coefficient_tensors]
        ctx.set_materialize_grads(False)  # outputs nobody uses (often the end state) get no backward work
        return (torch.cat(reads, dim=-2), *weights, *snapshot, *(momentum or ()))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_reads, *d_state):
        network, chunk_size, closes, segment, depth, has_momentum = ctx.layout
        saved = list(ctx.saved_tensors)
        queries, keys, values = saved[:3]
        coefficient_tensors = [saved.pop(3) if present else None for present in ctx.has_coefficient]
        per_state = depth * (3 if has_momentum else 2)
        flat = saved[3:]
        checkpoints = [flat[i : i + per_state] for i in range(0, len(flat), per_state)]
        d_weights, d_snapshot, d_momentum = d_state[:depth], d_state[depth : 2 * depth], d_state[2 * depth :]
        # carried gradient of the state at the current segment's end, in the order snapshot, weights, momentum
        d_carry = [*d_snapshot, *d_weights, *d_momentum]
        sequence_grads = [torch.zeros_like(x) for x in (queries, keys, values)]
        coefficient_grads = [None if t is None else torch.zeros_like(t) for t in coefficient_tensors]
        num_chunks = coefficient_tensors[0].shape[2]
        for index in reversed(range(len(checkpoints))):
            start = index * segment
            stop = min(start + segment, num_chunks)
            tokens = slice(start * chunk_size, stop * chunk_size)
            with torch.enable_grad():
                state_leaves = [t.detach().requires_grad_() for t in checkpoints[index]]
                sequence_leaves = [x[..., tokens, :].detach().requires_grad_() for x in (queries, keys, values)]
                coefficient_leaves = [
                    None if t is None else t[:, :, start:stop].detach().requires_grad_() for t in coefficient_tensors
                ]
                state = (state_leaves[:depth], state_leaves[depth : 2 * depth], state_leaves[2 * depth :] or None)
                reads, end = _run_chunks(
                    network, chunk_size, closes, start, state, *sequence_leaves,
                    ChunkCoefficients(*coefficient_leaves).unbind(2),
                )
                end_tensors = [t for part in end if part is not None for t in part]
                outputs = [*reads, *end_tensors]
                read_grads = [None] * len(reads) if d_reads is None else d_reads[..., tokens, :].split(chunk_size, dim=-2)
                grads = [*read_grads, *d_carry]
                keep = [i for i, g in enumerate(grads) if g is not None]
                inputs = [*state_leaves, *sequence_leaves, *(t for t in coefficient_leaves if t is not None)]
                result = torch.autograd.grad(
                    [outputs[i] for i in keep], inputs, [grads[i] for i in keep], allow_unused=True
                )
            d_carry = list(result[: len(state_leaves)])
            rest = list(result[len(state_leaves) :])
            for buffer, grad in zip(sequence_grads, rest[:3]):
                if grad is not None:
                    buffer[..., tokens, :] = grad
            rest = rest[3:]
            for buffer in coefficient_grads:
                if buffer is not None:
                    grad = rest.pop(0)
                    if grad is not None:
                        buffer[:, :, start:stop] = grad
        return (None, None, None, None, None, *sequence_grads, *coefficient_grads, *d_carry)
