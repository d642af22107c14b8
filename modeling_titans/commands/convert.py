"""`titans convert SOURCE OUT`: a Titans model from a pretrained Llama (see `modeling_titans.upcycling`)."""

from . import CommandError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="make a Titans model from a pretrained Llama (a folder or a .gguf file)",
        description="Copy every weight of a LlamaForCausalLM into a Titans model and add a neural memory that "
        "contributes exactly nothing until it is trained: the converted model gives the Llama's logits under a "
        "sliding-window mask of --window tokens. OUT receives the model, its generation config and the source's "
        "tokenizer. Train the memory with `titans train --model-name-or-path OUT --train-only memory ...`.",
    )
    parser.add_argument("source", metavar="SOURCE", help="a Llama model folder, or a .gguf file (needs `pip install gguf`)")
    parser.add_argument("out_dir", metavar="OUT", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--variant", default="mag", help="mag or mal (default mag); mac and lmm cannot start exact")
    parser.add_argument("--window", type=int, required=True, help="attention window in tokens (sliding_window)")
    parser.add_argument(
        "--memory-layers", help="comma-separated layer indices that get a memory (default: all); the others keep "
        "sliding-window attention alone"
    )
    parser.add_argument("--memory-depth", type=int, help="layers of each memory MLP (default: TitansConfig's)")
    parser.add_argument("--memory-chunk-size", type=int, help="tokens per inner gradient step (default: TitansConfig's)")
    parser.add_argument(
        "--memory-num-heads", type=int, help="memory heads (default: the Llama's num_attention_heads)"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..upcycling import convert_llama

    try:
        memory_layers = (
            None if args.memory_layers is None else [int(item) for item in args.memory_layers.split(",") if item.strip()]
        )
    except ValueError:
        raise CommandError(f"--memory-layers {args.memory_layers!r}: expected integers separated by commas.") from None
    options = {
        field: value
        for field, value in (
            ("memory_depth", args.memory_depth),
            ("memory_chunk_size", args.memory_chunk_size),
            ("memory_num_heads", args.memory_num_heads),
        )
        if value is not None
    }
    try:
        model = convert_llama(
            args.source, args.out_dir, args.variant, args.window, memory_layers, overwrite=args.overwrite, **options
        )
    except (OSError, ValueError, ImportError) as error:
        raise CommandError(str(error).strip().splitlines()[0]) from error
    config = model.config
    with_memory = sum(kind != "swa" for kind in config.mixer_types)
    print(
        f"Converted {args.source} to {args.out_dir}: Titans {config.variant.upper()}, memory in {with_memory} of "
        f"{config.num_hidden_layers} layers, window {config.sliding_window}, "
        f"{model.num_parameters():,} parameters."
    )
    return 0
