"""Checks that a folder holds a Titans checkpoint we can trust, before `titans export` reads it and before
`titans push` uploads it.

transformers alone is lenient where a shared checkpoint should not be: a renamed or missing tensor only logs a
warning and is silently re-initialised at random. Here each problem is one clear `CheckpointError`:
- `config.json` missing, not JSON, not `model_type: titans`, or refused by `TitansConfig` (an unknown variant, a
  field out of range, a `titans_format_version` newer than this code);
- weights only in pickle form (`pytorch_model.bin`): we read and write safetensors only, since unpickling a
  file runs arbitrary code;
- a safetensors file that is truncated or whose header is corrupt, a shard the index names but that is
  missing, or an index that disagrees with the shards;
- tensors that do not match the model the config describes: missing, unexpected or of the wrong shape (the
  model is built on the meta device, so this costs no memory).
Changed tensor values with an intact header cannot be detected from the file alone; the Hub records every
weights file's SHA-256 on upload.
"""

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from modeling_titans import TitansConfig, TitansForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_PREFIX = "pytorch_model"
MAX_NAMES_IN_MESSAGE = 5


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be exported or pushed as it is; the message says why."""


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return content


def load_titans_config(folder: str) -> TitansConfig:
    """The checkpoint's `TitansConfig`, validated (variant, ranges, format version)."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: not a model checkpoint directory")
    config_dict = read_json(path)
    if config_dict.get("model_type") != TitansConfig.model_type:
        raise CheckpointError(f"{path} has model_type={config_dict.get('model_type')!r}, not 'titans'")
    try:
        return TitansConfig.from_dict(config_dict)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def weight_files(folder: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint (one file, or the shards of its index) and the index's
    tensor -> file map (None without an index)."""
    index_path = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise CheckpointError(f"{index_path} names shard(s) that are missing: {_some(missing)}")
        return files, weight_map
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        return [WEIGHTS_NAME], None
    pickles = sorted(name for name in os.listdir(folder) if name.startswith(PICKLE_WEIGHTS_PREFIX))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); Titans reads and shares safetensors only, "
            "since unpickling runs arbitrary code. If you trust the file, load the model in Python and save it again "
            "with model.save_pretrained(DIR), which writes model.safetensors."
        )
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME})")


def check_weights(folder: str, config: TitansConfig):
    """Raises CheckpointError unless the safetensors files hold exactly the tensors of the model `config`
    describes, with their shapes (tied weights stored once)."""
    files, weight_map = weight_files(folder)
    stored = {}  # tensor name -> (shape, file)
    for file_name in files:
        path = os.path.join(folder, file_name)
        try:
            with safe_open(path, framework="pt") as weights:
                for name in weights.keys():
                    if name in stored:
                        raise CheckpointError(f"tensor {name} is stored twice: in {stored[name][1]} and {file_name}")
                    if weight_map is not None and weight_map.get(name) != file_name:
                        raise CheckpointError(f"{path} holds {name}, which {WEIGHTS_INDEX_NAME} places elsewhere")
                    stored[name] = (tuple(weights.get_slice(name).get_shape()), file_name)
        except SafetensorError as error:
            message = f"{path} is not a valid safetensors file (truncated or corrupted?): {error}"
            raise CheckpointError(message) from None
    not_stored = set(weight_map or ()) - set(stored)
    if not_stored:
        raise CheckpointError(f"{WEIGHTS_INDEX_NAME} lists tensors that no shard holds: {_some(not_stored)}")

    with torch.device("meta"):
        expected = TitansForCausalLM(config).state_dict(keep_vars=True)
    # Tied weights are one tensor under several names; a file stores it under one of them.
    stored_tensors = {id(expected[name]) for name in stored if name in expected}
    problems = []
    missing = [name for name, tensor in expected.items() if id(tensor) not in stored_tensors]
    if missing:
        problems.append(f"missing {_some(missing)}")
    unexpected = [name for name in stored if name not in expected]
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    wrong_shape = [
        f"{name} {list(shape)} in {file_name} (expected {list(expected[name].shape)})"
        for name, (shape, file_name) in stored.items()
        if name in expected and shape != tuple(expected[name].shape)
    ]
    if wrong_shape:
        problems.append(f"wrong shape: {_some(wrong_shape)}")
    if problems:
        raise CheckpointError(f"the weights in {folder} do not match its {CONFIG_NAME}: " + "; ".join(problems))


def check_checkpoint(folder: str) -> TitansConfig:
    """Validates a checkpoint folder (config and weights); returns its config."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a directory")
    config = load_titans_config(folder)
    check_weights(folder, config)
    return config


def _some(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_NAMES_IN_MESSAGE])
    return shown if len(names) <= MAX_NAMES_IN_MESSAGE else f"{shown} and {len(names) - MAX_NAMES_IN_MESSAGE} more"
