"""Training with the Hugging Face `Trainer`: the one loop behind `titans train`, `titans demo` and the benchmarks.

- `task_curriculum`: training examples of the built-in tasks (`tasks.py`) for a length curriculum. The examples are
  generated on demand in a fixed order: phase p holds `steps[p]` optimizer steps of `seq_lens[p]`-token sequences,
  so a sequential sampler walks through the phases, a resumed run sees the same examples at the same steps, and
  no callback has to swap datasets. Several tasks are interleaved, so every batch mixes them.
- `text_datasets`: your own text, packed into fixed-length sequences (`data.py`), with 5% held out.
- `train`: a `Trainer` on a model and these datasets; `LossTable` prints a compact table of the losses instead
  of progress bars (the demo's output).
- `train_on_tasks`: the recipe of the demo and the recall benchmarks (`recipe_arguments`) on a task curriculum.
- `prepare_output_dir` / `newest_complete_checkpoint`: never overwrite a finished run without being told to, and
  resume from the newest checkpoint that was written completely.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .data import DataError, TaskDataset, collate_without_trailing_padding, hold_out, load_text_dataset, pack_dataset

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
SUMMARY_NAME = "training_summary.json"
# Files a run writes into its output folder; a folder holding one of them holds a run.
RUN_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", SUMMARY_NAME)


class OutputDirError(ValueError):
    """An output folder that a run may not write into as asked; the message says what to do."""


def phase_steps(total: int, phases: int) -> list[int]:
    """`total` steps split as evenly as possible over the curriculum phases."""
    return [total // phases + (i < total % phases) for i in range(phases)]


class TaskMix(torch.utils.data.Dataset):
    """`num_examples` sequences of `seq_len` tokens, an even mix of built-in tasks: example i is example
    i // len(tasks) of task i % len(tasks) (a `TaskDataset` each).

    With `examples_per_sequence` K > 1 each sequence holds K consecutive examples of `seq_len / K` tokens one
    after the other, each with its loss on its own answer. The memory then takes each needle on top of what the
    examples before it wrote, as in a long document with several questions; trained on one example per sequence
    it never sees that and can diverge there (`benchmarks/README.md`, "A stream of examples through one cache").
    A tuple of counts alternates them: sequence i holds K = counts[i % len(counts)] examples, so (1, 2) mixes single
    examples, whose needles lie up to `seq_len` tokens back, with pairs. Each count draws from its own seed."""

    def __init__(
        self, tasks, split: str, num_examples: int, seq_len: int, tokenizer, seed: int,
        examples_per_sequence: int | tuple[int, ...] = 1, **options,
    ):
        counts = (examples_per_sequence,) if isinstance(examples_per_sequence, int) else tuple(examples_per_sequence)
        for count in counts or (0,):
            if count < 1 or seq_len % count:
                raise ValueError(
                    f"examples_per_sequence={count} must be at least 1 and divide the sequence length {seq_len}."
                )
        sequences_per_count = -(-num_examples // len(counts))
        self.parts = [
            [
                TaskDataset(task, split, -(-sequences_per_count * count // len(tasks)), seq_len // count, tokenizer,
                            seed=seed * len(counts) + position, **options)
                for task in tasks
            ]
            for position, count in enumerate(counts)
        ]
        self.num_examples, self.counts = num_examples, counts

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        position = index % len(self.counts)
        count, parts = self.counts[position], self.parts[position]
        first = index // len(self.counts) * count
        examples = [parts[example % len(parts)][example // len(parts)] for example in range(first, first + count)]
        return {key: torch.cat([example[key] for example in examples]) for key in examples[0]}


def task_curriculum(
    tasks, seq_lens: list[int], steps: list[int], examples_per_step: int, tokenizer, seed: int = 0, **options
):
    """The training examples of a length curriculum, in the order a sequential sampler reads them: phase p has
    `steps[p] * examples_per_step` sequences of `seq_lens[p]` tokens. Each phase draws from its own seed, since
    example i of a task comes from (seed, i) and phases with one seed would repeat their codes. `options` go to
    `TaskMix` (examples_per_sequence) and `TaskDataset` (needle_distance, loss_on)."""
    phases = [
        TaskMix(tasks, "train", count * examples_per_step, seq_len, tokenizer, seed * len(seq_lens) + phase, **options)
        for phase, (seq_len, count) in enumerate(zip(seq_lens, steps))
        if count
    ]
    return torch.utils.data.ConcatDataset(phases)


def text_datasets(train_files, dataset, text_column: str, tokenizer, seq_len: int, seed: int):
    """(train, eval, summary) from the user's text: packed into `seq_len`-token sequences, 5% held out."""
    texts = load_text_dataset(train_files, dataset, text_column)
    train_part, eval_part = hold_out(pack_dataset(texts, tokenizer, seq_len), 0.05, seed)
    summary = {
        "train_files": list(train_files),
        "dataset": dataset,
        "documents": len(texts),
        "train_sequences": len(train_part),
        "eval_sequences": len(eval_part),
        "loss_on": "all",
    }
    return train_part, eval_part, summary


