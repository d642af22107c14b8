"""`titans train`: train a Titans language model with the Hugging Face `Trainer`.

    titans train --preset small --output-dir runs/passkey                 # built-in task (passkey by default)
    titans train --preset tiny --task babi --max-steps 5 --output-dir runs/tiny
    titans train --preset small --train-file book.txt --seq-len 512 --output-dir runs/book
    titans train --preset small --output-dir runs/passkey --resume        # continue from the last checkpoint

Data: a built-in task (`modeling_titans.tasks`; examples generated on the fly, loss on the answer) or your own
text (`--train-file`, `--dataset`; packed into `--seq-len` sequences, loss on every token). The Trainer shows a
progress bar, logs the training loss, evaluates the loss on held-out data every `--eval-steps` and writes
`checkpoint-N` folders every `--save-steps`; `--resume` continues from the last one (step count, optimizer,
learning-rate schedule, data position and loss history). At the end DIR holds `model.safetensors`,
`config.json` and the tokenizer (loadable with `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)`)
and `training_summary.json` (data, settings, loss curves; read by the model card).

Runs as it is under `torchrun` / `accelerate launch` (the Trainer handles DDP); only the main process writes files.
"""

import json
import os
import time

from ..cli import CommandError

DEFAULT_PRESET = "small"
DEFAULT_TASK = "passkey"
SUMMARY_NAME = "training_summary.json"


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="train a Titans model on a built-in long-context task or on your own text",
        description=__doc__.split("\n\n")[0],
    )
    model = parser.add_argument_group("model")
    model.add_argument("--preset", help=f"named configuration (default: {DEFAULT_PRESET}), e.g. tiny, small, 170m")
    model.add_argument("--variant", help="mac, mag, mal or lmm (default: the preset's)")
    model.add_argument("--config", metavar="FILE", help="a config.json to train from scratch instead of a preset")
    model.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: the byte-level tokenizer)")
    data = parser.add_argument_group("data")
    data.add_argument("--task", help=f"built-in task: passkey, recall or babi (default: {DEFAULT_TASK})")
    data.add_argument("--needle-distance", type=int, help="task needle distance in tokens (default: random)")
    data.add_argument("--loss-on", choices=("answer", "all"), default="answer", help="task tokens with loss")
    data.add_argument("--eval-examples", type=int, default=32, help="task validation examples (default: 32)")
    data.add_argument("--train-file", action="append", default=[], metavar="FILE", help=".txt/.jsonl, repeatable")
    data.add_argument("--dataset", help="a folder written by Dataset.save_to_disk, or a Hub dataset name")
    data.add_argument("--text-column", default="text", help="text field of .jsonl files and datasets")
    training = parser.add_argument_group("training")
    training.add_argument("--output-dir", required=True, metavar="DIR")
    training.add_argument("--max-steps", type=int, default=1000)
    training.add_argument("--learning-rate", type=float, default=1e-3)
    training.add_argument("--batch-size", type=int, default=8, help="sequences per step and device")
    training.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    training.add_argument("--eval-steps", type=int, help="steps between eval losses (default: max-steps / 10, >= 10)")
    training.add_argument("--save-steps", type=int, help="steps between checkpoints (default: eval-steps)")
    training.add_argument("--warmup-steps", type=int, help="linear warmup (default: 5%% of max-steps)")
    training.add_argument("--resume", action="store_true", help="continue from the last checkpoint in DIR")
    training.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args) -> int:
    check_arguments(args)
    checkpoint = find_checkpoint(args.output_dir) if args.resume else None

    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    from modeling_titans import TitansForCausalLM

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        prediction_loss_only=True,  # keeping the eval logits would cost batch x seq x vocab floats per step
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=max(1, min(50, args.eval_steps // 5)),
        logging_first_step=True,
        report_to="none",
        seed=args.seed,
        # Task examples are independent random draws: read in order, step n sees the same examples whatever
        # --max-steps is. Packed text is shuffled.
        train_sampling_strategy="sequential" if args.task else "random",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU, accelerate runs gloo DDP under torchrun only when told to use the CPU; otherwise every
        # process would train alone and all of them would write the output folder.
        use_cpu=not torch.cuda.is_available(),
    )
    tokenizer = load_tokenizer(checkpoint or args.tokenizer)
    config = model_config(args, checkpoint, tokenizer)
    if args.seq_len > config.max_position_embeddings:
        raise CommandError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}."
        )
    train_dataset, eval_dataset, data_summary = build_datasets(args, tokenizer, training_args)

    set_seed(args.seed)
    model = TitansForCausalLM(config)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    evaluated_steps = [step for step, _ in eval_losses(trainer.state.log_history)]
    if trainer.state.global_step not in evaluated_steps:
        trainer.evaluate()  # the eval curve ends with the final model
    model.config.use_cache = True  # the Trainer turns the cache off for training; generate() wants it on
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        summary = training_summary(args, model, trainer, data_summary, checkpoint, time.time() - started)
        with open(os.path.join(args.output_dir, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"Saved the model to {args.output_dir} (eval loss {summary['metrics']['final_eval_loss']:.4f}).")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun / accelerate: every rank waits for rank 0's files, then the process group is torn down
        # before exit (left to the interpreter's exit, gloo's threads could abort a rank: "terminate called ...").
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return 0


def check_arguments(args):
    """Fills in defaults and rejects what cannot run, before anything heavy is imported."""
    from modeling_titans.tasks import TASKS, minimum_length

    for flag in ("max_steps", "batch_size", "eval_steps", "save_steps", "eval_examples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CommandError(f"--{flag.replace('_', '-')} {value}: must be at least 1.")
    if args.seq_len < 2:
        raise CommandError(f"--seq-len {args.seq_len}: a training sequence needs at least 2 tokens.")
    if args.learning_rate <= 0:
        raise CommandError(f"--learning-rate {args.learning_rate}: must be positive.")
    if args.preset and args.config:
        raise CommandError("Give --preset or --config, not both.")
    if args.task and (args.train_file or args.dataset):
        raise CommandError("Give --task or your own text (--train-file / --dataset), not both.")
    if not (args.train_file or args.dataset):
        args.task = args.task or DEFAULT_TASK
    if args.task:
        if args.task not in TASKS:
            raise CommandError(f"Unknown task {args.task!r}; available: {', '.join(TASKS)}.")
        shortest = minimum_length(args.task) + 2  # + <s> and </s>
        if args.seq_len < shortest:
            raise CommandError(f"--seq-len {args.seq_len} is too short for the {args.task} task: use at least {shortest}.")
    args.eval_steps = args.eval_steps or max(10, args.max_steps // 10)
    args.save_steps = args.save_steps or args.eval_steps
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else args.max_steps // 20


def find_checkpoint(output_dir: str) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if checkpoint is None:
        raise CommandError(f"--resume: {output_dir} holds no checkpoint-N folder to resume from.")
    print(f"Resuming from {checkpoint} (its model configuration and tokenizer are used).")
    return checkpoint


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from modeling_titans.tokenization import TitansByteTokenizer

    if path is None:
        return TitansByteTokenizer()
    if not os.path.isdir(path):
        raise CommandError(f"No tokenizer folder {path}.")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot load a tokenizer from {path}: {str(error).splitlines()[0]}") from error


def model_config(args, checkpoint: str | None, tokenizer):
    """The checkpoint's configuration when resuming; else the preset's or the file's, with --variant applied and
    the vocabulary and special tokens matched to the tokenizer."""
    from modeling_titans import TitansConfig

    if checkpoint is not None:
        return TitansConfig.from_pretrained(checkpoint)
    variant = {"variant": args.variant, "mixer_types": None} if args.variant else {}
    try:
        if args.config:
            if not os.path.isfile(args.config):
                raise CommandError(f"No such config file: {args.config}")
            config = TitansConfig.from_dict({**TitansConfig.get_config_dict(args.config)[0], **variant})
        else:
            config = TitansConfig.from_preset(args.preset or DEFAULT_PRESET, **variant)
    except (OSError, ValueError) as error:  # unknown preset, unreadable file, a field out of range
        raise CommandError(str(error).splitlines()[0]) from error
    if config.vocab_size != len(tokenizer):
        print(f"Note: vocab_size {config.vocab_size} -> {len(tokenizer)} to match the tokenizer.")
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return TitansConfig.from_dict({**config.to_dict(), **special})


def build_datasets(args, tokenizer, training_args):
    """(train, eval, description for the summary)."""
    from modeling_titans.data import DataError, TaskDataset, hold_out, load_text_dataset, pack_dataset

    try:
        if args.task:
            examples_per_step = args.batch_size * training_args.world_size
            common = dict(
                task=args.task,
                seq_len=args.seq_len,
                tokenizer=tokenizer,
                seed=args.seed,
                needle_distance=args.needle_distance,
                loss_on=args.loss_on,
            )
            train = TaskDataset(split="train", num_examples=args.max_steps * examples_per_step, **common)
            evaluation = TaskDataset(split="validation", num_examples=args.eval_examples, **common)
            summary = {
                "task": args.task,
                "train_examples": len(train),
                "eval_examples": len(evaluation),
                "eval_split": "validation",
                "example_chars": args.seq_len - 2,
                "needle_distance": args.needle_distance if args.needle_distance is not None else "random",
                "loss_on": args.loss_on,
            }
            return train, evaluation, summary
        with training_args.main_process_first(desc="tokenizing the training text"):  # rank 0 fills the cache
            texts = load_text_dataset(args.train_file, args.dataset, args.text_column)
            train, evaluation = hold_out(pack_dataset(texts, tokenizer, args.seq_len), 0.05, args.seed)
        summary = {
            "train_files": args.train_file,
            "dataset": args.dataset,
            "documents": len(texts),
            "train_sequences": len(train),
            "eval_sequences": len(evaluation),
            "loss_on": "all",
        }
        return train, evaluation, summary
    except ValueError as error:  # DataError, or a needle distance the length cannot take
        message = str(error).splitlines()[0]
        raise CommandError(message if isinstance(error, DataError) else f"--needle-distance: {message}") from error


def eval_losses(log_history: list[dict]) -> list[list]:
    return [[entry["step"], entry["eval_loss"]] for entry in log_history if "eval_loss" in entry]


def training_summary(args, model, trainer, data_summary, checkpoint, seconds) -> dict:
    history = trainer.state.log_history
    train_curve = [[entry["step"], entry["loss"]] for entry in history if "loss" in entry]
    eval_curve = eval_losses(history)
    steps = trainer.state.global_step
    return {
        "model": {
            "preset": None if args.config or checkpoint else args.preset or DEFAULT_PRESET,
            "config_file": args.config,
            "variant": model.config.variant,
            "num_parameters": model.num_parameters(),
        },
        "data": data_summary,
        "training": {
            "steps": steps,
            "batch_size": args.batch_size,
            "devices": trainer.args.world_size,
            "seq_len": args.seq_len,
            "tokens_seen": steps * args.batch_size * trainer.args.world_size * args.seq_len,
            "learning_rate": args.learning_rate,
            "lr_scheduler": "cosine",
            "warmup_steps": args.warmup_steps,
            "seed": args.seed,
            "resumed_from": os.path.basename(checkpoint) if checkpoint else None,
            "seconds_this_run": round(seconds, 1),
        },
        "metrics": {
            "final_train_loss": train_curve[-1][1] if train_curve else None,
            "final_eval_loss": eval_curve[-1][1] if eval_curve else None,
        },
        "loss_curve": {"train": train_curve, "eval": eval_curve},
    }
