"""The Llama parts every Titans block shares: RMSNorm, the gated channel mixer and rotary position embeddings."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def recompute_in_backward(fn, *args):
    """fn(*args); when autograd records it, only `args` are kept for the backward pass and fn's intermediates are
    recomputed there (non-reentrant `torch.utils.checkpoint`). For the elementwise pieces of a block (norms,
    activations, gating, the causal convolution): their saved activations cost several copies of the hidden
    state per token, their recomputation a pass over memory. `fn` must be a function of `args` alone, the
    parameters it uses included: the recomputation then sees the tensors of the forward pass even where those
    were swapped in for the call (`torch.func.functional_call`). Under torch.compile the partitioner makes this
    choice itself."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, computed in at least fp32."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


class TitansRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return recompute_in_backward(rms_norm, hidden_states, self.weight, self.variance_epsilon)


class TitansMLP(nn.Module):
    """Gated channel mixer (Llama): down(act(gate(x)) * up(x)), `act` = ACT2FN[config.hidden_act] (SiLU: SwiGLU)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(recompute_in_backward(self.gated_activation, self.gate_proj(x), self.up_proj(x)))

    def gated_activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up, recomputed in backward: it would keep two more intermediate-size activations."""
        return self.act_fn(gate) * up


def default_rope_parameters(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """Plain RoPE: inverse frequencies theta^(-2i / head_dim) and no scaling of cos / sin (the signature of
    transformers' `ROPE_INIT_FUNCTIONS`)."""
    exponents = torch.arange(0, config.head_dim, 2, device=device, dtype=torch.float32) / config.head_dim
    return 1.0 / (config.rope_parameters["rope_theta"] ** exponents), 1.0


class TitansRotaryEmbedding(nn.Module):
    """RoPE as transformers computes it for `config.rope_parameters` (LlamaRotaryEmbedding): "default", or a scaling
    from `ROPE_INIT_FUNCTIONS` (linear, dynamic, yarn, longrope, llama3, ...), whose attention factor scales cos
    and sin. The frequencies are computed on the fly in fp32 (a handful of values): no buffer to initialise, none
    rounded when the model is cast to half precision. The types that depend on the length (dynamic, longrope) get
    the call's largest position + 1, the length Llama's embedding grows to."""

    LENGTH_DEPENDENT = ("dynamic", "longrope")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.rope_init_fn = ROPE_INIT_FUNCTIONS.get(self.rope_type, default_rope_parameters)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        seq_len = int(position_ids.max()) + 1 if self.rope_type in self.LENGTH_DEPENDENT else None
        inv_freq, scaling = self.rope_init_fn(self.config, x.device, seq_len=seq_len)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, T, head_dim); cos, sin (batch, T, head_dim)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)
