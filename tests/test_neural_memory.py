"""Correctness of the neural-memory op (`modeling_titans/ops/`) against the paper.

Paper: Titans, arXiv 2501.00663 (v1 equation numbers). The reference, `ops/naive.py`, is written straight from
the paper, one token at a time, with autograd for the inner gradient; it shares only the memory network's forward
and loss with the op under test, and that forward is checked here against an independent formula (`ref_read`):

    loss        l(M; k, v) = 1/2 ||M(k) - v||^2                           (Eq. 12)
    surprise    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)    (Eq. 14)
    forgetting  M_t = (1 - alpha_t) M_{t-1} + S_t                         (Eq. 13)
    read        y_t = M_t*(q_t), after the write of token t               (Eq. 15)

with t' = t - t mod chunk_size (Sec. 3.2: every gradient of a chunk is taken at the chunk-start weights).
Memory network: depth 1 is M(x) = x W; depth L >= 2 is M(x) = x + LN(W_L gelu(... gelu(x W_1))), LN without affine.
"""

import pytest
import torch
import torch.nn.functional as F

from modeling_titans.ops.memory_network import MemoryMLP
from modeling_titans.ops.naive import naive_neural_memory, naive_token_gradient
from modeling_titans.ops.neural_memory import (
    MemoryState,
    initial_state,
    neural_memory_scan,
    neural_memory_step,
)

BATCH, HEADS, D_HEAD, EXPANSION = 2, 3, 6, 2
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def ref_read(weights, x):
    """M*(x) (Eq. 15) from the formula: x W for depth 1, x + LN(W_L gelu(... gelu(x W_1))) for depth >= 2."""
    h = x
    for layer, w in enumerate(weights):
        h = h @ w
        if layer < len(weights) - 1:
            h = F.gelu(h)
    return h if len(weights) == 1 else x + F.layer_norm(h, h.shape[-1:], eps=1e-5)


def network_for(weights, expansion=EXPANSION, normalize=False) -> MemoryMLP:
    """The memory network of the depth and widths of `weights` (per layer (..., heads, d_in, d_out)); `normalize`:
    every token's inner gradient divided by max(1, its curvature)."""
    heads, d = weights[0].shape[-3], weights[0].shape[-2]
    return MemoryMLP(heads, d, len(weights), expansion, normalize_gradient=normalize)


def ref_memory(m0, q, k, v, alpha, eta, theta, chunk_size, normalize=False, max_norm=None):
    """The naive per-token recurrence of `ops/naive.py` (reads, M_T, M_{t'}, S_T)."""
    network = network_for(m0, normalize=normalize)
    return naive_neural_memory(network, m0, q, k, v, alpha, eta, theta, chunk_size, max_norm)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and helpers
# ----------------------------------------------------------------------------------------------------------------


def layer_shapes(depth, d=D_HEAD, expansion=EXPANSION):
    if depth == 1:
        return [(d, d)]
    dims = [d] + [expansion * d] * (depth - 1) + [d]
    return list(zip(dims[:-1], dims[1:]))


def make_problem(
    depth, length, seed=0, batch=BATCH, heads=HEADS, d=D_HEAD, dtype=torch.float64, per_layer=False, per_channel=False
):
    """Random M_0 (heads, d_in, d_out) per layer (He scale, so the LayerNorm input is not tiny), q and k of norm
    1.5 (l2-normalised as the layer does, then scaled), values that a nearby memory fits up to noise (so the inner loop
    learns rather than drifts), and gates as raw logits, (batch, heads, T), or with `per_layer` (depth, batch,
    heads, T): each weight matrix its own gates; `per_channel`: alpha (batch, heads, T, d), one per output channel."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    m0 = [randn(heads, i, o) * (2 / i) ** 0.5 for i, o in layer_shapes(depth, d)]
    target = [w + 0.5 * randn(*w.shape) / w.shape[-2] ** 0.5 for w in m0]
    seq = (batch, heads, length)
    gate_shape = (depth, *seq) if per_layer else seq
    q, k = (1.5 * F.normalize(randn(*seq, d), dim=-1) for _ in range(2))
    p = dict(
        q=q,
        k=k,
        v=ref_read([w.unsqueeze(0) for w in target], k) + 0.1 * randn(*seq, d),
        alpha_logit=randn(*gate_shape, *([d] if per_channel else [])) - 3.5,  # alpha ~ 0.03
        eta_logit=randn(*gate_shape) + 1.0,  # eta ~ 0.7
        theta_logit=randn(*gate_shape) - 2.5,  # theta ~ 0.08
    )
    return [w.to(dtype) for w in m0], {name: x.to(dtype) for name, x in p.items()}


def middle_norm(weights) -> float:
    """A `max_norm` just below the mean Frobenius norm of the weight matrices: the bound projects some of them where
    a chunk closes, and leaves others as they are."""
    return 0.9 * torch.cat([torch.linalg.matrix_norm(w).flatten() for w in weights]).mean().item()


def gates(p):
    """(alpha, eta, theta) from the logits."""
    return torch.sigmoid(p["alpha_logit"]), torch.sigmoid(p["eta_logit"]), torch.sigmoid(p["theta_logit"])


def op_gates(alpha, eta, theta):
    """The op's gate inputs: log(1 - alpha), log(eta) (None for eta = 0: momentum off), theta."""
    return torch.log1p(-alpha), None if eta is None else torch.log(eta), theta


