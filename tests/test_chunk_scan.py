"""The checkpointed scan (`ops/chunk_scan.py`) against the plain-autograd scan (`ops/neural_memory.py`), which
`tests/test_neural_memory.py` holds to the paper's per-token reference.

Exact in float64 (1e-10 relative): reads, the end state (M, M_{t'}, S) and every gradient: q, k, v, the three
gate inputs (shared or per layer), M_0 and an incoming state (weights, snapshot, momentum), for depth 1-3, momentum
on/off, forgetting on/off, bounded weights (`max_norm`), partial last chunks, trailing padding and any spacing of
the saved states; plus gradcheck on small shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from modeling_titans.ops.chunk_scan import checkpointed_memory_scan
from modeling_titans.ops.memory_network import add_matmul
from modeling_titans.ops.neural_memory import MemoryState, initial_state, neural_memory_scan

from test_neural_memory import assert_close, assert_differ, make_problem, middle_norm, network_for

NAMES = ["q", "k", "v", "alpha_logit", "eta_logit", "theta_logit"]


def scan_outputs(
    scan, m0, inputs, chunk_size, use_momentum=True, forgetting=True, write_mask=None, state=None, normalize=False, **kw
):
    """Reads and end state of `scan` as one flat list; gates from raw logits (as the layer builds them);
    `normalize`: the memory network normalises every token's inner gradient by its curvature."""
    q, k, v, alpha_logit, eta_logit, theta_logit = inputs
    if state is None:
        state = initial_state(m0, q.shape[0], use_momentum=use_momentum)
    log_retain = F.logsigmoid(-alpha_logit) if forgetting else torch.zeros_like(alpha_logit)
    log_momentum = F.logsigmoid(eta_logit) if use_momentum else None
    reads, out = scan(
        network_for(m0, normalize=normalize), state, q, k, v, log_retain, log_momentum, torch.sigmoid(theta_logit),
        chunk_size,
        write_mask, **kw,
    )
    return [reads, *out.weights, *out.snapshot, *(out.momentum or ())]


def compare(m0, p, chunk_size, tol=1e-10, incoming_state=False, **options):
    """Both scans on the same leaves: outputs, then the gradients of a random projection of all of them."""
    leaves = [p[n].clone().requires_grad_() for n in NAMES] + [w.clone().requires_grad_() for w in m0]
    inputs, weights = leaves[:6], leaves[6:]
    extra = []
    state = None
    if incoming_state:  # a state mid-sequence: weights, snapshot and momentum of their own, each a leaf
        g = torch.Generator().manual_seed(5)
        batch = p["q"].shape[0]
        extra = [
            (w.unsqueeze(0) + 0.1 * torch.randn(batch, *w.shape, generator=g, dtype=w.dtype)).requires_grad_()
            for w in m0 for _ in range(3)
        ]
        momentum = tuple(extra[2::3]) if options.get("use_momentum", True) else None
        state = MemoryState(weights=tuple(extra[0::3]), snapshot=tuple(extra[1::3]), momentum=momentum)
        weights = []
    results = []
    for scan, kw in ((neural_memory_scan, {}), (checkpointed_memory_scan, options.pop("scan_kw", {}))):
        outputs = scan_outputs(scan, weights or m0, inputs, chunk_size, state=state, **options, **kw)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
        used = leaves + [x for x in extra if x.requires_grad]
        grads = torch.autograd.grad(loss, used, allow_unused=True)
        results.append((outputs, grads))
    (ref_out, ref_grads), (out, grads) = results
    assert len(out) == len(ref_out)
    for a, e in zip(out, ref_out):
        assert_close(a, e, tol)
    for a, e in zip(grads, ref_grads):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a, e, tol)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("chunk_size, length", [(4, 16), (4, 13), (16, 37), (1, 7), (8, 5)])
def test_equals_autograd_scan(depth, use_momentum, chunk_size, length):
    """Whole chunks, a partial last chunk, chunk 1, and fewer tokens than a chunk (no chunk closes)."""
    m0, p = make_problem(depth, length, seed=depth * 10 + length)
    compare(m0, p, chunk_size, use_momentum=use_momentum)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("chunk_size, length", [(4, 13), (16, 37), (1, 7)])
def test_normalized_gradient_equals_autograd_scan(depth, use_momentum, chunk_size, length):
    """The hand-derived backward of the curvature normalisation (`MemoryMLP.normalize_gradient`), incl. its
    second-order terms, equals autograd through `neural_memory_scan`."""
    m0, p = make_problem(depth, length, seed=depth * 13 + length)
    compare(m0, p, chunk_size, use_momentum=use_momentum, normalize=True, scan_kw={"segment_chunks": 2})


