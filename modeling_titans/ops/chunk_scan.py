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
(M_{t'}, M, S) at the start of every segment. The backward pass takes the segments in reverse: it replays one
segment's forward from its saved state, keeping each chunk's starting state and intermediates (the "tape"), then
applies hand-derived gradient formulas (`MemoryMLP.chunk_read_backward`, `MemoryMLP.gradient_factors_backward`,
`_end_state_backward`, each deriving its formulas) chunk by chunk in reverse, carrying the gradients of the
state from chunk to chunk. Memory: N / k saved states plus one segment's states and tapes; time: one more forward
pass of the op, and a backward pass without autograd's graph. The gradients are those of `neural_memory_scan`,
second-order terms of the inner gradient included (`tests/test_chunk_scan.py`: float64, 1e-10, and gradcheck).

Fewer, larger kernels: within a segment only the writes are sequential (a chunk's gradients are taken at the
weights its predecessor wrote); given every chunk's starting state, the dual-form reads of all the segment's
chunks, and their backward, are independent, so each runs as one batched call over (batch, heads, chunks).

Compiled steps (`compile_steps`): the per-chunk computations and their backward passes (`ChunkSteps`) can each
run through `torch.compile`. A few compiled graphs per step, reused by every chunk, fuse the elementwise passes over
the state; compiling the whole scan instead would unroll its chunk loop, which takes minutes per sequence length.

The sequence is padded to whole chunks with identity tokens (alpha = 0, eta = 1, theta = 0, masked out of the
closed form by `chunk_coefficients`), so every chunk has one shape and the gate algebra of all chunks is one
batched pass. The padded tail changes nothing before it (the closed form is causal) and, being the identity, it
leaves the end state at the state after the last real token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .memory_network import MemoryMLP, Weights, add_matmul, add_optional
from .neural_memory import (
    ChunkCoefficients,
    MemoryState,
    _to_dtype,
    bound_scales,
    chunk_coefficients,
    chunk_end_state,
    compute_dtype,
    forgets_per_channel,
    gates_per_layer,
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
    max_norm: float | None = None,
    segment_chunks: int | None = None,
    compile_steps: bool = False,
):
    """`neural_memory_scan` (same arguments, same results and gradients) with bounded backward memory.

    `segment_chunks` is k, the chunks between two saved states (default ceil(sqrt(chunks)), which minimises the
    saved plus replayed states); 1 saves every chunk boundary's state (the most memory; the backward pass still
    recomputes each chunk's intermediates from it). `compile_steps` runs the per-chunk steps through
    `torch.compile` (`compiled_chunk_steps`).
    """
    if forgets_per_channel(log_retain, lr):
        raise ValueError("checkpointed_memory_scan takes one alpha per head; per-channel forgetting runs on "
                         "neural_memory_scan")
    dtype = compute_dtype(queries.dtype)
    queries, keys, values, log_retain, log_momentum, lr = _to_dtype(
        dtype, queries, keys, values, log_retain, log_momentum, lr
    )
    length = queries.shape[-2]
    pad = -length % chunk_size
    mask = None if write_mask is None else write_mask.to(dtype)
    if pad:  # identity tokens up to a whole chunk: zero inputs, masked out of the closed form
        queries, keys, values = (F.pad(x, (0, 0, 0, pad)) for x in (queries, keys, values))
        log_retain, log_momentum, lr = (
            None if x is None else F.pad(x, (0, pad)) for x in (log_retain, log_momentum, lr)
        )
        mask = F.pad(torch.ones_like(queries[:, 0, :length, 0]) if mask is None else mask, (0, pad))
    mask = None if mask is None else mask.unsqueeze(1)  # (batch, 1, T) against the gates' (batch, heads, T)
    log_retain, log_momentum, lr = mask_gates(log_retain, log_momentum, lr, mask)
    per_layer = gates_per_layer(queries, lr)

    def as_chunks(x):  # ([layers,] batch, heads, T) -> ([layers,] batch, heads, chunks, c)
        return None if x is None else x.unflatten(-1, (-1, chunk_size))

    gates = (log_retain, log_momentum, lr, mask)
    coefficients = chunk_coefficients(*(as_chunks(x) for x in gates), per_layer=per_layer)
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
    # At a chunk boundary the snapshot is the weights themselves: they go in once (torch.compile traces an
    # autograd.Function only if no tensor repeats among its inputs).
    snapshot_is_weights = all(p is w for p, w in zip(state.snapshot, state.weights))
    snapshot = () if snapshot_is_weights else state.snapshot
    steps = compiled_chunk_steps() if compile_steps else EAGER_STEPS
    outputs = _CheckpointedScan.apply(
        network, steps, chunk_size, closes, max_norm, segment, depth, snapshot_is_weights, per_layer,
        queries, keys, values, *coefficients.tensors(), *snapshot, *state.weights, *momentum,
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


def _after_chunk_backward(closes, d_weights: list, d_snapshot: list):
    """Backward of `_after_chunk`: the snapshot's gradient moves to the end weights where the chunk closes."""
    if closes is False:
        return d_weights, d_snapshot
    if closes is True:
        return [add_optional(w, p) for w, p in zip(d_weights, d_snapshot)], [None] * len(d_snapshot)
    row = closes.view(-1, 1, 1, 1)
    moved = [None if p is None else torch.where(row, p, 0.0) for p in d_snapshot]
    kept = [None if p is None else torch.where(row, 0.0, p) for p in d_snapshot]
    return [add_optional(w, m) for w, m in zip(d_weights, moved)], kept


def _bound_in_place(weights: Weights, momentum: Weights | None, max_norm: float, closes: bool | torch.Tensor):
    """`bound_norm` on the scan's own tensors (no autograd in here), in place. Returns (scales, weights,
    momentum): what `_bound_backward` needs."""
    scales = bound_scales(weights, max_norm, closes)
    for layer, scale in enumerate(scales):
        weights[layer].mul_(scale)
        if momentum is not None:
            momentum[layer].mul_(scale)
    return scales, weights, momentum


def _bound_backward(bound, max_norm: float, d_weights: list, d_momentum: list | None):
    """Backward of `_bound_in_place`, from the bounded state W' = c W, S' = c S. A matrix inside the ball (c = 1)
    passes its gradients through. Outside, c = R / ||W|| depends on W:
        dW = c dW' - (c / R^2) W' (<W', dW'> + <S', dS'>),   dS = c dS'
    (R = `max_norm`; the second term is the radial part the projection removes). Gradients may be None (zero)."""
    if bound is None:
        return d_weights, d_momentum
    scales, weights, momentum = bound
    d_weights, d_momentum = list(d_weights), None if d_momentum is None else list(d_momentum)
    for layer, (scale, w) in enumerate(zip(scales, weights)):
        d_w = d_weights[layer]
        d_s = None if d_momentum is None else d_momentum[layer]
        if d_w is None and d_s is None:
            continue
        pairs = [(w, d_w), (None if momentum is None else momentum[layer], d_s)]
        along = sum(_inner(x, dx) for x, dx in pairs if dx is not None)
        radial = torch.where(scale < 1, scale / max_norm**2, 0.0) * along
        d_weights[layer] = -radial * w if d_w is None else torch.addcmul(scale * d_w, radial, w, value=-1)
        if d_s is not None:
            d_momentum[layer] = scale * d_s
    return d_weights, d_momentum


class _Segment:
    """The forward pass over one segment of consecutive chunks, in two steps: the writes, chunk after chunk (each
    chunk's gradient factors need the weights its predecessor wrote), then the reads of all its chunks at once
    (given every chunk's starting state, the dual-form reads of different chunks are independent), batched over
    a chunk dim placed after (batch, heads).

    Each chunk's end state is written straight into the next chunk's slot of the segment's stacked states (one
    (batch, heads, chunks, d_in, d_out) tensor per memory layer and state), the batched read's input: stacking
    them afterwards would copy every state once more. `chunk_end_state` runs eagerly for that (compiled code
    cannot write into a slot); on CPU, eager into the slot measured faster than compiled plus the copy.

    With `max_norm`, each chunk that closes projects its end state in place (`bound_norm`); `bounds` keeps, per
    chunk, the scales and the bounded state for the projection's backward pass (None where nothing was bounded).

    With `keep_tapes` (the backward pass's replay), it keeps what the backward pass needs: every chunk's starting
    state and `gradient_factors` tape, and the tape of the batched read; it then skips the state after the last
    chunk, which the backward pass does not use unless bounded (`end` is None).
    """

    def __init__(
        self, network, steps, chunk_size, closes, max_norm, first, state, queries, keys, values, coefficients,
        keep_tapes,
    ):
        snapshot, weights, momentum = state
        chunk_coefficients = coefficients.unbind(-3)
        num_chunks = len(chunk_coefficients)
        self.weights = _stacked_slots(weights, num_chunks)
        self.momentum = None if momentum is None else _stacked_slots(momentum, num_chunks)

        def slot(j):  # chunk j's starting (weights, momentum): views into the stacked states
            return (
                tuple(stack[:, :, j] for stack in self.weights),
                None if self.momentum is None else tuple(stack[:, :, j] for stack in self.momentum),
            )

        self.starts, self.factor_tapes, self.bounds = [], [], [None] * num_chunks
        inputs, errors = [], []
        parts = zip(keys.split(chunk_size, dim=-2), values.split(chunk_size, dim=-2), chunk_coefficients)
        for j, (k, v, chunk_coeffs) in enumerate(parts):
            weights, momentum = slot(j)
            self.starts.append((snapshot, weights, momentum))
            tape = {} if keep_tapes else None
            chunk_inputs, chunk_errors = steps.gradient_factors(network, snapshot, k, v, tape)
            inputs.append(chunk_inputs)
            errors.append(chunk_errors)
            self.factor_tapes.append(tape)
            last = j == num_chunks - 1
            bounded = max_norm is not None and closes[first + j] is not False
            if last and keep_tapes and not bounded:
                break
            # Into the next chunk's slots; after the last chunk, tensors of their own (the segment's end, a checkpoint).
            out = None if last else slot(j + 1)
            weights, momentum = chunk_end_state(weights, momentum, chunk_inputs, chunk_errors, chunk_coeffs, out)
            if bounded:  # its backward needs the bounded end state: the replay computes the last chunk's too
                self.bounds[j] = _bound_in_place(weights, momentum, max_norm, closes[first + j])
            snapshot = _after_chunk(closes[first + j], weights, snapshot)
        self.end = None if keep_tapes else (snapshot, weights, momentum)

        def stacked(per_chunk):  # one tensor per memory layer, chunks on dim 2
            return [torch.stack(layer, dim=2) for layer in zip(*per_chunk)]

        self.read_tape = {} if keep_tapes else None
        self.reads = steps.chunk_read(
            network, self.weights, self.momentum, stacked(inputs), stacked(errors),
            queries.unflatten(-2, (-1, chunk_size)), coefficients, self.read_tape,
        ).flatten(2, 3)


def _stacked_slots(start: Weights, num_chunks: int) -> list[torch.Tensor]:
    """Per memory layer, an empty (batch, heads, chunks, d_in, d_out) tensor whose chunk 0 holds `start`."""
    stacks = []
    for w in start:
        stack = w.new_empty(*w.shape[:2], num_chunks, *w.shape[2:])
        stack[:, :, 0] = w
        stacks.append(stack)
    return stacks


class _CheckpointedScan(torch.autograd.Function):
    """Inputs: q, k, v (batch, heads, N c, d) of whole chunks, the five `ChunkCoefficients` fields batched over
    chunks (dim -3; carry, surprise and eta_total None without momentum; a leading layer axis with
    `per_layer`), then the incoming state's snapshot
    (absent when `snapshot_is_weights`), weights and momentum (one tensor per memory layer; no momentum tensors
    without momentum).
    Outputs: reads (batch, heads, N c, d), then the end state's weights, snapshot and momentum."""

    @staticmethod
    def forward(ctx, network, steps, chunk_size, closes, max_norm, segment, depth, snapshot_is_weights, per_layer,
                queries, keys, values, *tensors):
        # Nothing carries a graph in here. Detached (and M_0, which comes expanded over the batch, contiguous), the
        # inputs look alike in training and inference and the incoming state like every later chunk's, so the
        # compiled steps (`compiled_chunk_steps`) need no extra graphs for them.
        queries, keys, values = (x.detach() for x in (queries, keys, values))
        coefficient_tensors, states = tensors[:5], tuple(t.detach().contiguous() for t in tensors[5:])
        if snapshot_is_weights:
            states = (*states[:depth], *states)
        coefficients = ChunkCoefficients(*coefficient_tensors, per_layer=per_layer)
        state = (states[:depth], states[depth : 2 * depth], states[2 * depth :] or None)
        reads, saved = [], []
        for first, tokens, segment_coefficients in _segments(coefficients, segment, chunk_size):
            saved.append(state)
            segment_inputs = (x[..., tokens, :] for x in (queries, keys, values))
            run = _Segment(
                network, steps, chunk_size, closes, max_norm, first, state, *segment_inputs, segment_coefficients,
                keep_tapes=False,
            )
            reads.append(run.reads)
            state = run.end
        snapshot, weights, momentum = state
        # The snapshot may be the end weights or an input (when no chunk closes); an output of its own must be
        # a tensor of its own.
        snapshot = tuple(p.clone() for p in snapshot)
        has_momentum = momentum is not None
        ctx.layout = (
            network, steps, chunk_size, closes, max_norm, segment, depth, has_momentum, snapshot_is_weights, per_layer
        )
        flat_saved = [t for s in saved for part in s if part is not None for t in part]
        ctx.save_for_backward(queries, keys, values, *(t for t in coefficient_tensors if t is not None), *flat_saved)
        ctx.has_coefficient = [t is not None for t in coefficient_tensors]
        ctx.set_materialize_grads(False)  # outputs nobody uses (often the end state) get no backward work
        return (torch.cat(reads, dim=-2), *weights, *snapshot, *(momentum or ()))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_reads, *d_state):
        network, steps, chunk_size, closes, max_norm, segment, depth, has_momentum, snapshot_is_weights, per_layer = (
            ctx.layout
        )
        saved = list(ctx.saved_tensors)
        queries, keys, values = saved[:3]
        coefficient_tensors = [saved.pop(3) if present else None for present in ctx.has_coefficient]
        per_state = depth * (3 if has_momentum else 2)
        flat = saved[3:]
        checkpoints = [tuple(flat[i : i + per_state]) for i in range(0, len(flat), per_state)]  # tuples, as forward's
        if d_reads is None:
            d_reads = torch.zeros_like(queries)
        # gradient of the state after the current chunk: snapshot, weights, momentum (per layer, None for zero)
        d_weights, d_snapshot = list(d_state[:depth]), list(d_state[depth : 2 * depth])
        d_momentum = list(d_state[2 * depth :]) or None
        sequence_grads = [torch.empty_like(x) for x in (queries, keys, values)]
        coefficient_grads = [None if t is None else torch.empty_like(t) for t in coefficient_tensors]
        segments = list(_segments(ChunkCoefficients(*coefficient_tensors, per_layer=per_layer), segment, chunk_size))
        for (first, tokens, coefficients), saved_state in reversed(list(zip(segments, checkpoints))):
            state = (saved_state[:depth], saved_state[depth : 2 * depth], saved_state[2 * depth :] or None)
            segment_inputs = (x[..., tokens, :] for x in (queries, keys, values))
            run = _Segment(
                network, steps, chunk_size, closes, max_norm, first, state, *segment_inputs, coefficients,
                keep_tapes=True,
            )
            # The reads' backward needs no gradient from later chunks: all the segment's chunks at once.
            segment_d_reads = d_reads[..., tokens, :].unflatten(-2, (-1, chunk_size))
            read = steps.chunk_read_backward(
                network, run.weights, run.momentum, run.read_tape, coefficients, segment_d_reads
            )
            read_weights, read_momentum, read_inputs, read_errors, d_queries, d_beta, d_coeff, d_carry = read
            d_surprise = None if coefficients.surprise is None else torch.zeros_like(coefficients.surprise)
            d_eta_total = None if coefficients.eta_total is None else torch.zeros_like(coefficients.eta_total)
            d_keys, d_values = [], []
            keys_parts = keys[..., tokens, :].split(chunk_size, dim=-2)
            chunk_coefficients = coefficients.unbind(-3)
            for j in reversed(range(len(run.starts))):
                snapshot, weights, momentum = run.starts[j]
                d_weights, d_snapshot = _after_chunk_backward(closes[first + j], d_weights, d_snapshot)
                d_weights, d_momentum = _bound_backward(run.bounds[j], max_norm, d_weights, d_momentum)
                read_grads = [
                    None if layers is None else [r[:, :, j] for r in layers]
                    for layers in (read_weights, read_momentum, read_inputs, read_errors)
                ]
                grads = steps.end_state_backward(
                    weights, momentum, run.factor_tapes[j], chunk_coefficients[j], d_weights, d_momentum, read_grads
                )
                d_weights, d_momentum, d_inputs, d_errors, end_coefficient_grads = grads
                d_grad_point, d_k, d_v = steps.gradient_factors_backward(
                    network, snapshot, keys_parts[j], run.factor_tapes[j], d_inputs, d_errors
                )
                d_snapshot = [add_optional(a, b) for a, b in zip(d_snapshot, d_grad_point)]
                d_keys.append(d_k)
                d_values.append(d_v)
                d_beta_end, d_last_coeff, d_carry_end, d_surprise_j, d_eta_total_j = end_coefficient_grads
                d_beta[..., j, -1:, :] += d_beta_end
                d_coeff[..., j, -1:, :] += d_last_coeff
                if momentum is not None:
                    d_carry[..., j, -1:, :] += d_carry_end
                    d_surprise[..., j, :, :] = d_surprise_j
                    d_eta_total[..., j, :, :] = d_eta_total_j
            sequence_grads[0][..., tokens, :] = d_queries.flatten(2, 3)
            sequence_grads[1][..., tokens, :] = torch.cat(d_keys[::-1], dim=-2)
            sequence_grads[2][..., tokens, :] = torch.cat(d_values[::-1], dim=-2)
            chunks = slice(first, first + len(run.starts))
            for buffer, grad in zip(coefficient_grads, (d_beta, d_coeff, d_carry, d_surprise, d_eta_total)):
                if buffer is not None:
                    buffer[..., chunks, :, :] = grad
        if snapshot_is_weights:  # one input, two roles: its gradient is the sum
            d_weights, d_snapshot = [add_optional(w, p) for w, p in zip(d_weights, d_snapshot)], []
        state_grads = (*d_snapshot, *d_weights, *(d_momentum or ()))
        return (None,) * 9 + (*sequence_grads, *coefficient_grads, *state_grads)


def _segments(coefficients: ChunkCoefficients, segment: int, chunk_size: int):
    """(first chunk, token slice, the segment's coefficients) of each segment of `segment` chunks, in order."""
    num_chunks = coefficients.beta.shape[-3]
    for first in range(0, num_chunks, segment):
        chunks = slice(first, min(first + segment, num_chunks))
        part = coefficients.map(lambda f: f[..., chunks, :, :])
        yield first, slice(chunks.start * chunk_size, chunks.stop * chunk_size), part


def _end_state_backward(weights, momentum, tape, coefficients, d_new_weights, d_new_momentum, read_grads):
    """Backward of `chunk_end_state`, added to the chunk's gradients from its reads, `read_grads` = (dW, dS, da, dg)
    per layer (dS None without momentum). With per-(row, head) scalars beta_e = beta_c, A_e = A_c, E = E_c and
    per-token columns c_e = C_{c,:}, sigma = theta_i E_c / E_i (each layer its own with per-layer gates):
        W' = beta_e W + A_e S - a^T (c_e g),   S' = E S - a^T (sigma g)
    so for gradients dW', dS':  dW = beta_e dW',  dS = A_e dW' + E dS',  d beta_e = <W, dW'>,  d A_e = <S, dW'>,
    dE = <S, dS'>,  da = -(c_e g) dW'^T - (sigma g) dS'^T,  dg = -c_e (a dW') - sigma (a dS'),
    d c_e = -rowsum(g (a dW')),  d sigma = -rowsum(g (a dS')).
    Each weight-sized sum is one fused op (addcmul, a dot product as a matmul): on CPU these passes over the state
    cost as much as the chunk's matmuls.

    dW', dS' may be None (zero). Returns (dW, dS, da, dg per layer, (d beta_e, d c_e, d A_e, d sigma, dE)).
    """
    inputs, errors = tape["inputs"], tape["errors"]
    d_weights, d_momentum, d_inputs, d_errors = (None if x is None else list(x) for x in read_grads)
    depth = len(inputs)
    d_beta_end, d_last_coeff, d_carry_end, d_surprise, d_eta_total = ([0] * depth for _ in range(5))
    for layer, (a, g) in enumerate(zip(inputs, errors)):
        own = coefficients.layer(layer)
        last_coeff = own.coeff[..., -1, :].unsqueeze(-1)
        d_new_w = d_new_weights[layer]
        if d_new_w is not None:
            d_weights[layer] = torch.addcmul(d_weights[layer], own.beta[..., -1:, :], d_new_w)
            d_beta_end[layer] = _inner(weights[layer], d_new_w)
            pulled = a @ d_new_w  # a dW'
            d_errors[layer] = torch.addcmul(d_errors[layer], last_coeff, pulled, value=-1)
            d_last_coeff[layer] = -(g * pulled).sum(-1).unsqueeze(-2)
            d_inputs[layer] = add_matmul(d_inputs[layer], last_coeff * g, d_new_w.transpose(-1, -2), alpha=-1)
            if momentum is not None:
                d_momentum[layer] = torch.addcmul(d_momentum[layer], own.carry[..., -1:, :], d_new_w)
                d_carry_end[layer] = _inner(momentum[layer], d_new_w)
        d_new_s = None if d_new_momentum is None else d_new_momentum[layer]
        if d_new_s is not None:
            d_momentum[layer] = torch.addcmul(d_momentum[layer], own.eta_total, d_new_s)
            d_eta_total[layer] = _inner(momentum[layer], d_new_s)
            pulled = a @ d_new_s  # a dS'
            d_errors[layer] = torch.addcmul(d_errors[layer], own.surprise, pulled, value=-1)
            d_surprise[layer] = -(g * pulled).sum(-1, keepdim=True)
            d_inputs[layer] = add_matmul(d_inputs[layer], own.surprise * g, d_new_s.transpose(-1, -2), alpha=-1)
    first = coefficients.layer(0)  # the shapes of one layer's gradients: a scalar, a row or a column per chunk
    scalar, row, column = first.beta[..., -1:, :], first.coeff[..., -1:, :], first.beta
    grads = zip((d_beta_end, d_last_coeff, d_carry_end, d_surprise, d_eta_total), (scalar, row, scalar, column, scalar))
    return d_weights, d_momentum, d_inputs, d_errors, tuple(coefficients.combine(g, like) for g, like in grads)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over the last two dims, kept as (..., 1, 1): a dot product as a matmul (no temporary a * b)."""
    return a.flatten(-2).unsqueeze(-2) @ b.flatten(-2).unsqueeze(-1)


class ChunkSteps(NamedTuple):
    """The scan's per-chunk computations (the memory network's methods take the network first)."""

    gradient_factors: Callable
    chunk_read: Callable
    gradient_factors_backward: Callable
    chunk_read_backward: Callable
    end_state_backward: Callable


EAGER_STEPS = ChunkSteps(
    MemoryMLP.gradient_factors, MemoryMLP.chunk_read, MemoryMLP.gradient_factors_backward,
    MemoryMLP.chunk_read_backward, _end_state_backward,
)


@functools.cache
def compiled_chunk_steps() -> ChunkSteps:
    """`EAGER_STEPS`, each through `torch.compile` (inductor: C++ on CPU, Triton on CUDA). Each compiles on its
    first call and again for each new combination of shapes, present gradients and tape: a few graphs for one
    training shape, more for every further batch size or length. Past `torch._dynamo.config.recompile_limit` (8)
    graphs per step, torch runs new combinations eagerly (with a warning); raise it to train at many shapes."""
    return ChunkSteps(*(torch.compile(step) for step in EAGER_STEPS))