def run_scan(m0, p, alpha, eta, theta, chunk_size, write_mask=None, normalize=False, max_norm=None):
    state = initial_state(m0, p["q"].shape[0], use_momentum=eta is not None)
    return neural_memory_scan(
        network_for(m0, normalize=normalize),
        state,
        p["q"],
        p["k"],
        p["v"],
        *op_gates(alpha, eta, theta),
        chunk_size=chunk_size,
        write_mask=write_mask,
        max_norm=max_norm,
    )


def batched(m0, batch=BATCH):
    return [w.unsqueeze(0).expand(batch, *w.shape) for w in m0]


def to64(x):
    return [to64(w) for w in x] if isinstance(x, (list, tuple)) else x.to(torch.float64)


def rel_error(actual, expected):
    """Max abs error relative to the tensor's scale (at least 1)."""
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)


def assert_close(actual, expected, tol):
    err = rel_error(actual, expected)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


def assert_all_close(actual, expected, tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, tol)


def assert_differ(a, b, min_diff=1e-3):
    assert (a - b).abs().max().item() > min_diff, "the switch changed nothing"


def check_against_reference(m0, p, alpha, eta, theta, chunk_size, dtype, normalize=False, max_norm=None):
    """The op in `dtype` vs the fp64 reference on the same (dtype-rounded) inputs.

    fp64: 1e-10. fp32: 1e-5 relative, widened to 10x the error of the reference itself run in fp32 where the problem
    is worse conditioned than that (the LayerNorm of deep memory scales rounding errors by 1/std of its input)."""
    reads, state = run_scan(m0, p, alpha, eta, theta, chunk_size, normalize=normalize, max_norm=max_norm)
    eta_ref = torch.zeros_like(theta) if eta is None else eta
    args = (batched(m0), p["q"], p["k"], p["v"], alpha, eta_ref, theta)
    ref_reads, ref_w, ref_snap, ref_s = ref_memory(*(to64(x) for x in args), chunk_size, normalize, max_norm)
    tol = TOL[dtype]
    if dtype != torch.float64:
        naive_reads, naive_w, *_ = ref_memory(*args, chunk_size, normalize, max_norm)
        tol = max(tol, 10 * max(rel_error(a, e) for a, e in zip([naive_reads, *naive_w], [ref_reads, *ref_w])))
    assert reads.dtype == dtype and state.weights[0].dtype == dtype
    assert_close(reads, ref_reads, tol)
    assert_all_close(state.weights, ref_w, tol)
    assert_all_close(state.snapshot, ref_snap, tol)
    if eta is None:
        assert state.momentum is None
    else:
        assert_all_close(state.momentum, ref_s, tol)
    return reads, state


# ----------------------------------------------------------------------------------------------------------------
# 1. Scan vs the naive reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size, length", [(1, 11), (4, 16), (4, 13), (16, 32), (16, 37)])
def test_scan_matches_paper_reference(dtype, depth, chunk_size, length):
    """Eqs. 12-15 with gradients at M_{t'} (Sec. 3.2): reads and state (M_T, M_{t'}, S_T) of the chunked closed
    form equal the per-token recurrence; chunk_size 1 is the plain per-token recurrence."""
    m0, p = make_problem(depth, length, seed=depth * 100 + chunk_size + length, dtype=dtype)
    check_against_reference(m0, p, *gates(p), chunk_size, dtype)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size, length", [(1, 11), (4, 13), (16, 37)])
