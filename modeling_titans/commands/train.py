"""`titans train`: train or fine-tune a Titans language model with the Hugging Face `Trainer`.

    titans train --preset small --output-dir runs/passkey                  # built-in task (passkey by default)
    titans train --preset tiny --task babi --max-steps 5 --output-dir runs/tiny
    titans train --preset small --train-file book.txt notes.jsonl --seq-len 512 --output-dir runs/book
    titans train --model-name-or-path runs/book --train-file more.txt --output-dir runs/book2 --bf16
    titans train --model-name-or-path converted --train-only memory --train-file book.txt --output-dir runs/mem
    titans train --preset small --output-dir runs/passkey --resume         # continue from the last checkpoint

Data: a built-in task (`modeling_titans.tasks`; examples generated on the fly, loss on the answer; `--seq-len
192,384` is a length curriculum with the steps split evenly) or your own text (`--train-file`, `--dataset`;
packed into `--seq-len` sequences, loss on every token). Every `TrainingArguments` field is a flag as well
(`--gradient-accumulation-steps`, `--bf16`, `--activation-checkpointing`, `--lr-scheduler-type`, ...), with this
command's defaults shown by `--help`. At the end the output folder holds `model.safetensors`, `config.json`, the
tokenizer and `training_summary.json`. A folder that already holds a run is refused unless `--resume` or
`--overwrite-output-dir` says what to do with it. Runs as it is under `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, fields
from typing import Literal

from ..tasks import TASKS
from . import CommandError

DEFAULT_PRESET = "small"
DEFAULT_TASK = "passkey"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "a saved model to continue training (fine-tuning); its config and tokenizer are used"},
    )
    preset: str | None = field(
        default=None,
        metadata={"help": f"named configuration of a new model (default {DEFAULT_PRESET}): tiny, small, demo, 170m, ..."},
    )
    variant: str | None = field(default=None, metadata={"help": "mac, mag, mal or lmm (default: the preset's)"})
    config: str | None = field(default=None, metadata={"help": "a config.json for a new model instead of a preset"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "a saved tokenizer for a new model (default: the byte-level tokenizer)"}
    )
    train_only: Literal["all", "memory"] = field(
        default="all",
        metadata={"help": "memory: freeze everything but the neural memories (e.g. a model from `titans convert`)"},
    )
    compile_memory_scan: bool = field(
        default=False,
        metadata={"help": "run the memory scan's per-chunk steps through torch.compile (faster after ~30 s)"},
    )


@dataclass
class DataArguments:
    task: str | None = field(
        default=None, metadata={"help": f"built-in task: {', '.join(TASKS)} (default {DEFAULT_TASK})"}
    )
    needle_distance: int | None = field(
        default=None,
        metadata={"help": "task needle distance in characters, tokens of the byte tokenizer (default: random)"},
    )
    loss_on: Literal["answer", "all"] = field(default="answer", metadata={"help": "task tokens with loss"})
    examples_per_sequence: str = field(
        default="1",
        metadata={"help": "task examples one after the other in each training sequence (seq-len / N tokens each), so "
                  "that the memory learns to take a new needle over an old one; comma-separated counts (1,2) "
                  "alternate from sequence to sequence"},
    )
    eval_examples: int = field(default=32, metadata={"help": "task validation examples"})
    train_file: list[str] = field(default_factory=list, metadata={"help": "text files: .txt (one document) or .jsonl"})
    dataset: str | None = field(default=None, metadata={"help": "a folder written by Dataset.save_to_disk, or a Hub name"})
    text_column: str = field(default="text", metadata={"help": "text field of .jsonl files and datasets"})
    seq_len: str = field(
        default="256", metadata={"help": "tokens per training sequence; for a task, comma-separated phases (192,384)"}
    )


@dataclass
class RunArguments:
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint in --output-dir"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "delete a run already in --output-dir first"})


def training_defaults() -> dict:
    """This command's defaults for `TrainingArguments` fields (the rest keep transformers' defaults)."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=None,  # required (checked after parsing)
        max_steps=1000,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # below 1: a fraction of max_steps
        eval_strategy="steps",
        eval_steps=0.1,
        save_strategy="steps",
        save_steps=0.1,
        save_total_limit=2,
        logging_steps=0.01,  # below 1: a fraction of max_steps
        logging_first_step=True,
        prediction_loss_only=True,  # keeping the eval logits would cost batch x seq x vocab floats per step
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        # Without a GPU, accelerate runs gloo DDP under torchrun only when told to use the CPU; otherwise every
        # process would train alone and all of them would write the output folder.
        use_cpu=not cuda,
    )


