"""Share Titans checkpoints on the Hugging Face Hub.

- `export_checkpoint(ckpt_dir, out_dir)`: a self-contained repository folder (safetensors weights, config with
  `auto_map`, tokenizer, flat remote code generated from this package, model card) that loads with
  `from_pretrained(..., trust_remote_code=True)` without our package (`titans export`).
- `check_push_folder` / `push_folder`: validate and upload such a folder (`titans push`).
- `write_remote_code`: the flat code files, generated from this package's source.
- `CheckpointError` (a folder that cannot be exported or pushed as it is) and `RemoteCodeError` (package code
  that cannot be flattened): the message says why.
"""

from modeling_titans.checkpoints import CheckpointError, check_checkpoint
from .export import check_export_folder, export_checkpoint
from .push import check_push_folder, push_folder, upload_plan
from .remote_code import RemoteCodeError, write_remote_code

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "check_export_folder",
    "check_push_folder",
    "export_checkpoint",
    "push_folder",
    "RemoteCodeError",
    "upload_plan",
    "write_remote_code",
]