def test_normalized_gradient_matches_paper_reference(depth, chunk_size, length):
    """With `normalize_gradient`, every token's gradient u (autograd's, in the reference) is divided by
    max(1, ||u||^2 / ||M(k) - v||^2) before Eqs. 13-14; fp64. The switch changes the result here: the keys have
    norm 1.5, so even the matrix memory has curvature |k|^2 = 2.25 > 1."""
    m0, p = make_problem(depth, length, seed=depth * 7 + chunk_size + length)
    normalized, _ = check_against_reference(m0, p, *gates(p), chunk_size, torch.float64, normalize=True)
    plain, _ = run_scan(m0, p, *gates(p), chunk_size)
    assert_differ(normalized, plain)


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("chunk_size, length", [(1, 11), (4, 13), (16, 37)])
def test_per_layer_gates_match_paper_reference(depth, use_momentum, chunk_size, length):
    """Per-layer gates (gates with a leading axis over the weight matrices): weight matrix l follows Eqs. 13-14 with
    its own alpha, eta, theta in the reference; the chunked closed form equals it in fp64. Using every layer's
    gates for all of them instead gives other reads, so the comparison can fail."""
    m0, p = make_problem(depth, length, seed=depth * 31 + chunk_size + length, per_layer=True)
    alpha, eta, theta = gates(p)
    eta = eta if use_momentum else None
    reads, _ = check_against_reference(m0, p, alpha, eta, theta, chunk_size, torch.float64)
    for layer in range(depth):
        shared, _ = run_scan(m0, p, alpha[layer], None if eta is None else eta[layer], theta[layer], chunk_size)
        assert_differ(reads, shared)


@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("chunk_size, length", [(1, 11), (4, 13), (16, 37)])
def test_per_channel_forgetting_matches_paper_reference(use_momentum, chunk_size, length):
    """Per-channel forgetting (alpha with a trailing axis over the matrix memory's output channels): column o of M
    decays by 1 - alpha_o in the reference; the closed form, whose beta, A and C get a channel axis, equals it in
    fp64. One alpha per head (the channels' mean) gives other reads, so the comparison can fail."""
    m0, p = make_problem(1, length, seed=chunk_size + length + 60, per_channel=True)
    alpha, eta, theta = gates(p)
    eta = eta if use_momentum else None
    reads, _ = check_against_reference(m0, p, alpha, eta, theta, chunk_size, torch.float64)
    assert_differ(reads, run_scan(m0, p, alpha.mean(-1), eta, theta, chunk_size)[0])


@pytest.mark.parametrize("depth", [1, 2])
def test_chunking_matters(depth):
    """The chunk comparisons above can fail: gradients at M_{t'} (Sec. 3.2) give other reads than at M_{t-1}, and
    a snapshot of a partial chunk differs from the current weights."""
    m0, p = make_problem(depth, 13)
    reads_1, state_1 = run_scan(m0, p, *gates(p), chunk_size=1)
    reads_4, state_4 = run_scan(m0, p, *gates(p), chunk_size=4)
    assert_differ(reads_1, reads_4)
    assert_differ(state_4.weights[0], state_4.snapshot[0])
    assert torch.equal(state_1.weights[0], state_1.snapshot[0])


# ----------------------------------------------------------------------------------------------------------------
# 2. Ablations of the paper's Table 5: no momentum, no forgetting
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size, length", [(1, 9), (4, 14)])
def test_no_momentum_is_eta_zero(depth, chunk_size, length):
    """log_momentum=None is Eq. 14 with eta = 0 (S_t = -theta_t grad), the state carries no momentum, and the
    result differs from the default gates."""
    m0, p = make_problem(depth, length, seed=7)
    alpha, eta, theta = gates(p)
    reads, _ = check_against_reference(m0, p, alpha, None, theta, chunk_size, torch.float64)
    default_reads, _ = run_scan(m0, p, alpha, eta, theta, chunk_size)
    assert_differ(reads, default_reads)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size, length", [(1, 9), (4, 14)])
