"""The main job in one call (`titans demo`): train a small Titans on CPU on the built-in passkey task, show it
recalling codes placed far beyond its attention window, and answer one prompt through
`pipeline("text-generation")`.

1. Trains the model on `passkey` examples (loss on the answer) with the shared recipe (`training.train_on_tasks`),
   through a length curriculum: short sequences first (few filler tokens write into the memory, so the signal
   that teaches the memory to store the code is strong), then longer ones. The needle always lies beyond the
   attention window (the question alone is longer than the window), so attention alone cannot answer.
2. Saves the model and tokenizer to `DIR/model` (loadable with the Auto classes), with the `training_summary.json`
   that `titans train` writes (`titans eval DIR/model` then knows the task and the training length).
3. Measures exact-match recall on the test split with needles at `WINDOW_MULTIPLES` times the attention reach,
   as trained and with the memory's test-time writes switched off (`model.set_memory_writes(False)`), which
   leaves attention alone with the needle out of its reach; optionally also a same-size model trained with its
   memory writes off throughout.
4. Reloads the saved model with `AutoModelForCausalLM` and answers one test prompt through the pipeline.
"""

from __future__ import annotations

import math
import os

from transformers import pipeline, set_seed

from .checkpoints import load_model_and_tokenizer
from .configuration import TitansConfig
from .evaluation import sequence_length_for, task_accuracy
from .layers.token_mixers import attention_reach
from .modeling import TitansForCausalLM
from .tasks import answer_is_correct, generate_examples
from .training import save_training_summary, train_on_tasks

TASK = "passkey"
# Test needle distances, in attention reaches. The farthest (2K tokens back for the demo preset) lies 5x beyond the
# longest training sequence (384 tokens): recall there is the memory generalising with length.
WINDOW_MULTIPLES = (8, 32, 64)
RESULTS_NAME = "demo_results.json"
DEMO_PRESET = "demo"
# Fields a variant changes in the demo preset. The preset's inner learning rate (relative theta_max 1.5) teaches MAG
# the task in its budget; MAC needs a larger inner step: at 1.5 it stays near chance, at 2.0 it learns the task
# (benchmarks/README.md, "The demo's recipe for each variant").
DEMO_VARIANT_FIELDS = {"mac": {"memory_lr_max": 2.0}}
# Fields a deep memory (depth >= 2, the paper's memory MLP) changes in the demo preset. It needs a larger inner step
# still: at theta_max 1.5 a depth-2 MAG stays near chance for the demo's 2000 steps, at 3.0 it learns the task and
# carries the code further than the matrix memory, as does MAL; MAC with a deep memory learns it at 3.0 in 4000
# steps, not in 2000 (benchmarks/README.md, "Deep vs matrix memory on recall").
DEMO_DEEP_MEMORY_FIELDS = {"memory_lr_max": 3.0}


def demo_config(preset: str = DEMO_PRESET, variant: str | None = None, memory_depth: int | None = None):
    """The demo's model: `preset` with `variant` and `memory_depth` (default: the preset's); the demo preset also
    gets the fields that variant and a deep memory need to learn the task (`DEMO_VARIANT_FIELDS`,
    `DEMO_DEEP_MEMORY_FIELDS`). ValueError for an unknown preset or variant, or a depth below 1."""
    fields = {} if variant is None else {"variant": variant}
    if memory_depth is not None:
        fields["memory_depth"] = memory_depth
    if preset == DEMO_PRESET:
        fields.update(DEMO_VARIANT_FIELDS.get(variant, {}))
        if memory_depth is not None and memory_depth > 1:
            fields.update(DEMO_DEEP_MEMORY_FIELDS)
    return TitansConfig.from_preset(preset, **fields)


def train_on_passkey(config, tokenizer, seq_lens, seed, memory_writes=True, **recipe):
    """A fresh model trained on the passkey curriculum; returns it (eval mode, memory writes on) and its losses.
    `memory_writes=False` trains the memory-less baseline (every memory frozen at its M_0)."""
    set_seed(seed)
    model = TitansForCausalLM(config)
    model.set_memory_writes(memory_writes)
    label = "Titans" if memory_writes else "baseline (no memory writes)"
    print(f"\nTraining {label}: {model.num_parameters():,} parameters, {recipe['steps']} steps, batch {recipe['batch_size']}.")
    history = train_on_tasks(model, tokenizer, [TASK], seq_lens, seed=seed, **recipe)
    model.set_memory_writes(True)
    return model.eval(), history


def recall(model, tokenizer, length: int, distances: list[int], num_examples: int, seed: int, memory_writes: bool,
           split: str = "test", batch_size: int = 25):
    """Exact-match and per-digit accuracy of greedy answers on `split`, one cell per needle distance, with the
    memory's test-time writes on or off (on again afterwards)."""
    model.set_memory_writes(memory_writes)
    try:
        cells = [
            task_accuracy(model, tokenizer, TASK, length, distance, num_examples, split, seed, batch_size=batch_size)
            for distance in distances
        ]
    finally:
        model.set_memory_writes(True)
    keys = ("needle_distance", "correct", "total", "accuracy", "digit_accuracy")
    return [{key: cell[key] for key in keys} for cell in cells]


