"""Training Titans with the Hugging Face Trainer.

1. Trainer from scratch and from a saved model; gradient accumulation gives the gradient of the equivalent big
   batch (the model passes `num_items_in_batch` to its loss); resuming from a checkpoint reproduces the
   uninterrupted run; eval perplexity = exp(eval_loss) is the token-level perplexity.
3. Activation checkpointing: same loss and gradients as the plain run, and the layers really are recomputed.
5. Mixed precision: bf16 weights with the memory state kept in fp32; training and generation run.
Bad input: a resume directory without checkpoints, a checkpoint of another variant.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_titans import TitansCache, TitansConfig, TitansForCausalLM
from modeling_titans.configuration.configuration_titans import VARIANTS

TEXT = b"Titans learn to memorize at test time. " * 40


def tiny_model(variant: str = "mac", seed: int = 0, **overrides) -> TitansForCausalLM:
    torch.manual_seed(seed)
    return TitansForCausalLM(TitansConfig.from_preset("tiny", variant=variant, **overrides))


def text_examples(num_examples: int, length: int, offset: int = 0) -> list[dict]:
    """Byte-level examples (tiny preset: byte b is token b + 3) cut from a repetitive text, all of one length."""
    ids = torch.tensor(list(TEXT), dtype=torch.long) + 3
    starts = [(offset + 7 * i) % (len(ids) - length) for i in range(num_examples)]
    return [{"input_ids": ids[s : s + length], "labels": ids[s : s + length].clone()} for s in starts]


def ragged_examples(lengths: list[int], pad_to: int) -> list[dict]:
    """Right-padded random examples with different numbers of real tokens (labels -100 on the padding)."""
    generator = torch.Generator().manual_seed(3)
    examples = []
    for length in lengths:
        ids = torch.zeros(pad_to, dtype=torch.long)
        ids[:length] = torch.randint(3, 259, (length,), generator=generator)
        mask = (torch.arange(pad_to) < length).long()
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return examples


def training_args(output_dir, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=True,
    )
    return TrainingArguments(**{**defaults, **overrides})


def logged_losses(trainer: Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---- 1. Trainer ----------------------------------------------------------------------------------------------------


def test_trainer_from_scratch_then_from_saved_model(tmp_path):
    train, evaluation = text_examples(16, 24), text_examples(4, 24, offset=3)
    model = tiny_model("mac")
    args = training_args(tmp_path / "run", max_steps=12, learning_rate=3e-3)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    initial_eval_loss = trainer.evaluate()["eval_loss"]
    trainer.train()
    trained_eval_loss = trainer.evaluate()["eval_loss"]
    assert trained_eval_loss < initial_eval_loss - 0.5

    # Eval perplexity: exp(eval_loss) is the perplexity over all predicted tokens (rows have equal lengths).
    batch = torch.stack([example["input_ids"] for example in evaluation])
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits
    token_nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    assert math.exp(trained_eval_loss) == pytest.approx(math.exp(token_nll.item()), rel=1e-5)

    # From a saved model: the Auto class loads the same weights and training goes on from there.
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded, TitansForCausalLM)
    trainer = Trainer(model=reloaded, args=training_args(tmp_path / "more", max_steps=6, learning_rate=3e-3),
                      train_dataset=train, eval_dataset=evaluation)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trained_eval_loss, abs=1e-6)
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < trained_eval_loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_accumulation_matches_big_batch(tmp_path, variant):
    """One SGD step with lr 1 moves the parameters by minus the gradient. Rows hold different numbers of real
    tokens, so averaging two micro-batch means (no `num_items_in_batch`) would give a different gradient."""
    examples = ragged_examples([14, 3, 16, 6], pad_to=16)
    reference = tiny_model(variant)
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    reference(**batch).loss.backward()  # the mean over every real next-token prediction of the 4 rows
    expected = {name: p.detach() - p.grad for name, p in reference.named_parameters()}

    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        model = tiny_model(variant)
        args = training_args(
            tmp_path / f"bs{batch_size}", per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
        )
        Trainer(model=model, args=args, train_dataset=examples).train()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name], atol=1e-6, rtol=1e-5, msg=f"{name}, bs {batch_size}")


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path):
    train = text_examples(8, 16)
    uninterrupted = Trainer(
        model=tiny_model("mag"), args=training_args(tmp_path / "full", max_steps=6), train_dataset=train
    )
    uninterrupted.train()

    interrupted = Trainer(
        model=tiny_model("mag"),
        args=training_args(tmp_path / "stopped", max_steps=3, save_strategy="steps", save_steps=3),
        train_dataset=train,
    )
    interrupted.train()
    resumed = Trainer(
        model=tiny_model("mag", seed=123),  # the checkpoint replaces these weights
        args=training_args(tmp_path / "stopped", max_steps=6),
        train_dataset=train,
    )
    resumed.train(resume_from_checkpoint=True)  # the latest checkpoint in output_dir: checkpoint-3

    assert logged_losses(resumed) == pytest.approx(logged_losses(uninterrupted), abs=1e-6)
    assert sorted(logged_losses(resumed)) == [1, 2, 3, 4, 5, 6]
    full = parameters(uninterrupted.model)
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p.detach(), full[name], atol=1e-6, rtol=1e-5, msg=name)


def test_resume_directory_without_checkpoint_is_a_clear_error(tmp_path):
    trainer = Trainer(model=tiny_model("mag"), args=training_args(tmp_path / "empty", max_steps=1),
                      train_dataset=text_examples(2, 8))
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "empty" / "checkpoint-5"))


def test_checkpoint_of_another_variant_is_a_clear_error(tmp_path):
    tiny_model("mag").save_pretrained(tmp_path / "mag")
    with pytest.raises(ValueError, match="variant"):
        TitansForCausalLM.from_pretrained(tmp_path / "mag", config=TitansConfig.from_preset("tiny", variant="mac"))


@pytest.mark.parametrize(
    "saved, config",
    [("mag", {"num_hidden_layers": 3}), ("lmm", {"variant": "mag"}), ("mag", {"use_momentum": False})],
    ids=["deeper", "lmm-as-mag", "no-momentum"],
)
def test_checkpoint_of_another_structure_is_a_clear_error_also_with_loading_info(tmp_path, saved, config):
    tiny_model(saved).save_pretrained(tmp_path / "saved")
    config = TitansConfig.from_preset("tiny", **{"variant": saved, **config})
    for wants_info in (False, True):
        with pytest.raises(ValueError, match="another structure"):
            TitansForCausalLM.from_pretrained(tmp_path / "saved", config=config, output_loading_info=wants_info)


def test_missing_weights_are_reported_like_any_model(tmp_path):
    """A checkpoint of the model's own structure that lacks a weight loads with the weight initialised and listed
    in the loading info, as transformers does for every model."""
    tiny_model("mag").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    missing = "model.layers.1.mlp.down_proj.weight"
    del tensors[missing]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = TitansForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {missing} and not info["unexpected_keys"]
    assert isinstance(TitansForCausalLM.from_pretrained(tmp_path), TitansForCausalLM)
    reference = tiny_model("mag").state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in model.state_dict().items() if name != missing)


def test_variant_keyword_of_from_pretrained_is_explained(tmp_path):
    tiny_model("mag").save_pretrained(tmp_path / "mag")
    with pytest.raises(ValueError, match="weights-file variant"):
        TitansForCausalLM.from_pretrained(tmp_path / "mag", variant="mac")


def test_checkpoint_with_other_sizes_is_an_error(tmp_path):
    tiny_model("mag").save_pretrained(tmp_path / "mag")
    wider = TitansConfig.from_preset("tiny", variant="mag", hidden_size=64)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        TitansForCausalLM.from_pretrained(tmp_path / "mag", config=wider)


# ---- 3. Activation checkpointing ------------------------------------------------------------------------------------


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant):
    batch = ragged_examples([20, 13], pad_to=20)
    batch = {key: torch.stack([example[key] for example in batch]) for key in batch[0]}
    model = tiny_model(variant).train()
    memory_calls = []
    model.model.layers[0].mixer.memory.register_forward_hook(lambda *_: memory_calls.append(1))
    plain_loss, plain_grads = loss_and_gradients(model, batch)
    plain_calls = len(memory_calls)

    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_gradients(model, batch)
    assert len(memory_calls) == 3 * plain_calls  # forward and its replay in backward: checkpointing is really on

    torch.testing.assert_close(checkpointed_loss, plain_loss, atol=1e-5, rtol=0)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_trainer_activation_checkpointing_switch(tmp_path):
    train = text_examples(4, 16)
    runs = {}
    for switch in (False, True):
        model = tiny_model("mac")
        Trainer(model=model, args=training_args(tmp_path / str(switch), max_steps=2, activation_checkpointing=switch),
                train_dataset=train).train()
        assert model.model.layers[0].gradient_checkpointing is switch
        runs[switch] = parameters(model)
    for name, p in runs[True].items():
        torch.testing.assert_close(p, runs[False][name], atol=1e-5, rtol=1e-5, msg=name)


# ---- 5. Mixed precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_keep_memory_state_in_fp32(dtype):
    model = tiny_model("mac").to(dtype).eval()
    prompt = torch.randint(3, 259, (1, 6))
    cache = TitansCache(model.config)
    with torch.no_grad():
        logits = model(prompt, cache=cache, use_cache=True).logits
        reference = tiny_model("mac").eval()(prompt).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)  # close to fp32: no overflow or NaN
    for layer in cache.layers:
        memory = layer.state.memory
        for tensor in memory.weights + memory.snapshot + memory.momentum + layer.state.segment_start:
            assert tensor.dtype == torch.float32


def test_bf16_training_step_and_generation():
    model = tiny_model("mag").to(torch.bfloat16)
    batch = torch.randint(3, 259, (1, 8))
    before = parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = model(batch, labels=batch)
    outputs.loss.backward()  # the HF loss upcasts the bf16 logits to fp32
    optimizer.step()
    assert outputs.logits.dtype == torch.bfloat16 and torch.isfinite(outputs.loss)
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())

    out = model.eval().generate(batch[:, :4], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 7)
    assert all(w.dtype == torch.float32 for layer in out.cache.layers for w in layer.state.memory.weights)
