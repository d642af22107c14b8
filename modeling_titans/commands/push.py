"""`titans push OUT_DIR --repo-id NAME`: upload a folder written by `titans export` to the Hugging Face Hub
(see `modeling_titans.hub_upload.push`)."""

from . import CommandError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "push",
        help="upload an exported folder to the Hugging Face Hub",
        description="Create the repository if needed and upload OUT_DIR in one commit. The token is the one "
        "`hf auth login` saved, or HF_TOKEN. --dry-run lists the files and sizes and uploads nothing.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a folder written by `titans export`")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default main)")
    parser.add_argument("--commit-message", help="message of the upload commit")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")
    parser.set_defaults(run=run)


def run(args) -> int:
    from huggingface_hub.errors import HFValidationError, HTTPError
    from huggingface_hub.utils import validate_repo_id

    from ..hub_upload import CheckpointError, check_push_folder, push_folder

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise CommandError(f"--repo-id {args.repo_id!r} is not a valid repository id: {error}") from None
    try:
        plan = check_push_folder(args.out_dir)
    except CheckpointError as error:
        raise CommandError(error) from None

    target = f"{args.repo_id} (revision {args.revision or 'main'})"
    if args.dry_run:
        print(f"Dry run: would upload {len(plan)} files, {sum(size for _, size in plan):,} bytes, to {target}:")
        for path, size in plan:
            print(f"{size:>14,}  {path}")
        return 0
    try:
        commit_url = push_folder(args.out_dir, args.repo_id, args.private, args.revision, args.commit_message)
    except (HTTPError, OSError) as error:
        # HTTPError covers refused connections and HTTP errors (401/403: a missing or read-only token); OSError
        # covers offline mode and a missing token. The local folder is only read, never changed.
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise CommandError(
            f"could not push {args.out_dir} to {target}: {type(error).__name__}: {first_line} "
            "(check the network, and the token: `hf auth login` or HF_TOKEN). The local folder is unchanged."
        ) from None
    print(f"Pushed {len(plan)} files to {target}: {commit_url}")
    return 0
