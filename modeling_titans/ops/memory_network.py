"""The memory network: the small MLP that every head of a neural memory trains while the model reads.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663 (v1 equation
numbers). `docs/design.md` explains each choice made here.

    depth 1        M(x) = x W                                           (a matrix memory, App. C)
    depth L >= 2   M(x) = x + LN(W_L gelu(... gelu(x W_1)))             (Sec. 3.1; NeurIPS Sec. 3.3)
    inner loss     l(M; k, v) = 1/2 ||M(k) - v||^2                      (Eq. 12)

The hidden layers are `expansion` times wider than the head; the LayerNorm has no parameters of its own, so the
weight matrices are the only fast weights. Weights are stored per layer as (..., heads, d_in, d_out) and act on
row vectors (x @ W).

`MemoryMLP` is the one place that knows the network's shape: its forward (`read`), the per-token gradients of
the inner loss (`gradient_factors`) and the per-token reads inside a chunk of writes (`chunk_read`, the "dual
form"). Another memory network or inner loss is a change of this class alone; the scan in `neural_memory.py`
only needs every per-token gradient to be an outer product per weight matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Weights = tuple[torch.Tensor, ...]

LAYER_NORM_EPS = 1e-5


def layer_norm(z: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim, without affine parameters."""
    mean = z.mean(-1, keepdim=True)
    var = (z - mean).pow(2).mean(-1, keepdim=True)
    return (z - mean) * torch.rsqrt(var + LAYER_NORM_EPS)


def gelu_derivative(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


class MemoryInitialWeights(nn.ParameterList):
    """M_0: the learned initial weights of every head, one (heads, d_in, d_out) tensor per layer of the network."""

    @torch.no_grad()
    def reset_parameters(self):
        """M_0 ~ N(0, 1/d_in): a generic MLP initialisation; M_0 is trained as an outer parameter."""
        for weights in self:
            weights.normal_(0.0, weights.shape[1] ** -0.5)


class MemoryMLP(nn.Module):
    """The memory network of one neural-memory layer: one MLP per head. Its parameters are M_0, the learned
    initial weights every sequence starts from (`initial_weights`, one (heads, d_in, d_out) tensor per layer)."""

    def __init__(self, num_heads: int, head_dim: int, depth: int, expansion: int):
        super().__init__()
        dims = [head_dim] + [head_dim * expansion] * (depth - 1) + [head_dim]
        self.initial_weights = MemoryInitialWeights(
            nn.Parameter(torch.empty(num_heads, d_in, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])
        )

    @property
    def depth(self) -> int:
        return len(self.initial_weights)

    def read(self, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        """M*(x): a forward pass of the network with the given fast weights, without writing (Eq. 15)."""
        h = x
        for layer, w in enumerate(weights):
            h = h @ w
            if layer < len(weights) - 1:
                h = F.gelu(h)
        return self._output(x, h)

    def inner_loss(self, weights: Weights, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """l(M; k, v) = 1/2 ||M(k) - v||^2 per token (Eq. 12); `gradient_factors` is its gradient in closed form."""
        return 0.5 * (self.read(weights, keys) - values).pow(2).sum(-1)

    def gradient_factors(self, weights: Weights, keys: torch.Tensor, values: torch.Tensor):
        """Per-token gradients of `inner_loss` with respect to every weight matrix, as outer products.

        Returns (inputs, errors): for layer l, the gradient of token i is inputs[l][..., i, :]^T errors[l][..., i, :].
        Written with ordinary differentiable ops, so the outer loss back-propagates through the inner gradient
        (second-order terms included).
        """
        inputs, pre_activations = [], []
        h = keys
        for layer, w in enumerate(weights):
            inputs.append(h)
            z = h @ w
            pre_activations.append(z)
            h = F.gelu(z) if layer < len(weights) - 1 else z
        error = self._output_error(keys, h, values)
        errors = [error]
        for layer in range(len(weights) - 1, 0, -1):
            error = (error @ weights[layer].transpose(-1, -2)) * gelu_derivative(pre_activations[layer - 1])
            errors.append(error)
        return inputs, errors[::-1]

    def chunk_read(self, weights: Weights, momentum: Weights | None, inputs, errors, queries, coefficients):
        """Every token's read M_t*(q_t) inside a chunk, each after its own write, with matmuls only (the "dual
        form" of TTT): layer by layer, the token's weights are

            W_t = beta_t W_0 + A_t S_0 - sum_{i<=t} C_{t,i} a_i^T g_i

        applied to the read path's activation h_t, so h_t W_t needs h_t W_0, h_t S_0 and the scores h_t a_i^T
        against the chunk's gradient factors (a, g) from `gradient_factors` at the chunk start.
        `coefficients` (a `ChunkCoefficients`) holds beta, A and C.
        """
        beta, coeff, carry = coefficients.beta, coefficients.coeff, coefficients.carry
        h = queries
        for layer, (w, a, g) in enumerate(zip(weights, inputs, errors)):
            z = beta * (h @ w) - (coeff * (h @ a.transpose(-1, -2))) @ g
            if carry is not None:
                z = z + carry * (h @ momentum[layer])
            h = F.gelu(z) if layer < len(weights) - 1 else z
        return self._output(queries, h)

    def _output(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The network's output from its last layer's `h`: h itself (depth 1), else the residual x + LN(h)."""
        return h if self.depth == 1 else x + layer_norm(h)

    def _output_error(self, keys: torch.Tensor, h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """d l / d h for the last layer's output h: the loss error M(k) - v, back through `_output`."""
        if self.depth == 1:
            return h - values
        normed = layer_norm(h)
        out_error = keys + normed - values
        inv_std = torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + LAYER_NORM_EPS)
        return inv_std * (
            out_error - out_error.mean(-1, keepdim=True) - normed * (out_error * normed).mean(-1, keepdim=True)
        )
