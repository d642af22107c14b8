"""Model-level behaviour of TitansForCausalLM: forward and loss, ablations, causality, padding, outer
gradients, bad inputs, hidden states / attention weights, save / load and the Auto classes.

The op-level fidelity tests (naive paper reference vs the chunked memory) live in test_neural_memory.py.
"""

import copy
import logging

import pytest
import torch
from torch.func import functional_call
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from helpers import (
    CHUNK,
    SEGMENT,
    VARIANTS,
    WINDOW,
    full_logits,
    prefill_then_decode,
    random_ids,
    tiny_config,
    tiny_model,
)
from modeling_titans import TitansCache, TitansConfig, TitansForCausalLM, TitansModel
from modeling_titans.layers.tokens import TokenInfo


# Long enough for several chunks (4), segments (8) and windows (8).
SEQ_LEN = 3 * SEGMENT + 3


# ----------------------------------------------------------------------------------------------------------------
# Forward, loss, ablation switches
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_loss(variant):
    model = tiny_model(variant)
    input_ids = random_ids(2, SEQ_LEN)
    outputs = model(input_ids, labels=input_ids)
    assert outputs.logits.shape == (2, SEQ_LEN, model.config.vocab_size)
    # A random model predicts about uniformly over 259 tokens: loss near log(259) = 5.56.
    assert torch.isfinite(outputs.loss) and 4.0 < outputs.loss.item() < 8.0
    assert isinstance(outputs.cache, TitansCache)  # use_cache defaults to True in eval mode
    as_tuple = model(input_ids, labels=input_ids, return_dict=False)
    assert torch.equal(as_tuple[0], outputs.loss) and torch.equal(as_tuple[1], outputs.logits)


def transplant(source: TitansForCausalLM, target: TitansForCausalLM):
    """Copies every parameter the two models share by name and shape (an ablation removes or reshapes some)."""
    target_state = target.state_dict()
    shared = {k: v for k, v in source.state_dict().items() if k in target_state and target_state[k].shape == v.shape}
    target.load_state_dict(shared, strict=False)
    return len(shared)


ABLATIONS = [
    {"use_momentum": False},
    {"use_forgetting": False},
    {"use_conv": False},
    {"num_persistent_tokens": 0},
    {"memory_depth": 1},
    {"memory_gates_from_input": False},
    {"memory_per_layer_gates": True},
    {"memory_depth": 1, "memory_forget_per_channel": True},
]


@pytest.mark.parametrize(
    "variant, ablation",
    # LMM has no attention, hence no persistent tokens to switch off.
    [(v, a) for v in VARIANTS for a in ABLATIONS if not (v == "lmm" and "num_persistent_tokens" in a)],
    ids=lambda p: p if isinstance(p, str) else "-".join(f"{k}={v}" for k, v in p.items()),
)
def test_ablation_switch_builds_a_working_model_that_computes_something_else(variant, ablation):
    default = tiny_model(variant)
    with torch.no_grad():  # give the modules that start as (almost) no-ops trained-looking weights
        for layer in default.model.layers:
            memory = layer.mixer.memory
            memory.conv.weight.normal_(0.0, 0.5)  # starts as the identity
            memory.forget_gate.bias.fill_(-3.0)  # alpha ~ 0.05, visible within a short input (starts at 0.001)
            for gate in (memory.forget_gate, memory.momentum_gate, memory.lr_gate):
                gate.weight.normal_(0.0, 0.3)  # gates that depend on the token
    ablated = tiny_model(variant, **ablation)
    # Same weights wherever the two share a parameter, so any difference comes from the switch itself.
    assert transplant(default, ablated) >= 20
    input_ids = random_ids(2, SEQ_LEN)
    ablated_logits = full_logits(ablated, input_ids)
    assert torch.isfinite(ablated_logits).all()
    # fp32 rounding differs by ~1e-7; at initialisation the memory moves slowly (theta ~ 0.002), hence 1e-4.
    assert (ablated_logits - full_logits(default, input_ids)).abs().max() > 1e-4
    # Training through the ablated model is covered by test_outer_gradients_reach_every_parameter.


GATE_OPTIONS = {
    # every weight matrix of the deep memory its own alpha, eta and theta: one logit per matrix and head
    "per_layer_gates": ({"memory_per_layer_gates": True}, "lr_gate", lambda config: config.memory_depth),
    # the matrix memory's alpha per output channel: one logit per channel and head
    "per_channel_forgetting": (
        {"memory_depth": 1, "memory_forget_per_channel": True}, "forget_gate", lambda config: config.memory_head_dim
    ),
}