def test_normalized_gradient_where_only_some_tokens_are_scaled():
    """Keys of norms 0.5-1.5 give a matrix memory curvatures |k|^2 on both sides of 1: tokens below 1 keep their
    gradient (and the scale's gradient is zero there), tokens above are scaled."""
    m0, p = make_problem(1, 21, seed=8)
    norms = torch.linspace(0.5, 1.5, 21, dtype=torch.float64)
    p["k"] = p["k"] / p["k"].norm(dim=-1, keepdim=True) * norms[:, None]
    compare(m0, p, 4, normalize=True, scan_kw={"segment_chunks": 2})


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_per_layer_gates(depth, use_momentum, normalize):
    """Gates with a leading axis over the weight matrices (each its own alpha, eta, theta): the gradients of every
    layer's gates come back on their own slice of that axis; a partial last chunk, replayed segments."""
    m0, p = make_problem(depth, 19, seed=depth + 40, per_layer=True)
    compare(m0, p, 4, use_momentum=use_momentum, normalize=normalize, scan_kw={"segment_chunks": 2})


def test_per_layer_gates_with_trailing_padding():
    lengths, total = [13, 6, 0], 13
    m0, p = make_problem(2, total, seed=41, batch=len(lengths), per_layer=True)
    write_mask = torch.arange(total) < torch.tensor(lengths)[:, None]
    compare(m0, p, 4, write_mask=write_mask, forgetting=True, scan_kw={"segment_chunks": 2})


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_bounded_weights(depth, use_momentum, normalize):
    """`max_norm` between the weight matrices' norms, so the projection (and its backward pass) acts on some of
    them where chunks close and not on others; replayed segments and a partial last chunk. The bound must have
    changed the result, or the test would not test it."""
    m0, p = make_problem(depth, 19, seed=depth + 50)
    max_norm = middle_norm(m0)
    compare(
        m0, p, 4, use_momentum=use_momentum, normalize=normalize, max_norm=max_norm, scan_kw={"segment_chunks": 2}
    )
    inputs = [p[n] for n in NAMES]
    bounded = scan_outputs(checkpointed_memory_scan, m0, inputs, 4, use_momentum=use_momentum, max_norm=max_norm)
    unbounded = scan_outputs(checkpointed_memory_scan, m0, inputs, 4, use_momentum=use_momentum)
    assert_differ(bounded[0], unbounded[0])


def test_bounded_weights_with_padding_per_layer_gates_and_incoming_state():
    """The projection where each row's own chunk closes (per-row selection of the scales), with gates per memory
    layer, and from a trained incoming state."""
    lengths, total = [13, 6, 8, 0], 13
    m0, p = make_problem(2, total, seed=43, batch=len(lengths), per_layer=True)
    write_mask = torch.arange(total) < torch.tensor(lengths)[:, None]
    max_norm = middle_norm(m0)
    compare(m0, p, 4, write_mask=write_mask, max_norm=max_norm, scan_kw={"segment_chunks": 2})
    compare(m0, p, 4, write_mask=write_mask, max_norm=max_norm, incoming_state=True, scan_kw={"segment_chunks": 2})


def test_per_channel_forgetting_is_refused_not_mistaken():
    """One alpha per output channel is for the autograd scan: the checkpointed one, whose hand-derived backward is
    written for one alpha per head, raises instead of returning wrong gradients."""
    m0, p = make_problem(1, 8, seed=42, per_channel=True)
    with pytest.raises(ValueError, match="per-channel forgetting runs on neural_memory_scan"):
        scan_outputs(checkpointed_memory_scan, m0, [p[n] for n in NAMES], 4)


@pytest.mark.parametrize("segment_chunks", [1, 2, 3, 100])
def test_any_spacing_of_saved_states(segment_chunks):
    """k = 1 (every boundary saved, no replay), segments that do not divide the chunks, one segment for all."""
    m0, p = make_problem(2, 29, seed=3)
    compare(m0, p, 4, scan_kw={"segment_chunks": segment_chunks})


