"""The neural long-term memory of Titans as a pure PyTorch op: the chunked scan (training, prefill) and the
decoding step, for any `MemoryMLP`.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663 (v1 equation
numbers); `docs/architecture.md` explains the choices. Every token writes into the memory and then reads it:

    surprise    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)    (Eq. 14)
    forgetting  M_t = (1 - alpha_t) M_{t-1} + S_t                         (Eq. 13)
    read        y_t = M_t*(q_t), after the write of x_t                   (Eq. 15)

with the loss l of Eq. 12 (`MemoryMLP.inner_loss`). Gradients are taken at M_{t'}, the weights at the start of
the chunk that holds t (Sec. 3.2, chunks of `chunk_size` tokens). Inside a chunk the recurrence is linear, so
with per-head scalar gates a chunk has a closed form (Eqs. 16-18 with momentum added). Index the chunk's tokens
1..c, let beta_t = prod_{j<=t} (1 - alpha_j), E_t = prod_{j<=t} eta_j and u_i the gradient of token i at M_{t'}:

    S_t = E_t S_0 - sum_{i<=t} theta_i (E_t / E_i) u_i
    M_t = beta_t M_0 + A_t S_0 - sum_{i<=t} C_{t,i} u_i
    A_t = sum_{s<=t} (beta_t / beta_s) E_s,   C_{t,i} = theta_i sum_{s=i..t} (beta_t / beta_s)(E_s / E_i)

Every per-token gradient is an outer product per weight matrix (`MemoryMLP.gradient_factors`), so the reads need
no per-token copy of the weights (`MemoryMLP.chunk_read`) and the end-of-chunk state is one batched matmul per
weight matrix. The outer loss back-propagates through all of it.

Conventions: sequences are (batch, heads, tokens, d_head); gates are (batch, heads, tokens), shared by the memory
network's weight matrices, or (layers, batch, heads, tokens) with one alpha, eta, theta per weight matrix
(per-layer gates: each matrix then follows its own Eqs. 13-14 with its own gates; `ChunkCoefficients.layer`).
Per-channel forgetting: log(1 - alpha) is (batch, heads, tokens, d_out) for a matrix memory, one alpha per output
channel (column of M), so beta and A get a channel axis and C becomes (c, c, d_out) per chunk: the dual form's
reads then weight each channel's scores by its own C (`MemoryMLP.chunk_read`). Only `neural_memory_scan` (autograd)
and the decoding step take such gates; the checkpointed scan's hand-derived backward is written for scalar gates.
All state math runs in fp32 (fp64 when the inputs are fp64, for gradcheck), whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory_network import MemoryMLP, Weights, add_matmul


@dataclass
class MemoryState:
    """Fast weights of every row and head; one tensor per memory layer, (batch, heads, d_in, d_out)."""

    weights: Weights  # M_t, the weights after the last token written
    snapshot: Weights  # M_{t'}, the weights at the start of the current chunk: gradients are taken here
    momentum: Weights | None  # S_t; None when momentum is switched off (eta = 0)

    def map(self, fn) -> "MemoryState":
        """Applies `fn` to every tensor (row selection, device moves)."""
        return MemoryState(
            weights=tuple(fn(w) for w in self.weights),
            snapshot=tuple(fn(w) for w in self.snapshot),
            momentum=None if self.momentum is None else tuple(fn(s) for s in self.momentum),
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the memory math, fp64 only when asked for (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_dtype(dtype, *tensors):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def initial_state(initial_weights, batch_size: int, use_momentum: bool = True) -> MemoryState:
    """M_0 (learned, one per head, shared by the batch) expanded to `batch_size` rows, with S_0 = 0."""
    weights = tuple(
        w.to(compute_dtype(w.dtype)).unsqueeze(0).expand(batch_size, *w.shape) for w in initial_weights
    )
    momentum = tuple(torch.zeros_like(w) for w in weights) if use_momentum else None
    return MemoryState(weights=weights, snapshot=weights, momentum=momentum)


def selects_no_row(condition: torch.Tensor | bool) -> bool:
    """Whether `condition` ((batch,) bool, or one bool for every row) is known to be False for every row without
    stalling: nearly every decoding step no row closes a chunk. On CPU, reading `condition` is free and skips the
    work on the weights; on an accelerator the read would stall the host, and under torch.compile it would break
    the graph, so there this says False and the caller selects."""
    if isinstance(condition, bool):
        return not condition
    return condition.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(condition.any())


def select_rows(condition: torch.Tensor | bool, if_true: Weights, if_false: Weights) -> Weights:
    """Per-row choice between two sets of weights; `condition` is (batch,) bool, or one bool for every row."""
    if isinstance(condition, bool):
        return if_true if condition else if_false
    if selects_no_row(condition):
        return if_false
    mask = condition.view(-1, 1, 1, 1)
    return tuple(torch.where(mask, a, b) for a, b in zip(if_true, if_false))


def bound_scales(weights: Weights, max_norm: float, rows: torch.Tensor | bool = True) -> list[torch.Tensor]:
    """Per weight matrix of every head, (batch, heads, 1, 1): the factor min(1, max_norm / ||W||_F) that projects it
    onto the ball ||W||_F <= `max_norm`; 1 in the rows where `rows` is False."""
    # Clamped after the division: exactly 1 inside the ball (max_norm / max(||W||, max_norm) can round to 1 - 1e-16).
    scales = [(max_norm / w.norm(dim=(-2, -1), keepdim=True)).clamp(max=1.0) for w in weights]
    if isinstance(rows, bool):
        return scales if rows else [torch.ones_like(s) for s in scales]
    return [torch.where(rows.view(-1, 1, 1, 1), s, 1.0) for s in scales]


def bound_norm(weights: Weights, momentum: Weights | None, max_norm: float | None, rows: torch.Tensor | bool = True):
    """Projects each weight matrix of every head onto the ball ||W||_F <= `max_norm` and scales its momentum by the
    same factor (the rows where `rows` is True; None: no bound). The scans and the decoding step call it where a
    chunk closes, after the chunk's reads: the state carried to the next chunk is bounded, whatever the gates do
    (`docs/architecture.md`, "Bounding the weights")."""
    if max_norm is None or selects_no_row(rows):
        return weights, momentum
    scales = bound_scales(weights, max_norm, rows)
    weights = tuple(w * scale for w, scale in zip(weights, scales))
    if momentum is not None:
        momentum = tuple(s * scale for s, scale in zip(momentum, scales))
    return weights, momentum


def _pairwise_decay(log_cumulative: torch.Tensor) -> torch.Tensor:
    """exp(L_t - L_s) for s <= t, 0 above the diagonal: ratios of cumulative products, built in log space."""
    length = log_cumulative.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_cumulative.device).tril()
    diff = log_cumulative.unsqueeze(-1) - log_cumulative.unsqueeze(-2)
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def _subtract_outer_sum(base: torch.Tensor, a: torch.Tensor, g: torch.Tensor, out=None) -> torch.Tensor:
    """base - a^T g over (batch, heads, ...) in one baddbmm (no temporary of the weights' size), into `out`."""
    return add_matmul(base, a.transpose(-1, -2), g, alpha=-1, out=out)


@dataclass
class ChunkCoefficients:
    """The gate algebra of a chunk (depends on the gates only, never on the weights), so the scan computes it for
    every chunk in one batched pass before its sequential loop. Leading dims ([layers,] batch, heads[, chunks]):
    with `per_layer`, a leading axis holds each weight matrix's own coefficients (per-layer gates)."""

    beta: torch.Tensor  # (..., c, 1), per channel (..., c, d_out): beta_t = prod_{j<=t} (1 - alpha_j)
    coeff: torch.Tensor  # (..., c, c), per channel (..., c, c, d_out): C_{t,i}
    carry: torch.Tensor | None  # (..., c, 1), per channel (..., c, d_out): A_t; None without momentum
    surprise: torch.Tensor | None  # (..., c, 1): theta_i E_c / E_i
    eta_total: torch.Tensor | None  # (..., 1, 1): E_c
    per_layer: bool = False
    per_channel: bool = False  # one alpha per output channel: beta, A, C carry a trailing channel axis

    def tensors(self) -> tuple:
        """The five fields in order (None where absent)."""
        return self.beta, self.coeff, self.carry, self.surprise, self.eta_total

    def map(self, fn) -> "ChunkCoefficients":
        """`fn` applied to every field present."""
        fields = (None if f is None else fn(f) for f in self.tensors())
        return ChunkCoefficients(*fields, per_layer=self.per_layer, per_channel=self.per_channel)

    def unbind(self, dim: int) -> list["ChunkCoefficients"]:
        """One `ChunkCoefficients` per index of the chunk dim (unbind's backward is a single stack); `dim` counts
        from the end (of C without its channel axis)."""
        dims = [dim - 1 if self.per_channel and f is self.coeff else dim for f in self.tensors()]
        parts = [None if f is None else f.unbind(d) for f, d in zip(self.tensors(), dims)]
        count = len(parts[0])
        return [
            ChunkCoefficients(*(None if p is None else p[n] for p in parts), self.per_layer, self.per_channel)
            for n in range(count)
        ]

    def layer(self, index: int) -> "ChunkCoefficients":
        """The coefficients that weight matrix `index` of the memory network follows."""
        return self.map(lambda f: f[index]) if self.per_layer else self

    def combine(self, per_layer_grads: list, like: torch.Tensor):
        """One field's gradient from each weight matrix's contribution (0 for none): their sum for shared gates,
        stacked on the layer axis for per-layer gates (`like`: the shape of one layer's contribution)."""
        if not self.per_layer:
            return sum(per_layer_grads)
        return torch.stack([g if torch.is_tensor(g) else torch.zeros_like(like) for g in per_layer_grads])


def gates_per_layer(queries: torch.Tensor, lr: torch.Tensor) -> bool:
    """Whether the gates carry a leading layer axis: (layers, batch, heads, T) against queries (batch, heads, T, d)."""
    return lr.dim() == queries.dim()


def of_layer(gate: torch.Tensor, index: int, per_layer: bool) -> torch.Tensor:
    """Weight matrix `index`'s slice of a gate (all of it for shared gates)."""
    return gate[index] if per_layer else gate


def forgets_per_channel(log_retain: torch.Tensor, lr: torch.Tensor) -> bool:
    """Whether log(1 - alpha) has a channel axis beyond the other gates' shape (per-channel forgetting)."""
    return log_retain.dim() > lr.dim()


def chunk_coefficients(log_retain, log_momentum, lr, write_mask=None, per_layer=False) -> ChunkCoefficients:
    """Gate algebra of the closed form (module docstring) over the last dim, the chunk's tokens.

    log_retain: log(1 - alpha_t); log_momentum: log(eta_t) or None; lr: theta_t; write_mask: 1 for tokens that
    write (masked tokens also get alpha = 0, eta = 1, theta = 0 from `mask_gates`). All (..., c); with
    `per_layer`, the gates' first axis runs over the weight matrices (the mask has none). Per-channel forgetting:
    log_retain is (..., c, d_out).
    """
    if forgets_per_channel(log_retain, lr):
        return _per_channel_coefficients(log_retain, log_momentum, lr, write_mask)
    log_beta = log_retain.cumsum(-1)
    decay = _pairwise_decay(log_beta)  # beta_t / beta_s
    if write_mask is not None:
        decay = decay * write_mask.unsqueeze(-2)  # only writing tokens add S_s into M
    beta = log_beta.exp().unsqueeze(-1)
    if log_momentum is None:  # eta = 0: S_t = -theta_t u_t, so C_{t,i} = theta_i beta_t / beta_i
        return ChunkCoefficients(beta, decay * lr.unsqueeze(-2), None, None, None, per_layer)
    log_eta = log_momentum.cumsum(-1)
    momentum_decay = _pairwise_decay(log_eta)  # E_s / E_i
    coeff = (decay @ momentum_decay) * lr.unsqueeze(-2)  # C_{t,i}
    carry = decay @ log_eta.exp().unsqueeze(-1)  # A_t
    surprise = (lr * momentum_decay[..., -1, :]).unsqueeze(-1)  # theta_i E_c / E_i
    return ChunkCoefficients(beta, coeff, carry, surprise, log_eta[..., -1:].exp().unsqueeze(-1), per_layer)


def _per_channel_coefficients(log_retain, log_momentum, lr, write_mask) -> ChunkCoefficients:
    """`chunk_coefficients` with one alpha per output channel: the channels become a batch axis in front of the
    tokens (the other gates are the same for every channel), then beta, A and C move them to the end."""
    def per_token(x):  # (..., c) -> (..., 1, c): the same for every channel
        return None if x is None else x.unsqueeze(-2)

    channels_first = chunk_coefficients(
        log_retain.transpose(-1, -2), per_token(log_momentum), per_token(lr), per_token(write_mask)
    )
    beta, coeff, carry, surprise, eta_total = channels_first.tensors()
    return ChunkCoefficients(
        beta.squeeze(-1).transpose(-1, -2),  # (..., c, d_out)
        coeff.movedim(-3, -1),  # (..., c, c, d_out)
        None if carry is None else carry.squeeze(-1).transpose(-1, -2),
        None if surprise is None else surprise.squeeze(-3),  # (..., c, 1)
        None if eta_total is None else eta_total.squeeze(-3),
        per_channel=True,
    )


def chunk_update(
    network: MemoryMLP,
    grad_point: Weights,
    weights: Weights,
    momentum: Weights | None,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    coefficients: ChunkCoefficients,
):
    """Writes one chunk of tokens and reads every token's query after its own write.

    Args:
        network: the memory network (its shape and inner loss).
        grad_point: M_{t'}, where every token's gradient is taken (the chunk-start weights).
        weights, momentum: M and S before the first token of the chunk (momentum None: eta = 0).
        queries, keys, values: (batch, heads, c, d_head).
        coefficients: the chunk's gate algebra (`chunk_coefficients`).

    Returns:
        reads (batch, heads, c, d_head) = M_t*(q_t) per token, and M, S after the last token.
    """
    inputs, errors = network.gradient_factors(grad_point, keys, values)
    reads = network.chunk_read(weights, momentum, inputs, errors, queries, coefficients)
    return (reads, *chunk_end_state(weights, momentum, inputs, errors, coefficients))


def chunk_end_state(
    weights: Weights, momentum: Weights | None, inputs, errors, coefficients: ChunkCoefficients, out=None
):
    """M and S after the chunk's last token, from those before its first and the chunk's gradient factors:

        M_c = beta_c M_0 + A_c S_0 - sum_i C_{c,i} a_i^T g_i,   S_c = E_c S_0 - sum_i theta_i (E_c / E_i) a_i^T g_i

    `out` (without autograd): (weights, momentum) tensors per layer that receive M_c and S_c, e.g. the next
    chunk's slots of a segment's stacked states (`chunk_scan._Segment`), which saves a copy of every state.
    """
    out_weights, out_momentum = out or ((None,) * len(weights), (None,) * len(weights))
    new_weights, new_momentum = [], None if momentum is None else []
    for layer, (w, a, g) in enumerate(zip(weights, inputs, errors)):
        own = coefficients.layer(layer)
        decayed = own.beta[..., -1:, :] * w  # beta_c M_0 (per channel: column by column)
        last_coeff = own.coeff[..., -1, :, :] if own.per_channel else own.coeff[..., -1, :].unsqueeze(-1)  # C_{c,i}
        if momentum is not None:
            s = momentum[layer]
            decayed = torch.addcmul(decayed, own.carry[..., -1:, :], s)
            new_momentum.append(_subtract_outer_sum(own.eta_total * s, a, own.surprise * g, out_momentum[layer]))
        new_weights.append(_subtract_outer_sum(decayed, a, last_coeff * g, out_weights[layer]))
    return tuple(new_weights), None if new_momentum is None else tuple(new_momentum)


def mask_gates(log_retain, log_momentum, lr, write_mask):
    """Makes masked tokens (padding) the identity: alpha = 0, eta = 1, theta = 0. `write_mask` is (batch, 1, T)."""
    if write_mask is None:
        return log_retain, log_momentum, lr
    log_retain = log_retain * (write_mask.unsqueeze(-1) if forgets_per_channel(log_retain, lr) else write_mask)
    log_momentum = None if log_momentum is None else log_momentum * write_mask
    return log_retain, log_momentum, lr * write_mask


def neural_memory_scan(
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
):
    """Chunked parallel form for training and prefill (Sec. 3.2): loops over chunks, never over tokens.

    Index 0 must be a chunk boundary of every row (the caller starts each row at a chunk boundary). Padding is
    allowed only after a row's last real token (`write_mask` (batch, T), 1 = real): it is the identity and never
    closes a chunk, so the returned state of every row is the state after its own last token. `max_norm` bounds
    the weights where a chunk closes (`bound_norm`).

    Returns reads (batch, heads, T, d_head) in fp32 (fp64 for fp64 inputs) and the new `MemoryState`.
    """
    dtype = compute_dtype(queries.dtype)
    queries, keys, values, log_retain, log_momentum, lr = _to_dtype(
        dtype, queries, keys, values, log_retain, log_momentum, lr
    )
    mask = None if write_mask is None else write_mask.to(dtype).unsqueeze(1)
    log_retain, log_momentum, lr = mask_gates(log_retain, log_momentum, lr, mask)
    per_layer = gates_per_layer(queries, lr)
    # Per-chunk pieces by split/unbind, not by slicing in the loop: the backward of a slice writes a zero tensor of
    # the full length per chunk (quadratic in T), the backward of split is one concatenation.
    coefficients = _all_chunk_coefficients(log_retain, log_momentum, lr, mask, chunk_size, per_layer)
    chunks = zip(*(x.split(chunk_size, dim=-2) for x in (queries, keys, values)), coefficients)
    weights, momentum, snapshot = state.weights, state.momentum, state.snapshot
    reads, end = [], 0
    for chunk_queries, chunk_keys, chunk_values, chunk_coeffs in chunks:
        chunk_reads, weights, momentum = chunk_update(
            network, snapshot, weights, momentum, chunk_queries, chunk_keys, chunk_values, chunk_coeffs
        )
        reads.append(chunk_reads)
        end += chunk_reads.shape[-2]
        if chunk_reads.shape[-2] == chunk_size:  # a full chunk: the next one takes its gradients here
            closed = True if write_mask is None else write_mask[:, end - 1].bool()
            weights, momentum = bound_norm(weights, momentum, max_norm, closed)
            snapshot = select_rows(closed, weights, snapshot)
    return torch.cat(reads, dim=-2), MemoryState(weights=weights, snapshot=snapshot, momentum=momentum)


def _all_chunk_coefficients(log_retain, log_momentum, lr, mask, chunk_size, per_layer) -> list[ChunkCoefficients]:
    """`chunk_coefficients` of every chunk: the full chunks in one batched pass (gates viewed as
    (batch, heads, chunks, c)), then the shorter last chunk if any."""
    length = lr.shape[-1]
    full = length - length % chunk_size
    # The tokens are the last axis of every gate but a per-channel log_retain's, whose last axis is the channels.
    token_axes = (-2 if forgets_per_channel(log_retain, lr) else -1, -1, -1, -1)
    gates = (log_retain, log_momentum, lr, mask)

    def tokens(x, axis, start, stop):
        return None if x is None else x.narrow(axis, start, stop - start)

    result = []
    if full:
        def as_chunks(x, axis):
            return None if x is None else tokens(x, axis, 0, full).unflatten(axis, (-1, chunk_size))
        result = chunk_coefficients(*map(as_chunks, gates, token_axes), per_layer=per_layer).unbind(-3)
    if full < length:
        tail = (tokens(x, axis, full, length) for x, axis in zip(gates, token_axes))
        result.append(chunk_coefficients(*tail, per_layer=per_layer))
    return result


def neural_memory_step(
    network: MemoryMLP,
    state: MemoryState,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    log_retain: torch.Tensor,
    log_momentum: torch.Tensor | None,
    lr: torch.Tensor,
    closes_chunk: torch.Tensor,
    write_mask: torch.Tensor | None = None,
    max_norm: float | None = None,
):
    """One token per row, for decoding: the same math as a chunk of length one (`chunk_update`), written as the
    plain recurrence because one token needs no dual form:

        S_t = eta_t S_{t-1} - theta_t u_t,   M_t = (1 - alpha_t) M_{t-1} + S_t   (Eqs. 13-14)

    with u_t the gradient at the chunk-start weights M_{t'}; the read M_t*(q_t) then uses the new weights directly
    (one matmul per layer instead of the dual form's three).

    `closes_chunk` (batch,) bool says, per row, whether this token is the last of its chunk; there the weights
    become the gradient point of the next chunk, and `max_norm` bounds them (`bound_norm`), exactly as in
    `neural_memory_scan`. Rows whose `write_mask` (batch,) is False (padding) keep their state.
    """
    queries, keys, values, log_retain, log_momentum, lr = _to_dtype(
        compute_dtype(queries.dtype), queries, keys, values, log_retain, log_momentum, lr
    )
    per_layer = gates_per_layer(queries, lr)
    inputs, errors = network.gradient_factors(state.snapshot, keys, values)  # u_t = a^T g, per layer
    retain = log_retain.exp()  # 1 - alpha_t: (batch, heads, 1, d_out) per channel, a column each
    if not forgets_per_channel(log_retain, lr):
        retain = retain[..., None]  # ([layers,] batch, heads, 1, 1)
    lr = lr[..., None]  # theta_t
    eta = None if state.momentum is None else log_momentum.exp()[..., None]
    weights, momentum = [], None if eta is None else []
    for layer, (w, a, g) in enumerate(zip(state.weights, inputs, errors)):
        own_retain, own_lr = of_layer(retain, layer, per_layer), of_layer(lr, layer, per_layer)
        if eta is None:  # eta = 0: S_t = -theta_t u_t
            weights.append(_subtract_outer_sum(own_retain * w, a, own_lr * g))
        else:
            momentum.append(_subtract_outer_sum(of_layer(eta, layer, per_layer) * state.momentum[layer], a, own_lr * g))
            weights.append(torch.addcmul(momentum[-1], own_retain, w))
    weights, momentum = tuple(weights), None if momentum is None else tuple(momentum)
    reads = network.read(weights, queries)
    if write_mask is not None:
        weights = select_rows(write_mask, weights, state.weights)
        momentum = None if momentum is None else select_rows(write_mask, momentum, state.momentum)
        closes_chunk = closes_chunk & write_mask
    weights, momentum = bound_norm(weights, momentum, max_norm, closes_chunk)
    snapshot = select_rows(closes_chunk, weights, state.snapshot)
    return reads, MemoryState(weights=weights, snapshot=snapshot, momentum=momentum)
