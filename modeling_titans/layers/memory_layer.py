"""The neural long-term memory as a layer: projections, convolution and gates around the op (paper Sec. 3.1, 4.4).

    q, k, v = SiLU(causal depthwise conv(Linear(x))), q and k l2-normalised per head
    alpha_t, eta_t, theta_t: per-token, per-head gates from x (forget, momentum, inner learning rate); with
        `memory_per_layer_gates`, one set per weight matrix of the memory network; with
        `memory_forget_per_channel`, one alpha_t per output channel of the (matrix) memory
    (the inner gradient is normalised by its curvature with `memory_normalize_grad`, `ops.memory_network`)
    y_t = M_t*(q_t) after writing (k_t, v_t)                        (`ops.chunk_scan`, `ops.neural_memory`)
    o = W_O(RMSNorm(y) * SiLU(W_G x))

The projections are named `mem_*` so that PEFT can target them apart from attention's `q_proj` etc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.chunk_scan import checkpointed_memory_scan
from ..ops.memory_network import MemoryMLP
from ..ops.neural_memory import MemoryState, compute_dtype, initial_state, neural_memory_scan, neural_memory_step
from .basics import TitansRMSNorm, recompute_in_backward, rms_norm
from .tokens import TokenInfo


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim, in the memory's compute dtype: in fp16 the normalisation's 1e-12 floor
    underflows to 0, and the zero vector of a pad would become 0 / 0 = NaN."""
    return F.normalize(x.to(compute_dtype(x.dtype)), dim=-1)


# The memory's gate modules: alpha_t, eta_t and theta_t / theta_max. Their weights stay in fp32 when a checkpoint
# is loaded in fp16 (`TitansPreTrainedModel._keep_in_fp32_modules`).
MEMORY_GATES = ("forget_gate", "momentum_gate", "lr_gate")


class TitansGate(nn.Linear):
    """Linear map to one gate logit per memory head (and weight matrix, for per-layer gates); `bias_init` is the
    gate's initial value.

    The logits are computed in fp32 whatever the dtype of the input and of the weights (fp64 for fp64 inputs):
    the gates decide how much every token moves the memory, which runs in fp32 too. An adapter (PEFT's LoRA)
    wraps this forward like that of any linear layer, and merging it changes `weight` alone."""

    def __init__(self, hidden_size: int, num_gates: int, initial_value: float):
        super().__init__(hidden_size, num_gates)
        self.bias_init = math.log(initial_value / (1 - initial_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x.dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype))