@pytest.mark.parametrize("use_momentum", [True, False])
def test_no_forgetting(use_momentum):
    m0, p = make_problem(2, 14, seed=4)
    compare(m0, p, 4, use_momentum=use_momentum, forgetting=False)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_trailing_padding(depth, use_momentum, chunk_size, normalize):
    """Rows ending mid-chunk, on a boundary, before a whole padded chunk, and a row with no real token."""
    lengths, total = [13, 6, 8, 0], 13
    m0, p = make_problem(depth, total, seed=6, batch=len(lengths))
    write_mask = torch.arange(total) < torch.tensor(lengths)[:, None]
    compare(
        m0, p, chunk_size, use_momentum=use_momentum, write_mask=write_mask, normalize=normalize,
        scan_kw={"segment_chunks": 2},
    )


@pytest.mark.slow  # compiles each per-chunk step a few times: ~1.5 minutes
def test_compiled_steps():
    """`compile_steps`: the per-chunk steps through torch.compile give the same numbers (float64), with trailing
    padding, a normalised inner gradient and a partial last segment."""
    lengths, total = [13, 6, 8], 13
    m0, p = make_problem(2, total, seed=9, batch=len(lengths))
    write_mask = torch.arange(total) < torch.tensor(lengths)[:, None]
    compare(m0, p, 4, write_mask=write_mask, normalize=True, scan_kw={"segment_chunks": 3, "compile_steps": True})


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("use_momentum", [True, False])
def test_incoming_state(depth, use_momentum):
    """A state from an earlier call, its weights, snapshot and momentum all different and all trained."""
    m0, p = make_problem(depth, 11, seed=7)
    compare(m0, p, 4, incoming_state=True, use_momentum=use_momentum)


def test_low_precision_inputs_run_in_fp32():
    """bf16 q, k, v and M_0: the state math in fp32, as in `neural_memory_scan`."""
    m0, p = make_problem(2, 9, seed=8, dtype=torch.float32)
    low = [p[n].to(torch.bfloat16) for n in ("q", "k", "v")] + [p[n] for n in NAMES[3:]]
    m0 = [w.to(torch.bfloat16) for w in m0]
    out = scan_outputs(checkpointed_memory_scan, m0, low, 4)
    ref = scan_outputs(neural_memory_scan, m0, low, 4)
    for a, e in zip(out, ref):
        assert a.dtype == torch.float32
        assert_close(a, e, 1e-6)


@pytest.mark.parametrize("use_momentum", [True, False])
@pytest.mark.parametrize("depth, chunk_size, padded", [(1, 2, False), (2, 2, False), (2, 2, True), (3, 3, False)])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "bounded"])
def test_gradcheck(depth, chunk_size, padded, use_momentum, normalize, bounded):
    """gradcheck (fp64) w.r.t. q, k, v, the gate logits and M_0, through the inner gradient's second-order terms;
    5 tokens in segments of 2 chunks, the last chunk partial; `bounded`: `max_norm` projects some weights."""
    batch, heads, d, length = 2, 1, 3, 5
    write_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool() if padded else None
    m0, p = make_problem(depth, length, seed=9, batch=batch, heads=heads, d=d)
    max_norm = middle_norm(m0) if bounded else None
    leaves = [p[n].clone().requires_grad_() for n in NAMES] + [w.clone().requires_grad_() for w in m0]

    def fn(*tensors):
        return tuple(
            scan_outputs(
                checkpointed_memory_scan, tensors[6:], tensors[:6], chunk_size, use_momentum=use_momentum,
                write_mask=write_mask, segment_chunks=2, normalize=normalize, max_norm=max_norm,
            )
        )

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_add_matmul_writes_into_one_chunk_slot_of_stacked_states():
    """The scan writes each chunk's end state into the next chunk's slot of a (batch, heads, chunks, d_in, d_out)
    tensor; an `out` whose leading dims do not merge into one must raise, not write into a silent copy."""
    g = torch.Generator().manual_seed(0)
    stack = torch.zeros(2, 3, 4, 5, 6, dtype=torch.float64)
    base, x, y = (
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(2, 3, 5, 6), (2, 3, 5, 7), (2, 3, 7, 6)]
    )
    result = add_matmul(base, x, y, alpha=-1, out=stack[:, :, 2])
    assert result.data_ptr() == stack[:, :, 2].data_ptr()
    assert_close(stack[:, :, 2], base - x @ y, 1e-12)
    assert not stack[:, :, [0, 1, 3]].any()
    with pytest.raises(RuntimeError):
        add_matmul(base.transpose(0, 1), x.transpose(0, 1), y.transpose(0, 1), out=stack.transpose(0, 1)[:, :, 2])