def generate_answer(model, tokenizer, length: int, distance: int, seed: int) -> dict:
    """One test prompt answered through `pipeline("text-generation")` (greedy)."""
    example = generate_examples(TASK, "test", 1, length - 2, seed=seed + 1, needle_distance=distance)[0]
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    answer_tokens = len(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
    output = generator(
        example.prompt,
        max_new_tokens=answer_tokens + 1,
        do_sample=False,
        return_full_text=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = output[0]["generated_text"]
    return {
        "needle": example.prompt[example.needle_start : example.needle_end],
        "needle_distance": example.needle_distance,
        "question": example.prompt.rsplit("\n", 1)[-1],
        "expected": example.answer,
        "generated": text,
        "correct": answer_is_correct(example, text),
    }


def run_demo(
    config,
    tokenizer,
    output_dir: str,
    seq_lens: list[int],
    steps: int = 2000,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    eval_every: int = 100,
    eval_examples: int = 50,
    train_baseline: bool = False,
    seed: int = 0,
) -> dict:
    """Train, save, measure recall with and without the memory, reload and generate: the results as a dict."""
    window = attention_reach(config) or config.sliding_window  # a model without attention: the window field
    distances = [multiple * window for multiple in WINDOW_MULTIPLES]
    eval_length = sequence_length_for(TASK, max(distances))
    print(
        f"Titans demo: {config.variant.upper()} model, attention reach {window} tokens, task {TASK}; test needles "
        f"at {', '.join(f'{d} tokens ({m}x)' for d, m in zip(distances, WINDOW_MULTIPLES))}."
    )
    common = dict(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, eval_every=eval_every,
        eval_examples=eval_examples, seed=seed,
    )
    model, history = train_on_passkey(config, tokenizer, seq_lens, **common)
    model_dir = os.path.join(output_dir, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    described = {
        "variant": config.variant, "memory_depth": config.memory_depth, "num_parameters": model.num_parameters()
    }
    recipe = {key: common[key] for key in ("steps", "batch_size", "learning_rate", "seed")}
    save_training_summary(
        {
            "model": described,
            "data": {"task": TASK},
            "training": {"seq_len": seq_lens, **recipe, "seconds_this_run": history["seconds"]},
            "loss_curve": {"train": history["train_loss"], "eval": history["validation_loss"]},
        },
        model_dir,
    )

    rows = {"Titans (memory on)": recall(model, tokenizer, eval_length, distances, eval_examples, seed, True)}
    rows["same model, memory writes off"] = recall(model, tokenizer, eval_length, distances, eval_examples, seed, False)
    baseline_history = None
    if train_baseline:
        baseline, baseline_history = train_on_passkey(config, tokenizer, seq_lens, memory_writes=False, **common)
        rows["baseline trained without memory"] = recall(
            baseline, tokenizer, eval_length, distances, eval_examples, seed, False
        )

    reloaded, reloaded_tokenizer = load_model_and_tokenizer(model_dir)
    generation = generate_answer(reloaded, reloaded_tokenizer, eval_length, max(distances), seed)
    return {
        "task": TASK,
        "model": {**described, "attention_window": window, "model_dir": model_dir},
        "training": {**recipe, "seq_lens": seq_lens, **history},
        "baseline_training": baseline_history,
        "recall": {
            "eval_length": eval_length,
            "distances": distances,
            "window_multiples": list(WINDOW_MULTIPLES),
            "examples_per_distance": eval_examples,
            "split": "test",
            "rows": rows,
        },
        "generation": generation,
    }


def print_summary(results: dict, results_path: str):
    recall_results, window = results["recall"], results["model"]["attention_window"]
    distances = recall_results["distances"]
    print(
        f"\nRecall on the {TASK} test split ({recall_results['examples_per_distance']} examples per distance, "
        f"sequences of {recall_results['eval_length']} tokens, attention window {window}):"
    )
    header = f"{'needle':<34}" + "".join(f"{f'{d} tokens back ({d // window}x)':>28}" for d in distances)
    print(header)
    print(f"{'model':<34}" + f"{'exact match':>14}{'digits right':>14}" * len(distances))
    print("-" * len(header))
    for name, cells in recall_results["rows"].items():
        print(f"{name:<34}" + "".join(f"{cell['accuracy']:>14.0%}{cell['digit_accuracy']:>14.0%}" for cell in cells))
    print("(chance: 0% exact match, 10% digits right)")
    validation = results["training"]["validation_loss"]
    print(
        f"\nValidation loss: {validation[0][1]:.3f} at step 0 -> {validation[-1][1]:.3f} at step "
        f"{validation[-1][0]} (chance: {math.log(10) * 5 / 6:.3f}, five random digits and </s>)."
    )
    generation = results["generation"]
    print(f"\npipeline('text-generation') on a test prompt, needle {generation['needle_distance']} tokens back:")
    print(f"  needle:    {generation['needle']}")
    print(f"  question:  {generation['question']}")
    print(
        f"  generated: {generation['generated']!r}  (expected {generation['expected']!r}: "
        f"{'correct' if generation['correct'] else 'wrong'})"
    )
    print(f"\nModel: {results['model']['model_dir']}  Results: {results_path}  Total time: {results['seconds']:.0f}s")
