"""Fine-tune (or train from scratch) a Titans model on a local text file with the Hugging Face Trainer.

The text is tokenized once, cut into blocks of `--block-size` tokens, and split into train and eval blocks; the
script prints the eval perplexity (exp of the mean next-token loss) before and after training and saves the model
and tokenizer to `--output-dir`.

    # seconds on a CPU: a fresh tiny model on the bundled sample text
    python examples/finetune_text.py

    # a real run: your text, a saved model, bigger blocks, bf16 on a GPU, activation checkpointing
    python examples/finetune_text.py --text-file my.txt --model path/to/titans-model --block-size 2048 \
        --batch-size 8 --grad-accum 4 --max-steps 2000 --lr 3e-4 --bf16 --activation-checkpointing

    # the same script on 2 processes (gloo on CPU, NCCL on GPUs): see examples/train_ddp.sh
    torchrun --nproc_per_node 2 examples/finetune_text.py

`--resume` continues from the latest `checkpoint-*` in `--output-dir` (written every `--save-steps`).
"""

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from modeling_titans import TitansConfig, TitansForCausalLM
from modeling_titans.configuration.configuration_titans import VARIANTS
from modeling_titans.tokenization import TitansByteTokenizer

SAMPLE_TEXT = Path(__file__).parent / "data" / "tiny_corpus.txt"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-file", type=Path, default=SAMPLE_TEXT, help="UTF-8 text to train on")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a saved Titans model (directory) to fine-tune")
    source.add_argument("--preset", default="tiny", help="train a fresh model of this preset (default: tiny)")
    parser.add_argument("--variant", default="mac", choices=VARIANTS, help="with --preset")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/finetune_text"))
    parser.add_argument("--block-size", type=int, default=64, help="tokens per training example")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU; very slow on most CPUs)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def text_blocks(tokenizer, text_file: Path, block_size: int, eval_fraction: float):
    """Train and eval examples: the whole text as one token stream cut into full blocks (the last, short one is
    dropped). Labels are the inputs: the model shifts them for the next-token loss."""
    ids = tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(ids, dtype=torch.long)
    num_blocks = len(ids) // block_size
    if num_blocks < 2:
        raise SystemExit(f"{text_file} has {len(ids)} tokens: too few for two blocks of {block_size}.")
    blocks = ids[: num_blocks * block_size].view(num_blocks, block_size)
    num_eval = max(1, round(num_blocks * eval_fraction))
    examples = [{"input_ids": block, "labels": block.clone()} for block in blocks]
    return examples[:-num_eval], examples[-num_eval:]


def load_tokenizer(args):
    """The model's own tokenizer when it was saved with one, else the default byte-level tokenizer."""
    if args.model and (Path(args.model) / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(args.model)
    return TitansByteTokenizer()


def load_model(args) -> TitansForCausalLM:
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model)
    torch.manual_seed(args.seed)
    return TitansForCausalLM(TitansConfig.from_preset(args.preset, variant=args.variant))


def training_arguments(args, **overrides) -> TrainingArguments:
    """TrainingArguments shared by the examples. Under torchrun or `accelerate launch` the Trainer runs DDP by
    itself; on a machine without a GPU it needs `use_cpu=True` to start gloo DDP at all."""
    return TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        **overrides,
    )


def main(argv=None):
    args = parse_args(argv)
    tokenizer = load_tokenizer(args)
    train, evaluation = text_blocks(tokenizer, args.text_file, args.block_size, args.eval_fraction)
    model = load_model(args)
    trainer = Trainer(model=model, args=training_arguments(args), train_dataset=train, eval_dataset=evaluation)

    before = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    after = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        print(f"train blocks {len(train)}, eval blocks {len(evaluation)} of {args.block_size} tokens")
        print(f"eval perplexity: {math.exp(before):.2f} before, {math.exp(after):.2f} after training")
    trainer.save_model(str(args.output_dir))  # saves on the main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(args.output_dir))
        print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
