"""Upload an exported folder to the Hugging Face Hub (`create_repo` + `upload_folder`), or list what would go."""

import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from modeling_titans.checkpoints import CheckpointError
from .export import check_export_folder

# Files that unpickle on load. A Titans repository carries safetensors only; `titans train` output folders hold
# e.g. training_args.bin, which must not leak into a pushed repository.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_COMMIT_MESSAGE = "Upload Titans model with `titans push`"


def upload_plan(folder: str) -> list[tuple[str, int]]:
    """(path in the repository, size in bytes) of every file `upload_folder` sends: all files under `folder`
    but those huggingface_hub always skips (`.git/`, `.cache/huggingface/`), listed the way it lists them."""
    root = Path(folder).expanduser().resolve()
    paths = [path.relative_to(root).as_posix() for path in sorted(root.glob("**/*")) if path.is_file()]
    uploaded = filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return [(path, (root / path).stat().st_size) for path in uploaded]


def check_push_folder(folder: str) -> list[tuple[str, int]]:
    """Validates an exported folder (see `check_export_folder`), refuses pickle files, returns the upload plan."""
    check_export_folder(folder)
    plan = upload_plan(folder)
    pickles = [path for path, _ in plan if path.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"{folder} holds pickle files ({', '.join(pickles)}); a Titans repository carries safetensors only: "
            "remove them or push a folder written by `titans export`"
        )
    return plan


def push_folder(
    folder: str, repo_id: str, private: bool = False, revision: str | None = None, commit_message: str | None = None
) -> str:
    """Creates the repository (and branch `revision`) if needed and uploads `folder` in one commit; returns the
    commit's URL. The token is huggingface_hub's usual one: `HF_TOKEN`, else the one `hf auth login` saved."""
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        revision=revision,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
    )
    return commit.commit_url
