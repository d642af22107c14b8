"""The memory network: the small MLP that every head of a neural memory trains while the model reads.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663 (v1 equation
numbers). `docs/architecture.md` explains each choice made here.

    depth 1        M(x) = x W                                           (a matrix memory, App. C)
    depth L >= 2   M(x) = x + LN(W_L gelu(... gelu(x W_1)))             (Sec. 3.1; NeurIPS Sec. 3.3)
    inner loss     l(M; k, v) = 1/2 ||M(k) - v||^2                      (Eq. 12)

The hidden layers are `expansion` times wider than the head; the LayerNorm has no parameters of its own, so the
weight matrices are the only fast weights. Weights are stored per layer as (..., heads, d_in, d_out) and act on
row vectors (x @ W).

With `normalize_gradient`, every token's gradient u_i (all layers together) is divided by max(1, lambda_i), the
curvature of the inner loss along u_i itself (a normalised LMS step; `docs/architecture.md`, "The inner step"):

    lambda_i = ||u_i||^2 / ||M(k_i) - v_i||^2,      u_i <- u_i / max(1, lambda_i)

A step theta u_i then removes about theta min(1, lambda_i) of the token's error, whatever the network: a matrix
memory with unit keys has lambda = 1 and is unchanged, while the deep memory's LayerNorm makes lambda ~ 1 / std of
its last layer's output (tens to hundreds), which without the normalisation takes the chunked inner loop out of
its stable region and makes the outer training diverge.

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
CURVATURE_EPS = 1e-12  # keeps lambda_i finite for a token the memory already fits exactly
GELU_RMS = 0.6520  # sqrt(E[gelu(z)^2]) for z ~ N(0, 1)


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
        """M_0 of a matrix memory ~ N(0, 1/d_in), a generic initialisation. A deep memory starts with unit-scale
        pre-activations for the memory's unit-norm keys: layer 1 ~ N(0, 1), later layers
        N(0, 1 / (d_in E[gelu(z)^2])). The generic N(0, 1/d_in) would leave the GELUs in their linear range and the
        LayerNorm's input at std ~0.1, where the inner loss is sharply curved. M_0 is trained as an outer
        parameter either way."""
        deep = len(self) > 1
        for layer, weights in enumerate(self):
            if not deep:
                std = weights.shape[1] ** -0.5
            else:
                std = 1.0 if layer == 0 else 1.0 / (GELU_RMS * weights.shape[1] ** 0.5)
            weights.normal_(0.0, std)


class MemoryMLP(nn.Module):
    """The memory network of one neural-memory layer: one MLP per head. Its parameters are M_0, the learned
    initial weights every sequence starts from (`initial_weights`, one (heads, d_in, d_out) tensor per layer).
    `normalize_gradient`: every token's inner gradient is divided by max(1, its curvature) (module docstring)."""

    def __init__(self, num_heads: int, head_dim: int, depth: int, expansion: int, normalize_gradient: bool = False):
        super().__init__()
        self.normalize_gradient = normalize_gradient
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

    def gradient_factors(self, weights: Weights, keys: torch.Tensor, values: torch.Tensor, tape: dict | None = None):
        """Per-token gradients of `inner_loss` with respect to every weight matrix, as outer products.

        Returns (inputs, errors): for layer l, the gradient of token i is inputs[l][..., i, :]^T errors[l][..., i, :]
        (divided by max(1, lambda_i) with `normalize_gradient`). Written with ordinary differentiable ops, so the
        outer loss back-propagates through the inner gradient (second-order terms included); `tape` (a dict)
        receives what `gradient_factors_backward` needs.
        """
        inputs, pre_activations = [], []
        h = keys
        for layer, w in enumerate(weights):
            inputs.append(h)
            z = h @ w
            pre_activations.append(z)
            h = F.gelu(z) if layer < len(weights) - 1 else z
        error, loss_error = self._output_error(keys, h, values, tape)
        errors, propagated, slopes = [error], [], []
        for layer in range(len(weights) - 1, 0, -1):
            propagated.append(error @ weights[layer].transpose(-1, -2))
            slopes.append(gelu_derivative(pre_activations[layer - 1]))
            error = propagated[-1] * slopes[-1]
            errors.append(error)
        raw_errors = errors[::-1]
        errors, scale, curvature = raw_errors, None, None
        if self.normalize_gradient:
            curvature = token_curvature(inputs, raw_errors, loss_error)
            scale = curvature.clamp(min=1.0).reciprocal()
            errors = [g * scale for g in raw_errors]
        if tape is not None:
            tape.update(
                inputs=inputs, errors=errors, raw_errors=raw_errors, pre_activations=pre_activations,
                propagated=propagated[::-1], slopes=slopes[::-1], loss_error=loss_error, scale=scale,
                curvature=curvature,
            )
        return inputs, errors

    def chunk_read(self, weights: Weights, momentum: Weights | None, inputs, errors, queries, coefficients, tape=None):
        """Every token's read M_t*(q_t) inside a chunk, each after its own write, with matmuls only (the "dual
        form" of TTT): layer by layer, the token's weights are

            W_t = beta_t W_0 + A_t S_0 - sum_{i<=t} C_{t,i} a_i^T g_i

        applied to the read path's activation h_t, so h_t W_t needs h_t W_0, h_t S_0 and the scores h_t a_i^T
        against the chunk's gradient factors (a, g) from `gradient_factors` at the chunk start.
        `coefficients` (a `ChunkCoefficients`) holds beta, A and C (each layer its own with per-layer gates; with
        per-channel forgetting each output channel its own, so C weights the scores channel by channel);
        `tape` (a dict) receives what `chunk_read_backward` needs (scalar gates only).
        """
        h = queries
        layer_inputs, from_weights, from_momentum, scores, pre_activations = [], [], [], [], []
        for layer, (w, a, g) in enumerate(zip(weights, inputs, errors)):
            own = coefficients.layer(layer)
            beta, coeff, carry = own.beta, own.coeff, own.carry
            layer_inputs.append(h)
            from_weights.append(h @ w)
            scores.append(h @ a.transpose(-1, -2))
            if own.per_channel:  # sum_i C_{t,i,o} s_{t,i} g_{i,o}: a (c, c, d_out) product, no matmul
                z = beta * from_weights[-1] - (coeff * scores[-1].unsqueeze(-1) * g.unsqueeze(-3)).sum(-2)
            else:
                z = beta * from_weights[-1] - (coeff * scores[-1]) @ g
            if carry is not None:
                from_momentum.append(h @ momentum[layer])
                z = z + carry * from_momentum[-1]
            pre_activations.append(z)
            h = F.gelu(z) if layer < len(weights) - 1 else z
        if tape is not None:
            tape.update(
                inputs=inputs, errors=errors, read_inputs=layer_inputs, from_weights=from_weights,
                from_momentum=from_momentum, scores=scores, read_pre_activations=pre_activations,
            )
        return self._output(queries, h)

    def gradient_factors_backward(self, weights: Weights, keys, tape: dict, d_inputs, d_errors):
        """Gradients of `gradient_factors`' outputs w.r.t. its inputs: the weights (the gradient point, whose
        second-order terms these are), the keys and the values. `d_inputs` and `d_errors` are per layer, None for
        zero. Returns (d_weights, d_keys, d_values).

        With z_l = x_{l-1} W_l, x_l = gelu(z_l) (x_0 = k), the errors run backwards as
            g_L = dl/dz_L,   g_l = t_l * gelu'(z_l)  with t_l = g_{l+1} W_{l+1}^T,
        so a gradient G_l of g_l gives  dt_l = G_l * gelu'(z_l),  dz_l += G_l * t_l * gelu''(z_l),
        G_{l+1} += dt_l W_{l+1},  dW_{l+1} += dt_l^T g_{l+1}  (l = 1 .. L-1, in this order: g_l needs g_{l+1}).
        Then g_L's gradient goes through the output error (`_output_error_backward`) to z_L, k and v, and the
        z_l's gradients back through the forward pass: dW_l += x_{l-1}^T dz_l, dx_{l-1} = dz_l W_l^T + d a_l.
        With `normalize_gradient`, `_normalization_backward` first turns the gradients of the scaled errors into
        those of the raw ones (and adds the curvature's own terms).
        """
        depth = len(weights)
        inputs, pre, propagated, slopes = tape["inputs"], tape["pre_activations"], tape["propagated"], tape["slopes"]
        errors = tape["raw_errors"]
        d_loss_error = None
        if tape["scale"] is not None:
            d_inputs, d_errors, d_loss_error = _normalization_backward(tape, d_inputs, d_errors)
        d_errors, d_weights = list(d_errors), [None] * depth
        d_pre = [None] * depth
        for layer in range(depth - 1):
            d_error = d_errors[layer]
            if d_error is None:
                continue
            d_propagated = d_error * slopes[layer]
            d_pre[layer] = d_error * propagated[layer] * gelu_second_derivative(pre[layer])
            d_errors[layer + 1] = add_optional(d_errors[layer + 1], d_propagated @ weights[layer + 1])
            d_weights[layer + 1] = d_propagated.transpose(-1, -2) @ errors[layer + 1]
        d_last, d_keys, d_values = self._output_error_backward(tape, d_errors[-1], d_loss_error)
        d_pre[-1] = add_optional(d_pre[-1], d_last)
        for layer in range(depth - 1, -1, -1):
            d_z = d_pre[layer]
            d_weights[layer] = add_matmul(d_weights[layer], inputs[layer].transpose(-1, -2), d_z)
            d_x = add_optional(d_z @ weights[layer].transpose(-1, -2), d_inputs[layer])
            if layer > 0:
                d_pre[layer - 1] = add_optional(d_pre[layer - 1], d_x * slopes[layer - 1])
        return d_weights, add_optional(d_keys, d_x), d_values

    def chunk_read_backward(self, weights: Weights, momentum: Weights | None, tape: dict, coefficients, d_reads):
        """Gradients of `chunk_read`'s reads w.r.t. its inputs. Per layer, z = beta r - (C * s) g + A m with
        r = h W, m = h S, s = h a^T, so for a gradient dz:
            d beta += rowsum(dz * r),  d A += rowsum(dz * m),  dW = h^T (beta dz),  dS = h^T (A dz),
            d(C * s) = -dz g^T:  dC += d(C * s) * s,  ds = d(C * s) * C,  dg = -(C * s)^T dz,
            dh = (beta dz) W^T + (A dz) S^T + ds a,  da = ds^T h,
        and dz of the layer below is dh * gelu'(z). With per-layer gates each layer has its own beta, A, C and
        their gradients come back stacked on the layer axis. Returns (d_weights, d_momentum, d_inputs, d_errors,
        d_queries, d_beta, d_coeff, d_carry); d_momentum and d_carry are None without momentum.
        """
        pre = tape["read_pre_activations"]
        d_z = d_reads if self.depth == 1 else _layer_norm_backward(pre[-1], d_reads)
        depth = len(weights)
        d_weights, d_momentum, d_inputs, d_errors = [None] * depth, [None] * depth, [None] * depth, [None] * depth
        d_beta, d_coeff, d_carry = [0] * depth, [0] * depth, [0] * depth
        for layer in range(depth - 1, -1, -1):
            own = coefficients.layer(layer)
            beta, coeff, carry = own.beta, own.coeff, own.carry
            h, a, g = tape["read_inputs"][layer], tape["inputs"][layer], tape["errors"][layer]
            scores = tape["scores"][layer]
            d_beta[layer] = (d_z * tape["from_weights"][layer]).sum(-1, keepdim=True)
            d_from_weights = beta * d_z
            d_weights[layer] = h.transpose(-1, -2) @ d_from_weights
            d_h = d_from_weights @ weights[layer].transpose(-1, -2)
            if carry is not None:
                d_carry[layer] = (d_z * tape["from_momentum"][layer]).sum(-1, keepdim=True)
                d_from_momentum = carry * d_z
                d_momentum[layer] = h.transpose(-1, -2) @ d_from_momentum
                d_h = d_h + d_from_momentum @ momentum[layer].transpose(-1, -2)
            d_weighted = -(d_z @ g.transpose(-1, -2))
            d_coeff[layer] = d_weighted * scores
            d_scores = d_weighted * coeff
            d_errors[layer] = -((coeff * scores).transpose(-1, -2) @ d_z)
            d_h = d_h + d_scores @ a
            d_inputs[layer] = d_scores.transpose(-1, -2) @ h
            if layer > 0:
                d_z = d_h * gelu_derivative(pre[layer - 1])
        d_queries = d_h if self.depth == 1 else d_h + d_reads
        d_beta, d_coeff = coefficients.combine(d_beta, None), coefficients.combine(d_coeff, None)
        if coefficients.carry is None:
            return d_weights, None, d_inputs, d_errors, d_queries, d_beta, d_coeff, None
        d_carry = coefficients.combine(d_carry, None)
        return d_weights, d_momentum, d_inputs, d_errors, d_queries, d_beta, d_coeff, d_carry

    def _output(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The network's output from its last layer's `h`: h itself (depth 1), else the residual x + LN(h)."""
        return h if self.depth == 1 else x + layer_norm(h)

    def _output_error(self, keys: torch.Tensor, h: torch.Tensor, values: torch.Tensor, tape: dict | None = None):
        """(d l / d h, e): the loss error e = M(k) - v and its gradient at the last layer's output h, back through
        `_output`."""
        if self.depth == 1:
            error = h - values
            return error, error
        mean = h.mean(-1, keepdim=True)
        inv_std = torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + LAYER_NORM_EPS)
        normed = (h - mean) * inv_std
        out_error = keys + normed - values
        mixed = (out_error * normed).mean(-1, keepdim=True)
        if tape is not None:
            tape.update(normed=normed, inv_std=inv_std, mixed=mixed)
        return inv_std * (out_error - out_error.mean(-1, keepdim=True) - normed * mixed), out_error

    def _output_error_backward(self, tape: dict, d_error: torch.Tensor, d_loss_error: torch.Tensor | None = None):
        """Gradients of `_output_error` w.r.t. h, the keys and the values (the LayerNorm's second derivative), for a
        gradient `d_error` of d l / d h and `d_loss_error` (None: zero) of e.

        With n = LN(h) = (h - mean) / s, e = k + n - v, m = mean(e n) and g = (e - mean(e) - n m) / s, a
        gradient G of g gives (the map e -> g is symmetric)
            de = (G - mean(G) - n mean(G n)) / s,   dn = de - (m G + mean(G n) e) / s,   ds = -sum(G g) / s,
        and dh = (dn - mean(dn) - n mean(dn n)) / s + ds n / D (LayerNorm's backward, plus ds/dh = n / D).
        """
        if self.depth == 1:  # g = e = h - v
            d_error = add_optional(d_error, d_loss_error)
            return d_error, None, -d_error
        normed, inv_std, out_error, mixed = tape["normed"], tape["inv_std"], tape["loss_error"], tape["mixed"]
        d_error_normed = (d_error * normed).mean(-1, keepdim=True)
        d_out_error = inv_std * (d_error - d_error.mean(-1, keepdim=True) - normed * d_error_normed)
        d_out_error = add_optional(d_out_error, d_loss_error)
        d_normed = d_out_error - inv_std * (mixed * d_error + d_error_normed * out_error)
        error = tape["raw_errors"][-1]
        d_std_term = -(d_error * error).mean(-1, keepdim=True) * inv_std  # ds / D
        d_h = _layer_norm_backward_normed(normed, inv_std, d_normed) + d_std_term * normed
        return d_h, d_out_error, -d_out_error


def token_curvature(inputs, errors, loss_error: torch.Tensor) -> torch.Tensor:
    """lambda_i = ||u_i||^2 / (||e_i||^2 + eps), shape (..., tokens, 1): u_i the token's gradient over all layers
    (||a^T g||_F = |a| |g| for an outer product) and e_i = M(k_i) - v_i. It is the Rayleigh quotient of J J^T
    along e_i (J the Jacobian of M(k_i) in the weights), the curvature of the inner loss along the token's own
    gradient; a matrix memory with unit keys has lambda = |k|^2 = 1."""
    grad_sq = sum(a.pow(2).sum(-1, keepdim=True) * g.pow(2).sum(-1, keepdim=True) for a, g in zip(inputs, errors))
    return grad_sq / (loss_error.pow(2).sum(-1, keepdim=True) + CURVATURE_EPS)


def _normalization_backward(tape: dict, d_inputs, d_scaled_errors):
    """Backward of the scaling g'_l = s g_l, s = 1 / max(1, lambda) (`token_curvature`), per token. With
    r = sum_l <G'_l, g_l>, the scale's gradient is r and lambda's is c = -r s^2 where lambda > 1 (else 0); with
    lambda = N / D, N = sum_l |a_l|^2 |g_l|^2, D = |e|^2 + eps:
        dg_l = s G'_l + 2 c |a_l|^2 g_l / D,   da_l += 2 c |g_l|^2 a_l / D,   de = -2 c lambda e / D.
    Returns the gradients of the inputs, of the raw errors and of e (None for zero)."""
    scale, curvature, loss_error = tape["scale"], tape["curvature"], tape["loss_error"]
    inputs, raw_errors = tape["inputs"], tape["raw_errors"]
    present = [(g, d) for g, d in zip(raw_errors, d_scaled_errors) if d is not None]
    if not present:
        return d_inputs, d_scaled_errors, None
    d_scale = sum((d * g).sum(-1, keepdim=True) for g, d in present)
    d_curvature = torch.where(curvature > 1.0, -d_scale * scale * scale, 0.0)
    weight = 2.0 * d_curvature / (loss_error.pow(2).sum(-1, keepdim=True) + CURVATURE_EPS)  # 2 c / D
    d_errors = [
        torch.addcmul(scale * _or_zeros(d, g), weight * a.pow(2).sum(-1, keepdim=True), g)
        for a, g, d in zip(inputs, raw_errors, d_scaled_errors)
    ]
    d_inputs = [
        torch.addcmul(_or_zeros(d, a), weight * g.pow(2).sum(-1, keepdim=True), a)
        for a, g, d in zip(inputs, raw_errors, d_inputs)
    ]
    return d_inputs, d_errors, -weight * curvature * loss_error


def gelu_second_derivative(z: torch.Tensor) -> torch.Tensor:
    """d/dz of `gelu_derivative`: 2 pdf(z) - z^2 pdf(z)."""
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return pdf * (2.0 - z * z)


def _layer_norm_backward_normed(normed: torch.Tensor, inv_std: torch.Tensor, d_normed: torch.Tensor) -> torch.Tensor:
    """Backward of `layer_norm` given its output `normed` and 1/std: (dn - mean(dn) - n mean(dn n)) / s."""
    return inv_std * (
        d_normed - d_normed.mean(-1, keepdim=True) - normed * (d_normed * normed).mean(-1, keepdim=True)
    )


def _layer_norm_backward(z: torch.Tensor, d_normed: torch.Tensor) -> torch.Tensor:
    """Backward of `layer_norm` at its input z."""
    mean = z.mean(-1, keepdim=True)
    inv_std = torch.rsqrt((z - mean).pow(2).mean(-1, keepdim=True) + LAYER_NORM_EPS)
    return _layer_norm_backward_normed((z - mean) * inv_std, inv_std, d_normed)


def _or_zeros(gradient, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if gradient is None else gradient


def add_optional(a, b):
    """a + b where None is zero."""
    if a is None:
        return b
    return a if b is None else a + b


def add_matmul(
    base: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """base + alpha x @ y over (batch, heads, ...) in one baddbmm (no temporary of the product's size); a None
    base is zero. `out` (base's shape, a view whose leading dims merge, e.g. one chunk's slot of a stacked
    buffer) receives the result in place; it must not require a gradient."""
    if base is None:
        return x @ y if alpha == 1.0 else alpha * (x @ y)
    if out is not None and torch.compiler.is_compiling():  # dynamo traces no out= into a strided view
        return out.copy_(add_matmul(base, x, y, alpha))
    flat_out = None if out is None else out.view(-1, *out.shape[-2:])  # a view or an error, never a copy
    flat = torch.baddbmm(base.flatten(0, -3), x.flatten(0, -3), y.flatten(0, -3), alpha=alpha, out=flat_out)
    return flat.view(base.shape)
