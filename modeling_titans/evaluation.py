"""Evaluation of a causal LM (Titans or any other): exact-match answers on the built-in long-context tasks, and
bits per byte on text. Used by `titans eval`, `titans demo` and the benchmarks.

- `task_accuracy`: greedy answers to test examples of one context length and needle distance, in left-padded
  batches; an answer counts when the generated text starts with it (`tasks.answer_is_correct`). The tasks measure
  lengths and distances in characters, which are tokens for the byte tokenizer; for any other tokenizer the
  result also says how many tokens the needle really lies back (`needle_distance_tokens`).
- `text_bits_per_byte`: the text cut into sequences of `seq_len` tokens, each scored from a fresh state (a
  Titans memory starts at M_0), loss summed over every predicted token that stands for text (special tokens such
  as `</s>` are context, not scored) and divided by the UTF-8 bytes those tokens stand for. Bits per byte
  compares models with different tokenizers; with the byte tokenizer it is the loss per token in bits.
"""

from __future__ import annotations

import math

import torch

from .tasks import answer_is_correct, generate_examples, minimum_length, needle_distance_range, shortest_sequence

# The longest context `titans eval` builds examples for: far beyond what any CPU run scores, and a guard against
# a typo (an extra zero) that would otherwise allocate gigabytes before failing.
MAX_EVAL_LENGTH = 1_048_576


def check_task_cell(task: str, length: int, distance: int | None) -> tuple[int, int]:
    """The needle distances a context of `length` tokens allows; ValueError for a length or distance out of range."""
    shortest = shortest_sequence(task)
    if not shortest <= length <= MAX_EVAL_LENGTH:
        raise ValueError(f"Length {length} does not fit the {task} task: use {shortest} to {MAX_EVAL_LENGTH:,} tokens.")
    lowest, highest = needle_distance_range(task, length - 2)
    if distance is not None and not lowest <= distance <= highest:
        raise ValueError(f"Needle distance {distance} does not fit length {length}: use {lowest} to {highest}.")
    return lowest, highest


def default_distances(task: str, length: int) -> list[int]:
    """Three needle distances for a context of `length` tokens: the nearest, the middle and the farthest it allows
    (fewer when they coincide); ValueError for a length out of range."""
    lowest, highest = check_task_cell(task, length, None)
    return sorted({lowest, (lowest + highest) // 2, highest})


def sequence_length_for(task: str, distance: int) -> int:
    """The shortest sequence (tokens, with <s> and </s>) whose examples can put the needle at `distance`."""
    probe = minimum_length(task)
    room_before_needle = probe - needle_distance_range(task, probe)[1]
    return max(probe, distance + room_before_needle) + 2


def digits_right(answer: str, generated: str) -> float:
    """Fraction of the answer's characters generated at their place (for a passkey: its digits, chance 10%);
    shows partial recall that exact match hides."""
    generated = generated.lstrip()
    return sum(a == g for a, g in zip(answer, generated)) / len(answer)


@torch.no_grad()
def task_accuracy(
    model,
    tokenizer,
    task: str,
    length: int,
    distance: int,
    num_examples: int,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 8,
    progress=None,
) -> dict:
    """Greedy answers to `num_examples` examples of one context length (tokens, with <s> and </s>) and needle
    distance; returns the counts, the accuracy, the per-character accuracy and every answer. `progress`, if
    given, is called with the number of examples done after each batch."""
    examples = generate_examples(task, split, num_examples, length - 2, seed, distance)
    tokenizer.padding_side = "left"  # generation continues every row from the same last column
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = tokenizer([example.prompt for example in batch], padding=True, return_tensors="pt").to(device)
        answer_tokens = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in batch)
        output = model.generate(
            **inputs, max_new_tokens=answer_tokens + 1, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if progress is not None:
            progress(len(batch))
    records = [
        {"answer": example.answer, "generated": text, "correct": answer_is_correct(example, text)}
        for example, text in zip(examples, answers)
    ]
    correct = sum(record["correct"] for record in records)
    token_distances = [tokens_after_needle(tokenizer, example) for example in examples]
    return {
        "length": length,
        "needle_distance": distance,
        "needle_distance_tokens": round(sum(token_distances) / len(token_distances), 1),
        "correct": correct,
        "total": len(records),
        "accuracy": correct / len(records),
        "digit_accuracy": sum(digits_right(r["answer"], r["generated"]) for r in records) / len(records),
        "examples": records,
    }


def tokens_after_needle(tokenizer, example) -> int:
    """How many tokens of `example`'s prompt follow its needle: the needle distance in the tokenizer's tokens (the
    task's `needle_distance` counts characters). The prompt is tokenized whole and without its tail, so a token
    that straddles the needle's end counts as after it."""
    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count(example.prompt) - count(example.prompt[: example.needle_end])


def token_bytes(tokenizer) -> torch.Tensor:
    """(vocab,) the number of UTF-8 bytes each token id stands for (0 for special tokens)."""
    special = set(tokenizer.all_special_ids)
    sizes = [
        0 if token_id in special else len(tokenizer.decode([token_id]).encode("utf-8"))
        for token_id in range(len(tokenizer))
    ]
    return torch.tensor(sizes, dtype=torch.long)


def text_sequences(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """(n, seq_len) token ids: each text as `<s> tokens </s>`, all concatenated and cut into full sequences."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [t for text in texts for t in bos + tokenizer(text, add_special_tokens=False)["input_ids"] + eos]
    count = len(stream) // seq_len
    if count == 0:
        raise ValueError(f"The text holds {len(stream)} tokens, fewer than one sequence of {seq_len}.")
    return torch.tensor(stream[: count * seq_len]).view(count, seq_len)


@torch.no_grad()
def text_bits_per_byte(model, tokenizer, texts: list[str], seq_len: int, batch_size: int = 4, max_sequences=None, progress=None) -> dict:
    """Bits per byte of `model` on `texts` (module docstring) at a context of `seq_len` tokens."""
    sequences = text_sequences(tokenizer, texts, seq_len)
    if max_sequences is not None:
        sequences = sequences[:max_sequences]
    sizes = token_bytes(tokenizer)
    device = next(model.parameters()).device
    total_bits, total_bytes, total_tokens = 0.0, 0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        target_bytes = sizes.to(device)[targets]
        nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_bits += nats[target_bytes > 0].sum().item() / math.log(2)
        total_bytes += int(target_bytes.sum())
        total_tokens += int((target_bytes > 0).sum())
        if progress is not None:
            progress(len(batch))
    return {
        "seq_len": seq_len,
        "sequences": len(sequences),
        "tokens": total_tokens,
        "bytes": total_bytes,
        "bits_per_byte": total_bits / max(total_bytes, 1),
        "perplexity": math.exp(total_bits * math.log(2) / total_tokens),
    }