class LossTable(TrainerCallback):
    """Prints one row per evaluation (step, sequence length, smoothed training loss, eval loss, time) and keeps
    the curves in `history`; `seq_len_at(step)` names the sequence length of a step (a curriculum)."""

    def __init__(self, seq_len_at):
        self.seq_len_at = seq_len_at
        self.history = {"train_loss": [], "validation_loss": []}
        self.running = None
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        print(f"{'step':>6} {'seq len':>8} {'train loss':>11} {'val loss':>9} {'time':>7}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            loss = logs["loss"]
            self.running = loss if self.running is None else 0.9 * self.running + 0.1 * loss
            self.history["train_loss"].append([state.global_step, round(loss, 4)])
        if "eval_loss" in logs:
            self.history["validation_loss"].append([state.global_step, round(logs["eval_loss"], 4)])
            running = f"{self.running:.3f}" if self.running is not None else "-"
            print(
                f"{state.global_step:>6} {self.seq_len_at(state.global_step):>8} {running:>11} "
                f"{logs['eval_loss']:>9.3f} {time.time() - self.started:>6.0f}s",
                flush=True,
            )


def train(model, tokenizer, train_dataset, eval_dataset, args, resume_from_checkpoint=None, callbacks=()) -> Trainer:
    """Trains `model` in place with the `Trainer` and `TrainingArguments` `args`; evaluates the final model if
    the last step was not an evaluation step; returns the trainer (its `state.log_history` holds the curves)."""
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collate_without_trailing_padding,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if eval_dataset is not None and trainer.state.global_step not in [step for step, _ in eval_losses(trainer)]:
        trainer.evaluate()  # the eval curve ends with the final model
    model.config.use_cache = True  # the Trainer turns the cache off for training; generate() wants it on
    return trainer


def recipe_arguments(output_dir: str, steps: int, batch_size: int, learning_rate: float, eval_every: int, seed: int):
    """The recipe of the demo and the recall benchmarks: AdamW (beta2 0.95, no weight decay), 5% warmup, cosine
    down to 10% of the peak, clipping at 1; the validation loss at step 0 and every `eval_every` steps; no
    checkpoints (the caller saves the model)."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, steps // 20),
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=eval_every,
        eval_on_start=True,
        prediction_loss_only=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        seed=seed,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def train_on_tasks(
    model, tokenizer, tasks, seq_lens, steps, batch_size, learning_rate, eval_every, eval_examples, seed=0
) -> dict:
    """Trains any causal LM in place with `recipe_arguments` on an even mix of the built-in `tasks` (loss on the
    answer) over the length curriculum `seq_lens` (the steps split evenly), printing a `LossTable`; returns the
    loss curves and the time taken. The validation loss is measured at the longest training length, so the
    curve is comparable across phases."""
    phases = phase_steps(steps, len(seq_lens))
    train_data = task_curriculum(tasks, seq_lens, phases, batch_size, tokenizer, seed=seed)
    validation = TaskMix(tasks, "validation", eval_examples * len(tasks), max(seq_lens), tokenizer, seed)
    ends = [sum(phases[: p + 1]) for p in range(len(phases))]
    table = LossTable(lambda step: seq_lens[min(sum(step > end for end in ends), len(seq_lens) - 1)])
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        args = recipe_arguments(scratch, steps, batch_size, learning_rate, eval_every, seed)
        train(model, tokenizer, train_data, validation, args, callbacks=[table])
    return {**table.history, "seconds": round(time.time() - started, 1)}


def eval_losses(trainer) -> list[list]:
    return [[entry["step"], entry["eval_loss"]] for entry in trainer.state.log_history if "eval_loss" in entry]


def train_losses(trainer) -> list[list]:
    return [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]


def checkpoint_problem(path: str) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from, or None if it was written completely. The Trainer
    writes the trainer state last, after the weights, optimizer, scheduler and RNG states; a run killed while
    saving leaves a folder without it or with a partial file."""
    from .checkpoints import CheckpointError, check_checkpoint

    state_path = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"no {TRAINER_STATE_NAME} (the save did not finish)"
    try:
        with open(state_path, encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, json.JSONDecodeError):
        return f"{TRAINER_STATE_NAME} is not valid JSON (the save did not finish)"
    if str(step) != os.path.basename(path)[len(CHECKPOINT_PREFIX) :]:
        return f"{TRAINER_STATE_NAME} records step {step}, not the folder's"
    try:
        check_checkpoint(path)
    except CheckpointError as error:
        return str(error)
    return None


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest `checkpoint-N` folder of `output_dir` that was written completely, and the newer ones skipped
    with the reason for each."""
    names = [
        name
        for name in os.listdir(output_dir)
        if name.startswith(CHECKPOINT_PREFIX)
        and name[len(CHECKPOINT_PREFIX) :].isdigit()
        and os.path.isdir(os.path.join(output_dir, name))
    ]
    skipped = []
    for name in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX) :]), reverse=True):
        problem = checkpoint_problem(os.path.join(output_dir, name))
        if problem is None:
            return os.path.join(output_dir, name), skipped
        skipped.append((name, problem))
    return None, skipped


def holds_a_run(output_dir: str) -> bool:
    if not os.path.isdir(output_dir):
        return False
    return any(name.startswith(CHECKPOINT_PREFIX) or name in RUN_FILES for name in os.listdir(output_dir))


def prepare_output_dir(output_dir: str, resume, overwrite: bool, delete: bool = True) -> str | None:
    """Checks what a run may do with `output_dir`; returns the checkpoint to resume from (or None).

    - `resume` True: the newest complete checkpoint in `output_dir` (OutputDirError if there is none); a path:
      that checkpoint, which must be complete;
    - otherwise a folder that holds a run (a model, a summary or checkpoints) is refused unless `overwrite`, which
      deletes that run first (only where `delete`: the main process of a distributed run), as `run_clm.py`
      refuses a non-empty output folder.
    """
    if resume and overwrite:
        raise OutputDirError("--resume continues the run in the output folder, --overwrite-output-dir deletes it: give one.")
    if isinstance(resume, str):
        problem = checkpoint_problem(resume) if os.path.isdir(resume) else "no such folder"
        if problem:
            raise OutputDirError(f"Cannot resume from {resume}: {problem}.")
        return resume
    if resume:
        checkpoint, skipped = newest_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else (None, [])
        for name, reason in skipped:
            print(f"Skipping {name}: {reason}.")
        if checkpoint is None:
            raise OutputDirError(f"--resume: {output_dir} holds no complete checkpoint-N folder to resume from.")
        return checkpoint
    if holds_a_run(output_dir):
        if not overwrite:
            raise OutputDirError(
                f"{output_dir} already holds a training run; continue it with --resume, or pass "
                "--overwrite-output-dir to replace it (or choose another --output-dir)."
            )
        if delete:
            shutil.rmtree(output_dir)
    return None


def save_training_summary(summary: dict, model_dir: str):
    """Writes `training_summary.json` beside a saved model: `titans eval` reads the task and the training length
    from it, the model card shows it."""
    with open(os.path.join(model_dir, SUMMARY_NAME), "w") as f:
        json.dump(summary, f, indent=2)


def training_summary(model, trainer, settings: dict, data: dict, seconds: float) -> dict:
    """What `titans train` records beside the model in `training_summary.json` (read by the model card)."""
    steps = trainer.state.global_step
    args = trainer.args
    train_curve, eval_curve = train_losses(trainer), eval_losses(trainer)
    examples_per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return {
        "model": {**settings.get("model", {}), "variant": model.config.variant, "num_parameters": model.num_parameters()},
        "data": data,
        "training": {
            **settings.get("training", {}),
            "steps": steps,
            "batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "devices": args.world_size,
            "examples_per_step": examples_per_step,
            "learning_rate": args.learning_rate,
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "seed": args.seed,
            "seconds_this_run": round(seconds, 1),
        },
        "metrics": {
            "final_train_loss": train_curve[-1][1] if train_curve else None,
            "final_eval_loss": eval_curve[-1][1] if eval_curve else None,
            "final_eval_perplexity": math.exp(eval_curve[-1][1]) if eval_curve and eval_curve[-1][1] < 50 else None,
        },
        "loss_curve": {"train": train_curve, "eval": eval_curve},
    }


__all__ = [
    "DataError",
    "LossTable",
    "OutputDirError",
    "SUMMARY_NAME",
    "TaskMix",
    "newest_complete_checkpoint",
    "phase_steps",
    "prepare_output_dir",
    "save_training_summary",
    "task_curriculum",
    "text_datasets",
    "train",
    "train_on_tasks",
    "training_summary",
]