@pytest.mark.parametrize("option", GATE_OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gate_options_keep_the_cache_and_padding_exact(variant, option):
    """`memory_per_layer_gates` and `memory_forget_per_channel`: more gate logits per head. Prefill + decode still
    equals the full forward, and a left-padded row equals its prompt alone."""
    fields, gate_name, logits_per_head = GATE_OPTIONS[option]
    model = tiny_model(variant, **fields)
    config = model.config
    with torch.no_grad():  # gates that differ between the weight matrices (channels) and depend on the token
        for layer in model.model.layers:
            memory = layer.mixer.memory
            assert getattr(memory, gate_name).out_features == logits_per_head(config) * config.memory_num_heads
            memory.forget_gate.bias.normal_(-3.0, 1.0)  # alpha ~ 0.05, different per logit (starts at 0.001)
            for gate in (memory.forget_gate, memory.momentum_gate, memory.lr_gate):
                gate.weight.normal_(0.0, 0.3)
    input_ids = random_ids(2, 3 * SEQ_LEN // 2)
    full = full_logits(model, input_ids)
    torch.testing.assert_close(prefill_then_decode(model, input_ids, SEQ_LEN // 2 + 1), full, rtol=0, atol=1e-4)
    short = input_ids[1, 5:]
    padded = torch.cat([torch.full((5,), config.pad_token_id), short])[None]
    mask = (torch.arange(padded.shape[1]) >= 5).long()[None]
    torch.testing.assert_close(
        full_logits(model, padded, mask)[0, 5:], full_logits(model, short[None])[0], rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_forget_scale_stretches_the_forgetting_and_zero_switches_it_off(variant):
    """`memory_forget_scale` s reads the forgetting as s log(1 - alpha_t): s = 0 computes what the same model
    without a forget gate computes, and any s keeps prefill + decode equal to the full forward."""
    model = tiny_model(variant)
    with torch.no_grad():  # a forgetting that depends on the token and shows within a short input
        for layer in model.model.layers:
            layer.mixer.memory.forget_gate.bias.fill_(-3.0)
            layer.mixer.memory.forget_gate.weight.normal_(0.0, 0.3)
    input_ids = random_ids(2, 3 * SEQ_LEN // 2)
    as_trained = full_logits(model, input_ids)
    memory = model.model.layers[0].mixer.memory
    x = torch.randn(2, SEQ_LEN, model.config.hidden_size)
    log_retain = memory.gates(x)[0]

    model.config.memory_forget_scale = 0.5  # every memory layer reads the model's config at each call
    torch.testing.assert_close(memory.gates(x)[0], 0.5 * log_retain, rtol=0, atol=0)
    half = full_logits(model, input_ids)
    assert (half - as_trained).abs().max() > 1e-4
    torch.testing.assert_close(prefill_then_decode(model, input_ids, SEQ_LEN // 2 + 1), half, rtol=0, atol=1e-4)

    model.config.memory_forget_scale = 0.0
    without_forgetting = tiny_model(variant, use_forgetting=False)
    transplant(model, without_forgetting)
    expected = full_logits(without_forgetting, input_ids)
    torch.testing.assert_close(full_logits(model, input_ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_max_norm_bounds_the_memory_and_keeps_prefill_plus_decode_exact(variant):
    """`memory_max_norm` R projects every head's weight matrices onto ||W||_F <= R where a chunk closes: with R
    below the initial norms it changes the output, prefill (ending mid-chunk) + decode still equals the full forward,
    and the cache's weights lie in the ball; with R above every norm reached it changes nothing."""
    model = tiny_model(variant)
    input_ids = random_ids(2, 3 * SEQ_LEN // 2)
    as_trained = full_logits(model, input_ids)
    initial = [w for layer in model.model.layers for w in layer.mixer.memory.network.initial_weights]
    max_norm = 0.5 * min(torch.linalg.matrix_norm(w).min().item() for w in initial)

    model.config.memory_max_norm = max_norm  # every memory layer reads the model's config at each call
    bounded = full_logits(model, input_ids)
    assert (bounded - as_trained).abs().max() > 1e-4
    cache = TitansCache(model.config)
    with torch.no_grad():
        decoded = prefill_then_decode(model, input_ids, SEQ_LEN // 2 + 1, cache)
    torch.testing.assert_close(decoded, bounded, rtol=0, atol=1e-4)
    for memory in memory_states(cache):
        for weights in memory.snapshot:  # the state at the last chunk boundary
            assert torch.linalg.matrix_norm(weights).max().item() <= max_norm * (1 + 1e-5)

    model.config.memory_max_norm = 1e9
    torch.testing.assert_close(full_logits(model, input_ids), as_trained, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_switching_memory_writes_off_changes_the_output_and_back_on_restores_it(variant):
    model = tiny_model(variant)
    input_ids = random_ids(1, SEQ_LEN)
    learning = full_logits(model, input_ids)
    model.set_memory_writes(False)
    frozen = full_logits(model, input_ids)
    model.set_memory_writes(True)
    assert (learning - frozen).abs().max() > 1e-3
    torch.testing.assert_close(full_logits(model, input_ids), learning, rtol=0, atol=0)


def memory_states(cache):
    """Every layer's memory state (weights M_t, chunk-start weights M_t', momentum S_t) in a cache."""
    return [layer.state.memory for layer in cache.layers]


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_writes_off_leave_a_learned_state_untouched(variant):
    """Switched off after a prefill, when the state already holds momentum: the memory neither moves nor forgets,
    token by token or in a multi-token pass, and the reads use the weights the prefill left."""
    model = tiny_model(variant)
    input_ids = random_ids(2, 3 * SEGMENT)
    prefill = SEGMENT  # a segment and chunk boundary, so the continuation can run as one pass
    with torch.no_grad():
        cache = TitansCache(model.config)
        model(input_ids[:, :prefill], cache=cache)
        before = memory_states(cache)
        assert all(s.abs().max() > 0 for state in before for s in state.momentum)
        model.set_memory_writes(False)
        step_cache = copy.deepcopy(cache)
        steps = [model(input_ids[:, t : t + 1], cache=step_cache).logits for t in range(prefill, input_ids.shape[1])]
        stepped = torch.cat(steps, dim=1)
        in_one_pass = model(input_ids[:, prefill:], cache=cache).logits
        from_scratch = full_logits(model, input_ids)[:, prefill:]
    for old, new in zip(before, memory_states(cache)):
        for name in ("weights", "snapshot", "momentum"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(old, name), getattr(new, name))), name
    torch.testing.assert_close(in_one_pass, stepped, rtol=0, atol=1e-4)
    # The prefill's writes are read (not M_0's), so the continuation differs from a run that never wrote.
    assert (in_one_pass - from_scratch).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Causality and padding in a full forward
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_token_changes_no_earlier_output(variant):
    model = tiny_model(variant)
    input_ids = random_ids(1, SEQ_LEN)
    reference = full_logits(model, input_ids)
    # Positions inside a chunk, on a chunk / segment boundary, and in a later segment / window.
    for j in (2, CHUNK, SEGMENT + 3, 2 * SEGMENT, SEQ_LEN - 1):
        changed = input_ids.clone()
        changed[0, j] = 3 + (changed[0, j] - 3 + 101) % 256
        logits = full_logits(model, changed)
        torch.testing.assert_close(logits[:, :j], reference[:, :j], rtol=0, atol=1e-6)
        assert (logits[:, j] - reference[:, j]).abs().max() > 1e-3, f"token {j} has no effect on its own output"
        if j < SEQ_LEN - WINDOW:
            # Far beyond the window (MAG / MAL) or in a later segment (MAC), only the memory carries the change.
            assert (logits[:, -1] - reference[:, -1]).abs().max() > 1e-5, f"token {j} is forgotten by the end"


@pytest.mark.parametrize("variant", VARIANTS)
def test_right_padding_in_training_forward_matches_each_row_alone(variant):
    model = tiny_model(variant)
    lengths = [SEQ_LEN, SEQ_LEN - 5, SEQ_LEN - SEGMENT, 3]  # pads: 0, 5 (off-chunk), 8, 24
    input_ids = random_ids(len(lengths), SEQ_LEN)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    padded_ids = input_ids.masked_fill(attention_mask == 0, model.config.pad_token_id)
    model.train()  # the training path (use_cache off, dropout is 0)
    batch = model(padded_ids, attention_mask=attention_mask).logits
    for row, length in enumerate(lengths):
        alone = model(input_ids[row : row + 1, :length]).logits
        torch.testing.assert_close(batch[row : row + 1, :length], alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_on_padding_are_ignored(variant):
    model = tiny_model(variant)
    input_ids = random_ids(2, SEQ_LEN)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    logits = full_logits(model, input_ids, attention_mask)
    # The mean next-token loss over real targets, recomputed by hand.
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(loss, per_token / (targets != -100).sum(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Outer gradients
# ----------------------------------------------------------------------------------------------------------------


ABLATIONS_FOR_TRAINING = [{}, *ABLATIONS]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "ablation", ABLATIONS_FOR_TRAINING, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()) or "default"
)
def test_outer_gradients_reach_every_parameter(variant, ablation):
    model = tiny_model(variant, **ablation).train()
    input_ids = random_ids(2, SEQ_LEN)
    model(input_ids, labels=input_ids).loss.backward()
    names = []
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().max() > 0, f"{name} has an all-zero gradient"
        # "Mostly non-zero": the embedding only gets rows of tokens that occur; everything else is dense.
        if "embed_tokens" not in name:
            assert (parameter.grad != 0).float().mean() > 0.5, f"{name}: most gradient entries are zero"
        names.append(name)
    expected = ["memory.lr_gate.bias", "initial_weights.0"]
    gate_parameter = "weight" if model.config.memory_gates_from_input else "bias"  # a constant gate has no weight
    expected += [f"memory.forget_gate.{gate_parameter}"] if model.config.use_forgetting else []
    expected += [f"memory.momentum_gate.{gate_parameter}"] if model.config.use_momentum else []
    if variant != "lmm" and model.config.num_persistent_tokens:
        expected.append("self_attn.persistent_tokens")
    if variant == "mac":
        expected += ["retrieve_q_proj.weight", "retrieve_o_proj.weight"]
    for fragment in expected:
        assert any(fragment in name for name in names), fragment


def saved_bytes_and_gradients(model, input_ids):
    """Bytes of the tensors autograd keeps for backward in a training step (each storage once) and the gradients."""
    seen, total = set(), 0

    def keep(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_recomputed_activations_give_the_same_gradients_with_less_kept(variant, monkeypatch):
    """The elementwise pieces (RMSNorms, the MLP's activation, the memory layer's convolution / SiLU /
    normalisation, the output gates) are recomputed in backward (`recompute_in_backward`): the gradients are those
    of keeping them, bit for bit, and autograd keeps less."""
    from modeling_titans.layers import basics, memory_layer, token_mixers

    model = tiny_model(variant).train()
    input_ids = random_ids(2, SEQ_LEN)
    recomputed, gradients = saved_bytes_and_gradients(model, input_ids)
    for module in (basics, memory_layer, token_mixers):
        monkeypatch.setattr(module, "recompute_in_backward", lambda fn, *args: fn(*args))
    kept, kept_gradients = saved_bytes_and_gradients(model, input_ids)
    for name, gradient in gradients.items():
        assert torch.equal(gradient, kept_gradients[name]), name
    assert recomputed < 0.9 * kept, (recomputed, kept)


def memory_module(memory_depth: int, chunk_size: int) -> torch.nn.Module:
    """One initialised TitansNeuralMemory with tiny dimensions (hidden 8, 2 heads of 4), in float64."""
    config = TitansConfig(
        variant="lmm",
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        memory_num_heads=2,
        memory_depth=memory_depth,
        memory_expansion=2,
        memory_chunk_size=chunk_size,
        segment_size=2 * chunk_size,
        sliding_window=4,
        num_persistent_tokens=0,
        conv_kernel_size=2,
        # A larger inner learning rate and forgetting than the defaults so that the writes matter numerically.
        memory_lr_init=0.5,
        memory_forget_init=0.2,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    return TitansForCausalLM(config).model.layers[0].mixer.memory.double()


MEMORY_PARAMETERS = [
    "mem_q_proj.weight",
    "mem_k_proj.weight",
    "mem_v_proj.weight",
    "conv.weight",
    "forget_gate.weight",
    "forget_gate.bias",
    "momentum_gate.weight",
    "momentum_gate.bias",
    "lr_gate.weight",
    "lr_gate.bias",
    "mem_gate_proj.weight",
    "mem_o_proj.weight",
]


def memory_as_function(memory_depth: int, chunk_size: int, seq_len: int = 6):
    """The memory token mixer as a pure function of (x, parameters...), with float64 inputs for gradcheck."""
    memory = memory_module(memory_depth, chunk_size)
    tokens = TokenInfo.unpadded(1, seq_len)
    names = MEMORY_PARAMETERS + [f"network.initial_weights.{i}" for i in range(memory_depth)]
    parameters = dict(memory.named_parameters())
    torch.manual_seed(1)
    x = torch.randn(1, seq_len, memory.config.hidden_size, dtype=torch.float64, requires_grad=True)
    inputs = (x, *(parameters[name].detach().clone().requires_grad_() for name in names))

    def mixer_output(x, *weights):
        return functional_call(memory, dict(zip(names, weights)), (x, tokens, None))[0]

    # Every input must influence the output (also through functional_call), or gradcheck would pass vacuously.
    gradients = torch.autograd.grad(mixer_output(*inputs).pow(2).sum(), inputs)
    for name, gradient in zip(["x", *names], gradients):
        assert gradient.abs().max() > 1e-8, f"{name} does not reach the output"
    return mixer_output, inputs


@pytest.mark.parametrize("memory_depth, chunk_size", [(2, 2), (1, 3), (2, 4)])  # (2, 4): 6 tokens end mid-chunk
def test_gradcheck_through_the_memory_module(memory_depth, chunk_size):
    """Outer gradients through the inner updates w.r.t. the input, projections, conv, gates and M_0.

    The gates and the output RMSNorm run in fp32 even in a float64 module, so the finite differences use
    eps = 1e-4 and a 1e-3 tolerance: fp32 rounding stays below it, while a dropped gradient path (e.g. the
    inner gradient's dependence on M_{t'}) gives errors of order 0.1 and fails.
    """
    mixer_output, inputs = memory_as_function(memory_depth, chunk_size)
    assert torch.autograd.gradcheck(mixer_output, inputs, eps=1e-4, atol=1e-3, rtol=1e-2, fast_mode=True)


def test_gradcheck_through_the_memory_module_at_float64_precision():
    mixer_output, (x, *weights) = memory_as_function(memory_depth=2, chunk_size=2)
    # Only x is checked (the weights are constants here): it reaches the gates and the norm, and keeps the slow
    # re-run that gradcheck makes on failure short.
    constants = [w.detach() for w in weights]
    assert torch.autograd.gradcheck(mixer_output, (x, *constants), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error before any state changes
# ----------------------------------------------------------------------------------------------------------------


def assert_cache_still_exact(model, cache, input_ids, prefill_length):
    """After a refused call, continuing the cache still reproduces the full forward."""
    continued = [model(input_ids[:, t : t + 1], cache=cache).logits for t in range(prefill_length, input_ids.shape[1])]
    torch.testing.assert_close(
        torch.cat(continued, dim=1), full_logits(model, input_ids)[:, prefill_length:], rtol=0, atol=1e-4
    )


def bad_calls(model):
    """(description, call with a cache prefilled on 2 rows of 5 tokens, exception type, message fragments)."""
    vocab = model.config.vocab_size
    good = random_ids(2, 1, seed=7)
    return [
        (
            "id == vocab_size",
            lambda c: model(good.clone().fill_(vocab), cache=c),
            ValueError,
            ["259", "outside the vocabulary"],
        ),
        ("negative id", lambda c: model(good.clone().fill_(-1), cache=c), ValueError, ["-1", "outside the vocabulary"]),
        (
            "mask of the wrong length",
            lambda c: model(good, attention_mask=torch.ones(2, 3, dtype=torch.long), cache=c),
            ValueError,
            ["attention_mask has shape (2, 3)", "(2, 6)"],
        ),
        (
            "3D mask",
            lambda c: model(good, attention_mask=torch.ones(2, 1, 6), cache=c),
            ValueError,
            ["attention_mask has shape (2, 1, 6)"],
        ),
        ("too many rows", lambda c: model(random_ids(3, 1), cache=c), ValueError, ["cache holds 2 rows", "has 3"]),
        (
            "padding in a mid-chunk continuation",
            lambda c: model(random_ids(2, 3), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), cache=c),
            ValueError,
            ["Padding inside a continuation"],
        ),
        (
            "DynamicCache",
            lambda c: model(good, past_key_values=DynamicCache()),
            TypeError,
            ["TitansCache", "DynamicCache"],
        ),
        (
            "ids and embeddings",
            lambda c: model(good, inputs_embeds=torch.zeros(2, 1, 32), cache=c),
            ValueError,
            ["exactly one"],
        ),
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_inputs_raise_clear_errors_and_leave_the_cache_intact(variant):
    model = tiny_model(variant)
    input_ids = random_ids(2, 12)
    prefill = 5  # mid-chunk and mid-segment
    with torch.no_grad():
        cache = TitansCache(model.config)
        model(input_ids[:, :prefill], cache=cache)
        for description, call, error_type, fragments in bad_calls(model):
            with pytest.raises(error_type) as error:
                call(cache)
            for fragment in fragments:
                assert fragment in str(error.value), (description, str(error.value))
        assert cache.get_seq_length() == prefill
        assert_cache_still_exact(model, cache, input_ids, prefill)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_between_real_tokens_matches_each_row_without_it(variant):
    """Pads between real tokens (what generate() without a cache feeds for a right-padded batch: real tokens, pads,
    generated tokens) neither write nor take attention, and positions count real tokens only."""
    model = tiny_model(variant)
    input_ids = random_ids(3, SEQ_LEN)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:10] = 0  # a gap of 5, off the chunk and segment grid
    attention_mask[2, :2], attention_mask[2, SEGMENT : 2 * SEGMENT] = 0, 0  # left padding and a gap of a segment
    padded_ids = input_ids.masked_fill(attention_mask == 0, model.config.pad_token_id)
    logits = full_logits(model, padded_ids, attention_mask)
    for row, mask in enumerate(attention_mask.bool()):
        alone = full_logits(model, input_ids[row : row + 1, mask])
        torch.testing.assert_close(logits[row : row + 1, mask], alone, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Hidden states and attention weights
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_hidden_states(variant):
    model = tiny_model(variant)
    input_ids = random_ids(2, SEQ_LEN)
    outputs = model.model(input_ids, output_hidden_states=True)
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, SEQ_LEN, model.config.hidden_size) for h in hidden_states)
    torch.testing.assert_close(hidden_states[0], model.model.embed_tokens(input_ids), rtol=0, atol=0)
    torch.testing.assert_close(hidden_states[-1], outputs.last_hidden_state, rtol=0, atol=0)
    assert not torch.equal(hidden_states[1], hidden_states[0])


@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_eager_attention_returns_sliding_window_weights(variant):
    model = tiny_model(variant)
    model.set_attn_implementation("eager")
    input_ids = random_ids(2, SEQ_LEN)
    outputs = model(input_ids, output_attentions=True)
    persistent = model.config.num_persistent_tokens
    assert len(outputs.attentions) == model.config.num_hidden_layers
    for weights in outputs.attentions:
        assert weights.shape == (2, model.config.num_attention_heads, SEQ_LEN, persistent + SEQ_LEN)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        # Query i may see the persistent prefix and keys i - W + 1 .. i, nothing else.
        query = torch.arange(SEQ_LEN)[:, None]
        key = torch.arange(SEQ_LEN)[None, :]
        hidden = (key > query) | (key <= query - WINDOW)
        assert weights[..., persistent:][..., hidden].abs().max() == 0
        assert (weights[..., :persistent] > 0).all()
    # The eager path computes the same logits as the default one (up to the kernels' rounding).
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(full_logits(model, input_ids), outputs.logits, rtol=0, atol=1e-4)


def test_attention_weights_without_eager_warn_and_return_none(caplog):
    """As Llama under SDPA: a warning, no weights, the same logits."""
    model = tiny_model("mag")
    assert model.config._attn_implementation == "sdpa"
    input_ids = random_ids(1, 8)
    logging.Logger.warning_once.cache_clear()  # the warning is given once per message and process
    with caplog.at_level(logging.WARNING):
        outputs = model(input_ids, output_attentions=True)
    assert 'attn_implementation="eager"' in caplog.text
    assert outputs.attentions == ()
    torch.testing.assert_close(outputs.logits, full_logits(model, input_ids), rtol=0, atol=0)


def eager_model(variant):
    model = tiny_model(variant)
    model.set_attn_implementation("eager")
    return model


def key_columns(model, columns) -> list[int]:
    """The indices, in returned attention weights, of the persistent keys and of the keys of input `columns`
    (MAC: the retrieved token, then the token, of each column)."""
    per_column = 2 if model.config.variant == "mac" else 1
    persistent = model.config.num_persistent_tokens
    return list(range(persistent)) + [persistent + per_column * c + k for c in columns for k in range(per_column)]


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_attention_weights_are_aligned_with_the_input_columns_under_any_padding(variant):
    """(batch, heads, T, P + keys) whatever the padding; each row's weights on its real tokens are those of the row
    alone, and pads (as queries or keys) have none."""
    model = eager_model(variant)
    lengths = [SEQ_LEN, SEQ_LEN - 5, 7]
    input_ids = random_ids(len(lengths), SEQ_LEN)
    attention_mask = torch.zeros_like(input_ids)
    attention_mask[0] = 1
    attention_mask[1, 5:] = 1  # left padding
    attention_mask[2, :3], attention_mask[2, 20:24] = 1, 1  # real tokens, pads, real tokens, pads
    padded_ids = input_ids.masked_fill(attention_mask == 0, model.config.pad_token_id)
    with torch.no_grad():
        attentions = model(padded_ids, attention_mask=attention_mask, output_attentions=True).attentions
    width = len(key_columns(model, range(SEQ_LEN)))
    assert len(attentions) == model.config.num_hidden_layers
    for row, mask in enumerate(attention_mask.bool()):
        real = mask.nonzero().squeeze(1).tolist()
        with torch.no_grad():
            alone = model(input_ids[row : row + 1, mask], output_attentions=True).attentions
        for weights, weights_alone in zip(attentions, alone):
            assert weights.shape == (len(lengths), model.config.num_attention_heads, SEQ_LEN, width)
            real_keys = key_columns(model, real)
            torch.testing.assert_close(weights[row][:, real][..., real_keys], weights_alone[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(weights[row][:, real].sum(-1), torch.ones_like(weights[row][:, real, 0]))
            assert not weights[row][:, ~mask].any()  # pad queries
            pad_keys = [k for k in range(width) if k not in real_keys]
            assert not weights[row][..., pad_keys].any()  # pad keys


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_attention_weights_of_cached_steps_are_rows_of_the_full_forward(variant):
    """With a cache, a call's key axis covers every column so far (the cached ones included), so a decoded token's
    weights are the matching row of the full forward's, and a continuation from mid-segment gives the same rows."""
    model = eager_model(variant)
    input_ids = random_ids(2, SEQ_LEN)
    prefill = SEGMENT + 3  # mid-chunk, mid-segment: the 4-token continuation runs token by token
    with torch.no_grad():
        full = model(input_ids, output_attentions=True).attentions
        cache = TitansCache(model.config)
        first = model(input_ids[:, :prefill], cache=cache, output_attentions=True).attentions
        rest = model(input_ids[:, prefill : prefill + 4], cache=cache, output_attentions=True).attentions
        step = model(input_ids[:, prefill + 4 : prefill + 5], cache=cache, output_attentions=True).attentions
    for layer, weights in enumerate(full):
        for part, start, end in ((first, 0, prefill), (rest, prefill, prefill + 4), (step, prefill + 4, prefill + 5)):
            width = len(key_columns(model, range(end)))
            assert part[layer].shape == (2, model.config.num_attention_heads, end - start, width)
            torch.testing.assert_close(part[layer], weights[:, :, start:end, :width], rtol=0, atol=1e-5)
            assert weights[:, :, start:end, width:].abs().max() == 0  # nothing later is seen


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_decoding_past_a_full_key_buffer_then_continuing_in_parallel_equals_the_full_forward(variant):
    """Decoding writes new keys over ones no longer seen, so the buffer's columns leave position order; the weights
    of each step and a later multi-token continuation (which slices and trims that buffer) stay exact."""
    model = eager_model(variant)
    prefill, decoded = SEGMENT, 3 * SEGMENT + WINDOW  # the buffer is overwritten several times over
    input_ids = random_ids(2, prefill + decoded + SEGMENT + 3, seed=5)
    with torch.no_grad():
        full = model(input_ids, output_attentions=True)
        cache = TitansCache(model.config)
        logits = [model(input_ids[:, :prefill], cache=cache).logits]
        for t in range(prefill, prefill + decoded):
            step = model(input_ids[:, t : t + 1], cache=cache, output_attentions=True)
            logits.append(step.logits)
            width = len(key_columns(model, range(t + 1)))
            for layer, weights in enumerate(full.attentions):
                torch.testing.assert_close(step.attentions[layer], weights[:, :, t : t + 1, :width], rtol=0, atol=1e-5)
        logits.append(model(input_ids[:, prefill + decoded :], cache=cache).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full.logits, rtol=0, atol=1e-4)


def test_attention_weights_of_mac_see_the_prefix_the_retrieved_tokens_and_the_segment():
    model = eager_model("mac")
    persistent = model.config.num_persistent_tokens
    with torch.no_grad():
        attentions = model(random_ids(2, SEQ_LEN), output_attentions=True).attentions
    query = torch.arange(SEQ_LEN)[:, None]
    key = torch.arange(SEQ_LEN)[None, :]
    # Query i sees h_j and x_j for j in its own segment up to i.
    seen = (key <= query) & (key // SEGMENT == query // SEGMENT)
    for weights in attentions:
        assert weights.shape == (2, model.config.num_attention_heads, SEQ_LEN, persistent + 2 * SEQ_LEN)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert (weights[..., :persistent] > 0).all()
        retrieved, tokens = weights[..., persistent::2], weights[..., persistent + 1 :: 2]
        for part in (retrieved, tokens):
            assert part[..., ~seen].abs().max() == 0 and (part[..., seen] > 0).all()


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_generate_returns_the_attention_weights_of_every_step(variant):
    model = eager_model(variant)
    prompt_length, new_tokens = 9, 4
    outputs = model.generate(
        random_ids(2, prompt_length), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_attentions=True, return_dict_in_generate=True,
    )
    assert len(outputs.attentions) == new_tokens
    for step, layers in enumerate(outputs.attentions):
        queries = prompt_length if step == 0 else 1
        width = len(key_columns(model, range(prompt_length + step)))
        assert all(w.shape == (2, model.config.num_attention_heads, queries, width) for w in layers)


# ----------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained and the Auto classes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, variant):
    model = tiny_model(variant, tie_word_embeddings=variant != "mal")  # one untied variant
    input_ids = random_ids(2, SEQ_LEN)
    expected = full_logits(model, input_ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for loader in (TitansForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is TitansForCausalLM
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
        # Bit-equal weights; the logits may still differ by rounding (the loaded tensors sit in other memory,
        # which can change the order of BLAS accumulations; cloning every parameter makes them bit-equal).
        torch.testing.assert_close(full_logits(loaded, input_ids), expected, rtol=0, atol=1e-4)
        # And the loaded model keeps decoding exactly.
        torch.testing.assert_close(prefill_then_decode(loaded, input_ids, 5), expected, rtol=0, atol=1e-4)


def test_auto_classes_resolve_titans(tmp_path):
    config = tiny_config("mac")
    fields = {k: v for k, v in config.to_diff_dict().items() if k != "model_type"}
    assert type(AutoConfig.for_model("titans", **fields)) is TitansConfig
    assert type(AutoModel.from_config(config)) is TitansModel
    assert type(AutoModelForCausalLM.from_config(config)) is TitansForCausalLM
    tiny_model("mac").model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is TitansModel


# ----------------------------------------------------------------------------------------------------------------
# Stability of the inner loop at the default gates
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_depth", [1, 2])
def test_memory_stays_bounded_at_the_default_gates(memory_depth):
    """A chunk of c tokens moves the weights by about theta * sum_s (1 - eta^s) / (1 - eta) times the gradient
    along the keys' common direction; with the old default cap theta_max = 1 the linear memory of the upper
    layers blew up to inf within 512 tokens. The default gates must keep every layer's memory bounded: within twice
    the norm of M_0."""
    config = TitansConfig(
        variant="mag", vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, memory_num_heads=4, memory_expansion=2, memory_depth=memory_depth,
        sliding_window=64, num_persistent_tokens=4,
    )
    torch.manual_seed(1)
    model = TitansForCausalLM(config).eval()
    input_ids = torch.randint(3, 4096, (1, 512), generator=torch.Generator().manual_seed(0))
    cache = TitansCache(config)
    with torch.no_grad():
        model(input_ids, cache=cache)
    for decoder_layer, layer in zip(model.model.layers, cache.layers):
        initial = decoder_layer.mixer.memory.network.initial_weights
        for weights, start in zip(layer.state.memory.weights, initial):
            assert torch.isfinite(weights).all()
            assert weights.norm(dim=(-2, -1)).max() < 2 * start.norm(dim=(-2, -1)).max()
