"""LoRA fine-tuning of a Titans model with PEFT: adapt attention and the neural memory's projections, save the
adapter, load it back, merge it into the weights, and generate (the memory keeps learning in a TitansCache).

    # seconds on a CPU: a fresh tiny model on the bundled sample text
    python examples/lora_finetune.py

    # a real run: a saved model, your text, memory projections only, rank 16
    python examples/lora_finetune.py --model path/to/titans-model --text-file my.txt --targets memory \
        --rank 16 --block-size 1024 --max-steps 1000 --lr 2e-4 --bf16

`--targets`: "default" (attention + memory projections, `DEFAULT_LORA_TARGET_MODULES`), "memory"
(`mem_q_proj mem_k_proj mem_v_proj mem_gate_proj mem_o_proj`), "attention" (`q_proj k_proj v_proj o_proj`),
"all-linear", or a comma-separated list of layer names. Names that match no layer are an error.
"""

import argparse
import math
from pathlib import Path

import torch
from finetune_text import SAMPLE_TEXT, load_model, load_tokenizer, text_blocks, training_arguments
from peft import PeftModel, get_peft_model
from transformers import Trainer

from modeling_titans.peft_utils import ATTENTION_TARGET_MODULES, MEMORY_TARGET_MODULES, titans_lora_config
from modeling_titans.configuration.configuration_titans import VARIANTS

TARGET_CHOICES = {"default": None, "memory": MEMORY_TARGET_MODULES, "attention": ATTENTION_TARGET_MODULES}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-file", type=Path, default=SAMPLE_TEXT)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a saved Titans model (directory) to adapt")
    source.add_argument("--preset", default="tiny", help="adapt a fresh model of this preset (a demo)")
    parser.add_argument("--variant", default="mac", choices=VARIANTS, help="with --preset")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/lora_finetune"))
    parser.add_argument("--targets", default="default", help="default | memory | attention | all-linear | a,b,c")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = load_tokenizer(args)
    train, evaluation = text_blocks(tokenizer, args.text_file, args.block_size, args.eval_fraction)
    base = load_model(args)
    base.save_pretrained(args.output_dir / "base")  # the adapter is reloaded onto these weights below

    targets = TARGET_CHOICES.get(args.targets, args.targets)
    if isinstance(targets, str) and targets != "all-linear":
        targets = [name.strip() for name in targets.split(",")]
    model = get_peft_model(base, titans_lora_config(base, targets, r=args.rank, lora_alpha=args.alpha))
    model.print_trainable_parameters()

    trainer = Trainer(model=model, args=training_arguments(args), train_dataset=train, eval_dataset=evaluation)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"eval perplexity: {math.exp(before):.2f} before, {math.exp(after):.2f} after LoRA")

    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)  # only the LoRA weights, a few KB to MB
    reloaded = PeftModel.from_pretrained(type(base).from_pretrained(args.output_dir / "base"), adapter_dir).eval()
    prompt = tokenizer("The memory", return_tensors="pt")
    with torch.no_grad():
        adapted_logits = reloaded(**prompt).logits
        sample = reloaded.generate(**prompt, max_new_tokens=40, do_sample=False)
        merged = reloaded.merge_and_unload()  # a plain TitansForCausalLM with the adapter folded in
        gap = (merged(**prompt).logits - adapted_logits).abs().max().item()
    print(f"merged vs adapted logits: max difference {gap:.2e}")
    print("sample:", tokenizer.decode(sample[0], skip_special_tokens=True))
    merged.save_pretrained(args.output_dir / "merged")
    tokenizer.save_pretrained(args.output_dir / "merged")
    print(f"adapter in {adapter_dir}, merged model in {args.output_dir / 'merged'}")


if __name__ == "__main__":
    main()