def test_no_forgetting_is_alpha_zero(depth, chunk_size, length):
    """log_retain = 0 is Eq. 13 with alpha = 0, and differs from the default gates."""
    m0, p = make_problem(depth, length, seed=8)
    alpha, eta, theta = gates(p)
    reads, _ = check_against_reference(m0, p, torch.zeros_like(alpha), eta, theta, chunk_size, torch.float64)
    default_reads, _ = run_scan(m0, p, alpha, eta, theta, chunk_size)
    assert_differ(reads, default_reads)


def test_no_momentum_no_forgetting():
    """Both switches off: plain chunked gradient descent on Eq. 12 (Eq. 8 with gradients at M_{t'})."""
    m0, p = make_problem(2, 10, seed=9)
    alpha, _, theta = gates(p)
    check_against_reference(m0, p, torch.zeros_like(alpha), None, theta, 4, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# 3. Token-by-token decode step == scan
# ----------------------------------------------------------------------------------------------------------------


def step_through(network, state, p, log_retain, log_momentum, lr, chunk_size, start, stop, max_norm=None):
    """`neural_memory_step` on tokens start..stop-1; position t closes its chunk when (t + 1) % chunk_size == 0."""
    reads = []
    for t in range(start, stop):
        at = slice(t, t + 1)
        closes = torch.full((p["q"].shape[0],), (t + 1) % chunk_size == 0)
        read, state = neural_memory_step(
            network,
            state,
            p["q"][..., at, :],
            p["k"][..., at, :],
            p["v"][..., at, :],
            log_retain[..., at, :] if log_retain.dim() > lr.dim() else log_retain[..., at],  # per channel: (..., T, d)
            None if log_momentum is None else log_momentum[..., at],
            lr[..., at],
            closes,
            max_norm=max_norm,
        )
        reads.append(read)
    return torch.cat(reads, -2), state


def assert_same_state(a, b, tol):
    assert_all_close(a.weights, b.weights, tol)
    assert_all_close(a.snapshot, b.snapshot, tol)
    assert (a.momentum is None) == (b.momentum is None)
    if a.momentum is not None:
        assert_all_close(a.momentum, b.momentum, tol)


@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize(
    "depth, gate_kind", [(1, "shared"), (2, "shared"), (2, "per_layer"), (3, "per_layer"), (1, "per_channel")]
)
@pytest.mark.parametrize("chunk_size", [1, 4, 5])
def test_step_matches_scan(chunk_size, depth, gate_kind, use_momentum):
    """Decoding one token at a time (the chunk start frozen until the chunk fills) gives the reads and final
    state of one scan, with shared, per-layer and per-channel gates; 13 tokens is not a multiple of 4 or 5."""
    length = 13
    m0, p = make_problem(
        depth, length, seed=11, per_layer=gate_kind == "per_layer", per_channel=gate_kind == "per_channel"
    )
    alpha, eta, theta = gates(p)
    eta = eta if use_momentum else None
    scan_reads, scan_state = run_scan(m0, p, alpha, eta, theta, chunk_size)
    state = initial_state(m0, BATCH, use_momentum=use_momentum)
    step_reads, step_state = step_through(
        network_for(m0), state, p, *op_gates(alpha, eta, theta), chunk_size, 0, length
    )
    assert_close(step_reads, scan_reads, 1e-10)
    assert_same_state(step_state, scan_state, 1e-10)


@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "bounded"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size, prefix", [(4, 7), (4, 8), (5, 3), (1, 6)])
def test_prefill_then_step_matches_scan(depth, chunk_size, prefix, bounded):
    """Scan over a prefix (prefill, ending mid-chunk or on a boundary), then step over the rest == full scan; also
    with `max_norm` projecting some of the weight matrices where a chunk closes."""
    length = 14
    m0, p = make_problem(depth, length, seed=12)
    max_norm = middle_norm(m0) if bounded else None
    log_retain, log_momentum, lr = op_gates(*gates(p))
    full_reads, full_state = run_scan(m0, p, *gates(p), chunk_size, max_norm=max_norm)
    head = {name: x[..., :prefix, :] if x.dim() == 4 else x[..., :prefix] for name, x in p.items()}
    pre_reads, state = neural_memory_scan(
        network_for(m0),
        initial_state(m0, BATCH),
        head["q"],
        head["k"],
        head["v"],
        log_retain[..., :prefix],
        log_momentum[..., :prefix],
        lr[..., :prefix],
        chunk_size=chunk_size,
        max_norm=max_norm,
    )
    rest_reads, state = step_through(
        network_for(m0), state, p, log_retain, log_momentum, lr, chunk_size, prefix, length, max_norm
    )
    assert_close(torch.cat([pre_reads, rest_reads], -2), full_reads, 1e-10)
    assert_same_state(state, full_state, 1e-10)


def test_scan_continues_from_chunk_boundary():
    """A scan over the rest, started from the state of a prefix that ends on a chunk boundary, == full scan."""
    m0, p = make_problem(2, 15, seed=13)
    log_retain, log_momentum, lr = op_gates(*gates(p))
    full_reads, full_state = run_scan(m0, p, *gates(p), 4)
    state, reads = initial_state(m0, BATCH), []
    for part in (slice(0, 8), slice(8, 15)):
        r, state = neural_memory_scan(
            network_for(m0),
            state,
            p["q"][..., part, :],
            p["k"][..., part, :],
            p["v"][..., part, :],
            log_retain[..., part],
            log_momentum[..., part],
            lr[..., part],
            chunk_size=4,
        )
        reads.append(r)
    assert_close(torch.cat(reads, -2), full_reads, 1e-10)
    assert_same_state(state, full_state, 1e-10)


def test_step_closes_chunk_per_row():
    """`closes_chunk` is per row: a closing row's snapshot becomes its new weights, the other row's stays."""
    m0, p = make_problem(2, 1, seed=14)
    state = initial_state(m0, BATCH)
    _, new = neural_memory_step(
        network_for(m0), state, p["q"], p["k"], p["v"], *op_gates(*gates(p)), closes_chunk=torch.tensor([True, False])
    )
    for w, snap, old in zip(new.weights, new.snapshot, state.snapshot):
        assert torch.equal(snap[0], w[0])
        assert torch.equal(snap[1], old[1])
        assert_differ(w[1], old[1])


# ----------------------------------------------------------------------------------------------------------------
# 4. write_mask: trailing padding is the identity
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("depth, per_channel, bounded", [(1, False, False), (2, False, False), (1, True, False),
                                                        (2, False, True)])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_trailing_padding_is_identity(chunk_size, depth, per_channel, bounded, use_momentum):
    """Each row of a right-padded batch gives, on its real tokens, the reads and final state (M, M_{t'}, S) of
    the row alone; padding never closes a chunk. Lengths 13, 6, 8 with chunk 4: rows ending mid-chunk, on a
    boundary, and with a whole padded chunk after the last real token. Also with per-channel forgetting, and with
    `max_norm` (the bound applies where a row's own chunk closes, never in its padding)."""
    lengths, total = [13, 6, 8], 13
    m0, p = make_problem(depth, total, seed=15, batch=len(lengths), per_channel=per_channel)
    max_norm = middle_norm(m0) if bounded else None
    p = {name: x.clone() for name, x in p.items()}
    write_mask = torch.arange(total) < torch.tensor(lengths)[:, None]
    for name, x in p.items():  # garbage in the padding: large values that would change everything if written
        pad = ~write_mask.view(len(lengths), 1, total, *([1] * (x.dim() - 3)))
        x.masked_fill_(pad.expand_as(x), 5.0)
    alpha, eta, theta = gates(p)
    eta = eta if use_momentum else None
    reads, state = run_scan(m0, p, alpha, eta, theta, chunk_size, write_mask=write_mask, max_norm=max_norm)
    for row, n in enumerate(lengths):
        own = {name: x[row : row + 1, :, :n] for name, x in p.items()}  # token axis 2 for every input
        own_alpha, own_eta, own_theta = gates(own)
        own_eta = own_eta if use_momentum else None
        own_reads, own_state = run_scan(m0, own, own_alpha, own_eta, own_theta, chunk_size, max_norm=max_norm)
        assert_close(reads[row : row + 1, :, :n], own_reads, 1e-10)
        assert_same_state(state.map(lambda w: w[row : row + 1]), own_state, 1e-10)
        mid_chunk = n % chunk_size != 0
        assert mid_chunk == (not torch.equal(state.snapshot[0][row], state.weights[0][row]))


def test_padding_does_not_close_chunk_against_reference():
    """A row of 6 real tokens padded to 8 (two chunks of 4): its snapshot is M_4, the weights at the start of its
    partial chunk (Sec. 3.2), not M_6."""
    m0, p = make_problem(2, 8, seed=16, batch=1)
    write_mask = (torch.arange(8) < 6)[None]
    alpha, eta, theta = gates(p)
    _, state = run_scan(m0, p, alpha, eta, theta, 4, write_mask=write_mask)
    cut = lambda x: x[..., :6, :] if x.dim() == 4 else x[..., :6]  # noqa: E731
    _, ref_w, ref_snap, ref_s = ref_memory(
        batched(m0, 1), *(cut(p[n]) for n in ("q", "k", "v")), cut(alpha), cut(eta), cut(theta), 4
    )
    assert_all_close(state.weights, ref_w, 1e-10)
    assert_all_close(state.snapshot, ref_snap, 1e-10)
    assert_all_close(state.momentum, ref_s, 1e-10)
    assert_differ(state.snapshot[0], state.weights[0])


# ----------------------------------------------------------------------------------------------------------------
# 5. Outer gradients (the outer loss back-propagates through the inner updates)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize(
    "depth, chunk_size, padded, gate_kind, bounded",
    [
        (1, 2, False, "shared", False), (2, 3, False, "shared", False), (2, 2, False, "shared", False),
        (2, 2, True, "shared", False), (2, 2, True, "per_layer", False), (1, 2, True, "per_channel", False),
        (1, 2, True, "shared", True), (2, 2, False, "per_layer", True),
    ],
)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_gradcheck_scan(depth, chunk_size, padded, gate_kind, bounded, use_momentum, normalize):
    """gradcheck (fp64) of reads and final state w.r.t. q, k, v, the raw gate logits (shared, per layer or alpha per
    channel) and M_0 (shared by the batch), through second-order terms of the inner gradient; 5 tokens, the last
    chunk partial; `padded`: the second row has 3 real tokens (write_mask); `bounded`: `max_norm` projects some
    weight matrices where a chunk closes."""
    batch, heads, d, length = 2, 1, 3, 5
    write_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool() if padded else None
    m0, p = make_problem(
        depth, length, seed=17, batch=batch, heads=heads, d=d, per_layer=gate_kind == "per_layer",
        per_channel=gate_kind == "per_channel",
    )
    max_norm = middle_norm(m0) if bounded else None
    names = ["q", "k", "v", "alpha_logit", "eta_logit", "theta_logit"]
    inputs = [p[n].clone().requires_grad_() for n in names] + [w.clone().requires_grad_() for w in m0]

    def fn(q, k, v, alpha_logit, eta_logit, theta_logit, *weights):
        state = initial_state(weights, batch, use_momentum=use_momentum)
        log_retain = F.logsigmoid(-alpha_logit)  # log(1 - sigmoid(alpha_logit))
        log_momentum = F.logsigmoid(eta_logit) if use_momentum else None
        reads, out = neural_memory_scan(
            network_for(weights, normalize=normalize), state, q, k, v, log_retain, log_momentum,
            torch.sigmoid(theta_logit), chunk_size, write_mask, max_norm,
        )
        return (reads, *out.weights, *out.snapshot, *(out.momentum or ()))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "bounded"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_gradcheck_step(normalize, bounded):
    """gradcheck (fp64) of one decode step from a non-trivial state (momentum and snapshot as inputs); `bounded`:
    the first row closes its chunk and `max_norm` projects some of its weight matrices."""
    m0, p = make_problem(2, 1, seed=18, batch=2, heads=1, d=3)
    g = torch.Generator().manual_seed(19)
    extra = [0.3 * torch.randn(2, *w.shape, generator=g, dtype=torch.float64) for w in m0 for _ in range(3)]
    names = ["q", "k", "v", "alpha_logit", "eta_logit", "theta_logit"]
    inputs = [p[n].clone().requires_grad_() for n in names] + [x.requires_grad_() for x in extra]
    max_norm = middle_norm(extra[0::3]) if bounded else None

    def fn(q, k, v, alpha_logit, eta_logit, theta_logit, *tensors):
        w, snap, s = tensors[0::3], tensors[1::3], tensors[2::3]
        state = MemoryState(weights=w, snapshot=snap, momentum=s)
        gate = (F.logsigmoid(-alpha_logit), F.logsigmoid(eta_logit), torch.sigmoid(theta_logit))
        reads, out = neural_memory_step(
            network_for(m0, normalize=normalize), state, q, k, v, *gate, closes_chunk=torch.tensor([True, False]),
            max_norm=max_norm,
        )
        return (reads, *out.weights, *out.snapshot, *out.momentum)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 6. Building blocks
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_memory_read_is_the_paper_network(depth):
    """MemoryMLP.read is M*(x) of Eq. 15 (the formula of the module docstring)."""
    m0, p = make_problem(depth, 7, seed=20)
    g = torch.Generator().manual_seed(20)
    weights = [torch.randn(BATCH, *w.shape, generator=g, dtype=torch.float64) for w in m0]
    assert_close(network_for(m0).read(weights, p["q"]), ref_read(weights, p["q"]), 1e-12)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_gradient_factors_are_per_token_gradients(depth, normalize):
    """MemoryMLP.gradient_factors: inputs[l][i]^T errors[l][i] is token i's gradient of Eq. 12 (by autograd)
    w.r.t. layer l, divided by max(1, its curvature) when normalised."""
    length = 7
    m0, p = make_problem(depth, length, seed=21)
    g = torch.Generator().manual_seed(21)
    weights = [w.unsqueeze(0) + 0.3 * torch.randn(BATCH, *w.shape, generator=g, dtype=torch.float64) for w in m0]
    keys = torch.randn(BATCH, HEADS, length, D_HEAD, generator=g, dtype=torch.float64)  # not normalised
    network = network_for(m0, normalize=normalize)
    inputs, errors = network.gradient_factors(weights, keys, p["v"])
    assert len(inputs) == len(errors) == depth
    for t in range(length):
        expected = naive_token_gradient(network, weights, keys[..., t : t + 1, :], p["v"][..., t : t + 1, :])
        got = [a[..., t, :, None] * g[..., t, None, :] for a, g in zip(inputs, errors)]
        assert_all_close(got, expected, 1e-12)