def add_parser(subparsers):
    from transformers import HfArgumentParser, TrainingArguments

    arguments = HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments), add_help=False)
    parser = subparsers.add_parser(
        "train",
        parents=[arguments],
        help="train or fine-tune a Titans model on a built-in long-context task or on your own text",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.set_defaults(run=run, **training_defaults())


def split_arguments(args):
    """The parsed namespace as (ModelArguments, DataArguments, RunArguments, TrainingArguments)."""
    from transformers import TrainingArguments

    def build(cls):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)})

    if args.output_dir is None:
        raise CommandError("--output-dir is required.")
    try:
        return build(ModelArguments), build(DataArguments), build(RunArguments), build(TrainingArguments)
    except ValueError as error:  # TrainingArguments refuses inconsistent settings in its __post_init__
        raise CommandError(str(error).strip().splitlines()[0]) from error


def run(args) -> int:
    model_args, data_args, run_args, training_args = split_arguments(args)
    seq_lens = check_arguments(model_args, data_args, training_args)

    from transformers import set_seed

    from ..training import (
        prepare_output_dir,
        save_training_summary,
        train,
        training_summary,
    )

    # Every process checks the folder (and raises alike); only the main process deletes a run it may replace.
    checkpoint = prepare_output_dir(
        training_args.output_dir,
        training_args.resume_from_checkpoint or run_args.resume,
        run_args.overwrite_output_dir,
        delete=training_args.process_index == 0,
    )
    if checkpoint is not None:
        print(f"Resuming from {checkpoint} (its model configuration and tokenizer are used).")

    tokenizer = load_tokenizer(checkpoint or model_args.model_name_or_path or model_args.tokenizer)
    set_seed(training_args.seed)
    model = build_model(model_args, checkpoint, tokenizer)
    if model_args.train_only == "memory":
        from ..upcycling import train_only_memory

        try:
            train_only_memory(model)
        except ValueError as error:
            raise CommandError(f"--train-only memory: {error}") from error
        count = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        print(f"Training the neural memories only: {count:,} of {model.num_parameters():,} parameters.")
    if model_args.compile_memory_scan:
        model.set_memory_scan_compiled(True)
    if max(seq_lens) > model.config.max_position_embeddings:
        raise CommandError(
            f"--seq-len {max(seq_lens)} exceeds the model's max_position_embeddings={model.config.max_position_embeddings}."
        )
    train_dataset, eval_dataset, data_summary = build_datasets(data_args, seq_lens, tokenizer, training_args)

    started = time.time()
    trainer = train(model, tokenizer, train_dataset, eval_dataset, training_args, resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        settings = {
            "model": {
                "preset": None if model_args.config or model_args.model_name_or_path or checkpoint else model_args.preset or DEFAULT_PRESET,
                "config_file": model_args.config,
                "initialised_from": model_args.model_name_or_path,
            },
            "training": {"seq_len": seq_lens[0] if len(seq_lens) == 1 else seq_lens, "resumed_from": os.path.basename(checkpoint) if checkpoint else None},
        }
        summary = training_summary(model, trainer, settings, data_summary, time.time() - started)
        save_training_summary(summary, training_args.output_dir)
        print(f"Saved the model to {training_args.output_dir} (eval loss {summary['metrics']['final_eval_loss']:.4f}).")
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun / accelerate: every rank waits for rank 0's files, then the process group is torn down
        # before exit (left to the interpreter's exit, gloo's threads could abort a rank: "terminate called ...").
        trainer.accelerator.wait_for_everyone()
        # After the barrier returns, a gloo worker thread still frees its work (and the collectives it waited for)
        # while holding the group's lock, and needs the GIL for their tensors. Tearing the group down now (here, or
        # when the DDP model is freed on return) would wait for that lock while holding the GIL: a deadlock, seen
        # in a gdb backtrace of a hung rank. Sleeping hands the GIL to that thread first.
        time.sleep(0.5)
        torch.distributed.destroy_process_group()
    return 0


def check_arguments(model_args, data_args, training_args) -> list[int]:
    """The training sequence length(s); CommandError for settings that cannot run, before any heavy work."""
    from ..tasks import shortest_sequence

    if training_args.max_steps < 1:
        raise CommandError(f"--max-steps {training_args.max_steps}: must be at least 1.")
    if data_args.eval_examples < 1:
        raise CommandError(f"--eval-examples {data_args.eval_examples}: must be at least 1.")
    if training_args.learning_rate <= 0:
        raise CommandError(f"--learning-rate {training_args.learning_rate}: must be positive.")
    sources = [flag for flag, value in (("--preset", model_args.preset), ("--config", model_args.config),
                                        ("--model-name-or-path", model_args.model_name_or_path)) if value]
    if len(sources) > 1:
        raise CommandError(f"Give one of --preset, --config and --model-name-or-path, not {' and '.join(sources)}.")
    if model_args.model_name_or_path and (model_args.variant or model_args.tokenizer):
        raise CommandError("--model-name-or-path brings its own variant and tokenizer; drop --variant / --tokenizer.")
    if data_args.task and (data_args.train_file or data_args.dataset):
        raise CommandError("Give --task or your own text (--train-file / --dataset), not both.")
    if not (data_args.train_file or data_args.dataset):
        data_args.task = data_args.task or DEFAULT_TASK
    try:
        seq_lens = [int(item) for item in data_args.seq_len.split(",") if item.strip()]
    except ValueError:
        raise CommandError(f"--seq-len {data_args.seq_len!r}: expected an integer (or, for a task, integers separated by commas).") from None
    if not seq_lens or min(seq_lens) < 2:
        raise CommandError(f"--seq-len {data_args.seq_len}: a training sequence needs at least 2 tokens.")
    if len(seq_lens) > 1 and not data_args.task:
        raise CommandError("--seq-len with several lengths (a curriculum) is for the built-in tasks only.")
    try:
        counts = tuple(int(item) for item in data_args.examples_per_sequence.split(",") if item.strip())
    except ValueError:
        raise CommandError(f"--examples-per-sequence {data_args.examples_per_sequence!r}: expected an integer "
                           "(or integers separated by commas).") from None
    if counts != (1,) and not data_args.task:
        raise CommandError("--examples-per-sequence is for the built-in tasks only.")
    data_args.examples_per_sequence = counts
    if len(seq_lens) > training_args.max_steps:
        raise CommandError(f"--max-steps {training_args.max_steps}: need at least one step per --seq-len phase.")
    if data_args.task:
        if data_args.task not in TASKS:
            raise CommandError(f"Unknown task {data_args.task!r}; available: {', '.join(TASKS)}.")
        shortest = shortest_sequence(data_args.task)
        if min(seq_lens) < shortest:
            raise CommandError(
                f"--seq-len {min(seq_lens)} is too short for the {data_args.task} task: use at least {shortest}."
            )
        for per_sequence in counts or (0,):
            if per_sequence < 1 or any(length % per_sequence for length in seq_lens):
                raise CommandError(
                    f"--examples-per-sequence {per_sequence}: must be at least 1 and divide every --seq-len "
                    f"({data_args.seq_len})."
                )
            if min(seq_lens) // per_sequence < shortest:
                raise CommandError(
                    f"--seq-len {min(seq_lens)} holds {per_sequence} {data_args.task} examples of "
                    f"{min(seq_lens) // per_sequence} tokens; each needs at least {shortest}."
                )
        # The curriculum depends on the order in which the examples are read.
        training_args.train_sampling_strategy = "sequential"
    return seq_lens


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from ..tokenization import TitansByteTokenizer

    if path is None:
        return TitansByteTokenizer()
    if not os.path.isdir(path):
        raise CommandError(f"No tokenizer folder {path}.")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot load a tokenizer from {path}: {str(error).splitlines()[0]}") from error


def build_model(model_args, checkpoint: str | None, tokenizer):
    """The model to train: a fresh one from a preset or config file (vocabulary and special tokens matched to the
    tokenizer), or the saved model of --model-name-or-path. When resuming, the checkpoint's configuration is used
    (its weights come from the Trainer's resume)."""
    from ..checkpoints import CheckpointError, check_checkpoint
    from ..configuration import TitansConfig
    from ..modeling import TitansForCausalLM

    if model_args.model_name_or_path and checkpoint is None:
        check_checkpoint(model_args.model_name_or_path)
        return TitansForCausalLM.from_pretrained(model_args.model_name_or_path)
    try:
        if checkpoint is not None:
            return TitansForCausalLM(check_checkpoint(checkpoint))
        variant = {"variant": model_args.variant, "mixer_types": None} if model_args.variant else {}
        if model_args.config:
            if not os.path.isfile(model_args.config):
                raise CommandError(f"No such config file: {model_args.config}")
            config = TitansConfig.from_dict({**TitansConfig.get_config_dict(model_args.config)[0], **variant})
        else:
            config = TitansConfig.from_preset(model_args.preset or DEFAULT_PRESET, **variant)
    except (OSError, ValueError) as error:  # unknown preset, unreadable file, a field out of range
        if isinstance(error, (CheckpointError, CommandError)):
            raise
        raise CommandError(str(error).splitlines()[0]) from error
    if config.vocab_size != len(tokenizer):
        print(f"Note: vocab_size {config.vocab_size} -> {len(tokenizer)} to match the tokenizer.")
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return TitansForCausalLM(TitansConfig.from_dict({**config.to_dict(), **special}))


def build_datasets(data_args, seq_lens, tokenizer, training_args):
    """(train, eval, description for the summary)."""
    from ..data import TaskDataset
    from ..training import phase_steps, task_curriculum, text_datasets

    if not data_args.task:
        with training_args.main_process_first(desc="tokenizing the training text"):  # rank 0 fills the cache
            return text_datasets(
                data_args.train_file, data_args.dataset, data_args.text_column, tokenizer, seq_lens[0], training_args.seed
            )
    examples_per_step = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    options = dict(needle_distance=data_args.needle_distance, loss_on=data_args.loss_on)
    try:
        train_data = task_curriculum(
            [data_args.task], seq_lens, phase_steps(training_args.max_steps, len(seq_lens)), examples_per_step,
            tokenizer, seed=training_args.seed, examples_per_sequence=data_args.examples_per_sequence, **options,
        )
        evaluation = TaskDataset(data_args.task, "validation", data_args.eval_examples, max(seq_lens), tokenizer,
                                 seed=training_args.seed, **options)
    except ValueError as error:  # a needle distance the length cannot take
        raise CommandError(f"--needle-distance: {str(error).splitlines()[0]}") from error
    summary = {
        "task": data_args.task,
        "train_examples": len(train_data),
        "eval_examples": len(evaluation),
        "eval_split": "validation",
        "examples_per_sequence": list(data_args.examples_per_sequence),
        "example_chars": [[length // count - 2 for count in data_args.examples_per_sequence] for length in seq_lens],
        "needle_distance": data_args.needle_distance if data_args.needle_distance is not None else "random",
        "loss_on": data_args.loss_on,
    }
    return train_data, evaluation, summary
