"""`titans export CKPT_DIR OUT_DIR`: turn a checkpoint into a self-contained Hugging Face Hub repository folder
(see `modeling_titans.hub_upload.export`)."""

from . import CommandError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "export",
        help="make a Hub-ready repository folder from a checkpoint",
        description="Write OUT_DIR: safetensors weights, config.json with auto_map, generation_config.json, the "
        "tokenizer, flat remote code generated from this package, and a model card. It loads with "
        "AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True) without modeling_titans installed. "
        "Upload it with `titans push OUT_DIR --repo-id NAME`.",
    )
    parser.add_argument(
        "checkpoint_dir", metavar="CKPT_DIR", help="a folder written by save_pretrained or `titans train`"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to create (must not exist or be empty)")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="split the weights into shards of at most this size (default 5GB)"
    )
    parser.add_argument("--license", default="apache-2.0", help="license id for the model card (default apache-2.0)")
    parser.add_argument("--repo-id", help="the Hub repository (user/name) that the card's usage snippet loads")
    parser.set_defaults(run=run)


def run(args) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    from ..hub_upload import CheckpointError, RemoteCodeError, export_checkpoint

    try:
        max_shard_size = convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        raise CommandError(f"--max-shard-size {args.max_shard_size!r} is not a size like 500MB or 5GB") from None
    try:
        files = export_checkpoint(
            args.checkpoint_dir, args.out_dir, max_shard_size=max_shard_size, license=args.license, repo_id=args.repo_id
        )
    except (CheckpointError, RemoteCodeError, OSError) as error:
        raise CommandError(error) from None
    print(f"Exported {args.checkpoint_dir} to {args.out_dir}: {', '.join(files)}")
    if args.repo_id is None:
        print("The model card's usage snippet names a placeholder repository; pass --repo-id to fill it in.")
    print(f"Upload with: titans push {args.out_dir} --repo-id {args.repo_id or 'USER/NAME'}")
    return 0