def test_low_precision_inputs_run_in_fp32():
    """With bf16 q, k, v and M_0 the memory math runs in fp32: state in fp32, reads those of the same inputs
    upcast to fp32 (the gates are fp32, as the model computes them)."""
    m0, p = make_problem(2, 9, seed=22, dtype=torch.float32)
    low = {name: x.to(torch.bfloat16) for name, x in p.items() if name in "qkv"}
    up = {name: x.float() for name, x in low.items()}
    gate_inputs = op_gates(*gates(p))
    reads, state = neural_memory_scan(
        network_for(m0),
        initial_state([w.to(torch.bfloat16) for w in m0], BATCH), *low.values(), *gate_inputs, chunk_size=4
    )
    ref_reads, ref_state = neural_memory_scan(
        network_for(m0),
        initial_state([w.to(torch.bfloat16).float() for w in m0], BATCH), *up.values(), *gate_inputs, chunk_size=4
    )
    assert all(w.dtype == torch.float32 for w in (*state.weights, *state.snapshot, *state.momentum))
    assert torch.equal(reads.float(), ref_reads.to(reads.dtype).float())
    assert_same_state(state, ref_state, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# 7. Bounded weights: `max_norm` projects each weight matrix onto a Frobenius ball where a chunk closes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size, length", [(1, 11), (4, 13), (4, 16)])
def test_bounded_scan_matches_reference(dtype, depth, chunk_size, length):
    """With `max_norm`, the scan equals the per-token reference that rescales W and S after a chunk's last read;
    the weights at the last chunk boundary lie in the ball, the reads differ from the unbounded ones, and a bound
    above every norm changes nothing at all."""
    m0, p = make_problem(depth, length, seed=depth * 5 + chunk_size + length, dtype=dtype)
    max_norm = middle_norm(m0)
    reads, state = check_against_reference(m0, p, *gates(p), chunk_size, dtype, max_norm=max_norm)
    unbounded, unbounded_state = run_scan(m0, p, *gates(p), chunk_size)
    assert_differ(reads, unbounded)
    for weights in state.snapshot:
        assert torch.linalg.matrix_norm(weights).max().item() <= max_norm * (1 + TOL[dtype])
    loose, loose_state = run_scan(m0, p, *gates(p), chunk_size, max_norm=1e6)
    assert torch.equal(loose, unbounded)
    assert all(torch.equal(a, b) for a, b in zip(loose_state.weights, unbounded_state.weights))