class ConstantGate(nn.Module):
    """A data-independent gate (`memory_gates_from_input=False`, the paper's ablation of input-dependent gates): one
    learned logit per memory head (and weight matrix), the same for every token; `bias_init` is its initial value."""

    def __init__(self, num_gates: int, initial_value: float):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(num_gates))
        self.bias_init = math.log(initial_value / (1 - initial_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, T, hidden) -> (batch, T, gates) logits in the memory's compute dtype."""
        return self.bias.to(compute_dtype(x.dtype)).expand(*x.shape[:-1], -1)


class MemoryProjection(nn.Linear):
    """q, k or v projection of the memory, initialised at unit scale per output channel (std 1/sqrt(d_in)): the
    memory's own output x + LN(.) has unit-scale channels, so small values would leave the inner loss dominated
    by the LayerNorm branch and the memory would barely store anything at the start of training."""


class CausalDepthwiseConv(nn.Conv1d):
    """Weights of the causal depthwise convolution on the memory's q, k, v (Sec. 4.4), initialised as the identity
    (only the tap on the current token is 1) so that it does not shrink q, k, v at the start of training. It is
    applied by `TitansNeuralMemory.causal_conv`, which keeps the causal tail between calls."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False)


@dataclass
class NeuralMemoryState(MemoryState):
    """What the memory layer carries from one call to the next: the op's state and the convolution's tail."""

    conv_tail: torch.Tensor | None = None  # (batch, kernel - 1, 3 * hidden): last inputs of the causal convolution

    @property
    def memory(self) -> NeuralMemoryState:
        """The layer's memory state under the name the states of MAG, MAL and MAC give it (`state.memory`): a
        memory-only layer's state is the memory's own."""
        return self


class TitansNeuralMemory(nn.Module):
    """The neural long-term memory as a sequence layer (module docstring). Every token writes (k, v) into the
    memory and reads M_t(q_t) after its write; the state after the last token is returned for the next call."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.memory_num_heads
        self.head_dim = config.memory_head_dim
        self.chunk_size = config.memory_chunk_size
        # Gates per head: one set shared by the memory network's weight matrices, or one per matrix.
        self.gate_layers = config.memory_depth if config.memory_per_layer_gates else 1
        hidden = config.hidden_size
        self.mem_q_proj = MemoryProjection(hidden, hidden, bias=False)
        self.mem_k_proj = MemoryProjection(hidden, hidden, bias=False)
        self.mem_v_proj = MemoryProjection(hidden, hidden, bias=False)
        self.conv = CausalDepthwiseConv(3 * hidden, config.conv_kernel_size) if config.use_conv else None
        # alpha_t: per head, or per head and output channel of the memory
        forget_channels = self.head_dim if config.memory_forget_per_channel else 1
        self.forget_gate = self.gate(config.memory_forget_init, forget_channels) if config.use_forgetting else None
        self.momentum_gate = self.gate(config.memory_momentum_init) if config.use_momentum else None  # eta_t
        self.lr_gate = self.gate(config.memory_lr_init)  # theta_t / theta_max
        self.network = MemoryMLP(
            self.num_heads, self.head_dim, config.memory_depth, config.memory_expansion,
            normalize_gradient=config.memory_normalize_grad,
        )
        self.out_norm = TitansRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.writes_enabled = True  # False: the memory state stays as it is (an ablation at test time; not saved)
        self.compile_scan = False  # True: the chunked scan's per-chunk steps run through torch.compile (not saved)
        self.mem_gate_proj = nn.Linear(hidden, hidden, bias=False)
        self.mem_o_proj = nn.Linear(hidden, hidden, bias=False)

    def gate(self, initial_value: float, channels: int = 1) -> nn.Module:
        """One of the memory's gates: a logit per head (and weight matrix, or channel) from each token (default) or
        a constant."""
        num_gates = self.gate_layers * self.num_heads * channels
        if self.config.memory_gates_from_input:
            return TitansGate(self.config.hidden_size, num_gates, initial_value)
        return ConstantGate(num_gates, initial_value)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, T, hidden) -> (batch, heads, T, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def initial_state(self, batch_size: int) -> NeuralMemoryState:
        """M_0 for every row, no momentum yet, an empty convolution tail: where every sequence starts."""
        memory = initial_state(list(self.network.initial_weights), batch_size, use_momentum=self.config.use_momentum)
        return NeuralMemoryState(memory.weights, memory.snapshot, memory.momentum)

    def causal_conv(self, x: torch.Tensor, tail: torch.Tensor | None, tokens: TokenInfo, weight: torch.Tensor):
        """Depthwise causal convolution with `weight` (`self.conv`'s) over (tail ++ x); returns the output and the
        new tail (last inputs of each row's real tokens).

        Written as a sum over the kernel's taps, out_t = sum_j w_j * extended_{t + j}: the same numbers as
        `self.conv` (whose weight it uses), several times faster on CPU for a single decoded token (Conv1d's
        setup dominates there) and no slower for long inputs."""
        seq_len = x.shape[1]
        kernel = self.conv.kernel_size[0]
        if tail is None:
            tail = x.new_zeros(x.shape[0], kernel - 1, x.shape[2])
        extended = torch.cat([tail, x], dim=1)  # (batch, kernel - 1 + T, channels)
        taps = weight[:, 0, :]  # (channels, kernel)
        out = sum(extended[:, j : j + seq_len] * taps[:, j] for j in range(kernel))
        if tokens.all_valid:  # every row ends at column T - 1 (a copy: a view would keep `extended` alive)
            return out, extended[:, seq_len:].clone()
        index = tokens.lengths.view(-1, 1, 1) + torch.arange(kernel - 1, device=x.device).view(1, -1, 1)
        new_tail = extended.gather(1, index.expand(-1, -1, x.shape[2]))
        return out, new_tail

    def gates(self, x: torch.Tensor):
        """log(1 - alpha_t), log(eta_t) (None without momentum) and theta_t, each (batch, heads, T), in fp32; with
        per-layer gates (layers, batch, heads, T), the op's layout for them (`ops.neural_memory`). The forgetting
        is read as `memory_forget_scale` log(1 - alpha_t) (1 as trained; smaller retains longer).

        theta_t = theta_max sigmoid(.), divided by the chunk's gain chunk_size / (1 - eta_t) when
        `memory_lr_relative`: theta_max is then in units of the chunked inner loop's stability bound, whatever the
        momentum and the chunk size (`docs/architecture.md`, "The inner step")."""
        x = x.to(compute_dtype(x.dtype))  # an adapter on a gate sees the fp32 input too

        def logits(gate):  # (batch, heads, T) or (layers, batch, heads, T)
            per_token = gate(x).unflatten(-1, (self.gate_layers, self.num_heads)).permute(2, 0, 3, 1)
            return per_token if self.gate_layers > 1 else per_token[0]

        lr = self.config.memory_lr_max * torch.sigmoid(logits(self.lr_gate))
        if self.forget_gate is None:
            log_retain = torch.zeros_like(lr)
        else:
            if self.config.memory_forget_per_channel:  # (batch, heads, T, head_dim)
                forget = self.forget_gate(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            else:
                forget = logits(self.forget_gate)
            log_retain = F.logsigmoid(-forget) * self.config.memory_forget_scale
        log_momentum = None if self.momentum_gate is None else F.logsigmoid(logits(self.momentum_gate))
        if self.config.memory_lr_relative:
            gain = self.chunk_size if log_momentum is None else self.chunk_size / -torch.expm1(log_momentum)
            lr = lr / gain
        return log_retain, log_momentum, lr

    def recall(self, weights, queries: torch.Tensor) -> torch.Tensor:
        """M*(q) without writing: queries (batch, T, hidden) are l2-normalised per head, read through `weights`
        (the fast weights of some earlier state) and merged back to (batch, T, hidden)."""
        reads = self.network.read(weights, l2_normalize(self.split_heads(queries)))
        return reads.transpose(1, 2).flatten(2).to(queries.dtype)

    def write_and_read(self, state: MemoryState, q, k, v, gates, tokens: TokenInfo):
        """Writes every real token's (k, v) with its `gates` and reads M_t*(q_t) after each write: the decoding
        step for one token, else the chunked scan. Returns the reads and the op's state after the last token."""
        write_mask = None if tokens.all_valid else tokens.valid
        if q.shape[2] == 1:
            closes_chunk = (tokens.seen + 1) % self.chunk_size == 0
            row_mask = None if write_mask is None else write_mask[:, 0]
            return neural_memory_step(
                self.network, state, q, k, v, *gates, closes_chunk, row_mask, self.config.memory_max_norm
            )
        max_norm = self.config.memory_max_norm
        # The checkpointed scan's hand-derived backward covers one forget rate per head only.
        if self.config.memory_forget_per_channel:
            return neural_memory_scan(self.network, state, q, k, v, *gates, self.chunk_size, write_mask, max_norm)
        return checkpointed_memory_scan(
            self.network, state, q, k, v, *gates, self.chunk_size, write_mask, max_norm, compile_steps=self.compile_scan
        )

    def project(self, x: torch.Tensor, tokens: TokenInfo, state: NeuralMemoryState):
        """q, k, v (batch, heads, T, head_dim) of the tokens, q and k l2-normalised, and the new convolution tail.
        `x` must be zero at padding (`forward` masks it). The convolution, SiLU and normalisation are recomputed
        in backward (`recompute_in_backward`)."""
        qkv = torch.cat([self.mem_q_proj(x), self.mem_k_proj(x), self.mem_v_proj(x)], dim=-1)
        conv_weight = None if self.conv is None else self.conv.weight
        return recompute_in_backward(self.activate, qkv, state.conv_tail, tokens, conv_weight)

    def activate(self, qkv, conv_tail, tokens: TokenInfo, conv_weight):
        """The projections' output -> q, k, v per head (causal conv, SiLU, l2 norm of q and k) and the conv tail."""
        if conv_weight is not None:
            qkv, conv_tail = self.causal_conv(qkv, conv_tail, tokens, conv_weight)
        q, k, v = (self.split_heads(t) for t in F.silu(qkv).chunk(3, dim=-1))
        return l2_normalize(q), l2_normalize(k), v, conv_tail

    def gated_read(self, reads: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm(y) * SiLU(W_G x) of the reads y (batch, heads, T, head_dim), merged to (batch, T, hidden)."""
        normed = rms_norm(reads.to(gate.dtype), norm_weight, self.out_norm.variance_epsilon)
        return normed.transpose(1, 2).flatten(2) * F.silu(gate)

    def forward(self, x: torch.Tensor, tokens: TokenInfo, state: NeuralMemoryState | None):
        """x (batch, T, hidden) -> output (batch, T, hidden) and the state after the last real token."""
        state = state if state is not None else self.initial_state(x.shape[0])
        if not tokens.all_valid:
            x = x * tokens.valid.unsqueeze(-1).to(x.dtype)
        q, k, v, conv_tail = self.project(x, tokens, state)
        if self.writes_enabled:
            reads, memory = self.write_and_read(state, q, k, v, self.gates(x), tokens)
        else:  # nothing written, nothing forgotten: every token reads the current weights
            reads, memory = self.network.read(state.weights, q), state
        gated = recompute_in_backward(self.gated_read, reads, self.mem_gate_proj(x), self.out_norm.weight)
        out = self.mem_o_proj(gated)
        return out, NeuralMemoryState(memory.weights, memory.snapshot, memory.momentum, conv_tail)
