"""The neural memory written straight from the paper, one token at a time: the reference that the chunked scan
and the decoding step of `neural_memory.py` are tested against. Slow (a Python loop over tokens, autograd for
every inner gradient) and shares nothing with the fast op but the network's forward and loss.

    surprise    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)    (Eq. 14)
    forgetting  M_t = (1 - alpha_t) M_{t-1} + S_t                         (Eq. 13)
    read        y_t = M_t*(q_t), after the write of token t               (Eq. 15)

with t' = t - t mod chunk_size (Sec. 3.2: every gradient of a chunk is taken at the chunk-start weights).
"""

from __future__ import annotations

import torch

from .memory_network import CURVATURE_EPS, MemoryMLP


def naive_token_gradient(network: MemoryMLP, weights, key: torch.Tensor, value: torch.Tensor):
    """grad_M l(M; k, v) (Eq. 12) by autograd. Rows, heads and tokens are independent, so the gradient of the
    loss summed over them is every (row, head)'s own gradient when `key` holds one token.

    With `network.normalize_gradient`, the gradient u is divided by max(1, lambda), lambda = ||u||^2 / ||M(k) - v||^2
    with ||u||^2 summed over the layers' weight matrices: computed here from autograd's gradient, independently of
    the closed form."""
    with torch.enable_grad():
        point = [w.detach().requires_grad_() for w in weights]
        loss = network.inner_loss(point, key, value).sum()
        grads = torch.autograd.grad(loss, point)
    if not network.normalize_gradient:
        return grads
    grad_sq = sum(g.pow(2).sum((-1, -2)) for g in grads)  # (batch, heads)
    error_sq = (network.read(point, key) - value).pow(2).sum((-1, -2))
    scale = (grad_sq / (error_sq + CURVATURE_EPS)).clamp(min=1.0).reciprocal()[..., None, None]
    return tuple(g * scale for g in grads)


def naive_neural_memory(
    network: MemoryMLP, initial_weights, q, k, v, alpha, eta, theta, chunk_size: int, max_norm: float | None = None
):
    """Eqs. 12-15 token by token, gradients at M_{t'} (Sec. 3.2).

    initial_weights: per layer (batch, heads, d_in, d_out); q, k, v: (batch, heads, T, d); alpha, eta, theta:
    (batch, heads, T) (eta = 0 switches momentum off, alpha = 0 forgetting), or (layers, batch, heads, T) for
    per-layer gates: weight matrix l then follows Eqs. 13-14 with alpha[l], eta[l], theta[l]. Per-channel
    forgetting: alpha (batch, heads, T, d_out) of a matrix memory, column o of M decaying by 1 - alpha[..., o].
    `max_norm`: after the read of a chunk's last token, every weight matrix W of a head with ||W||_F > max_norm
    and its momentum are multiplied by max_norm / ||W||_F.
    Returns the reads, the final weights M_T, the snapshot M_{t'} (weights at the start of the current chunk)
    and the momentum S_T.
    """
    weights, momentum, reads = list(initial_weights), [torch.zeros_like(w) for w in initial_weights], []
    snapshot = weights
    for t in range(q.shape[-2]):
        if t % chunk_size == 0:
            snapshot = weights  # M_{t'}
        at = slice(t, t + 1)  # keep a token axis of one: (batch, heads, 1, d)
        grads = naive_token_gradient(network, snapshot, k[..., at, :], v[..., at, :])
        e, th = (gate[..., t, None, None] for gate in (eta, theta))
        if alpha.dim() > theta.dim():  # per-channel forgetting: alpha (batch, heads, T, d_out), a column each
            a = alpha[..., t, None, :]
        else:
            a = alpha[..., t, None, None]
        if theta.dim() == q.dim():  # per-layer gates: one (alpha, eta, theta) per weight matrix
            momentum = [e[n] * s - th[n] * g for n, (s, g) in enumerate(zip(momentum, grads))]  # Eq. 14
            weights = [(1 - a[n]) * w + s for n, (w, s) in enumerate(zip(weights, momentum))]  # Eq. 13
        else:
            momentum = [e * s - th * g for s, g in zip(momentum, grads)]  # Eq. 14
            weights = [(1 - a) * w + s for w, s in zip(weights, momentum)]  # Eq. 13
        reads.append(network.read(weights, q[..., at, :]))  # Eq. 15, after the write
        if max_norm is not None and (t + 1) % chunk_size == 0:
            for n, w in enumerate(weights):
                norm = torch.linalg.matrix_norm(w)[..., None, None]  # Frobenius, per row and head
                factor = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
                weights[n], momentum[n] = w * factor, momentum[n] * factor
    if q.shape[-2] % chunk_size == 0:  # the chunk just closed: the next one starts here
        snapshot = weights
    return torch.cat(reads, -2), weights, snapshot, momentum
