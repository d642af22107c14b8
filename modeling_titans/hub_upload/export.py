"""`export_checkpoint`: a checkpoint folder -> a self-contained Hub repository folder.

The exported folder loads with `AutoModelForCausalLM.from_pretrained(folder)` once `modeling_titans` is imported,
and with `from_pretrained(folder, trust_remote_code=True)` without our package (locally or from the Hub, which
serves the same files). It holds:

    config.json                       the config, with `auto_map` naming the remote-code classes
    generation_config.json
    model.safetensors                 or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files                   as the tokenizer's save_pretrained writes them (+ `auto_map` if it needs code)
    configuration_titans.py, modeling_titans.py, neural_memory.py, cache_titans.py[, tokenization_titans.py]
                                      generated from the package source (see remote_code.py)
    training_summary.json             when the checkpoint has one
    README.md                         the model card

Everything is written into a hidden staging folder beside OUT_DIR, checked like a checkpoint to be pushed, and
only then renamed to OUT_DIR: a failed export leaves nothing half-written.
"""

import importlib.metadata
import json
import os
import shutil
import tempfile

from transformers import AutoTokenizer

from modeling_titans import TitansConfig, TitansForCausalLM, TitansModel

from modeling_titans.checkpoints import CheckpointError, check_checkpoint, check_finite, read_json, weight_files
from modeling_titans.training import SUMMARY_NAME
from .model_card import model_card
from .remote_code import class_reference, is_package_class, write_remote_code

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
README_NAME = "README.md"


def load_tokenizer(checkpoint_dir: str, config: TitansConfig):
    """The checkpoint's tokenizer; refuses a folder without one (the card's usage snippet needs it), a
    tokenizer class that a Hub user could not load (neither transformers' nor ours) and one with more tokens
    than the model has embeddings."""
    tokenizer_files = (TOKENIZER_CONFIG_NAME, "tokenizer.json")
    if not any(os.path.isfile(os.path.join(checkpoint_dir, name)) for name in tokenizer_files):
        raise CheckpointError(
            f"{checkpoint_dir} has no tokenizer; save one beside the model with tokenizer.save_pretrained(DIR)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the tokenizer in {checkpoint_dir}: {error}") from None
    module = type(tokenizer).__module__
    if not (module.startswith("transformers.") or is_package_class(type(tokenizer))):
        raise CheckpointError(f"tokenizer class {module}.{type(tokenizer).__name__} is neither transformers' nor ours")
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer in {checkpoint_dir} has {len(tokenizer)} tokens, more than the model's "
            f"vocab_size={config.vocab_size}"
        )
    return tokenizer


def auto_map(tokenizer) -> dict:
    """`auto_map` of config.json: the classes transformers loads from the flat files with trust_remote_code."""
    classes = {"AutoConfig": TitansConfig, "AutoModel": TitansModel, "AutoModelForCausalLM": TitansForCausalLM}
    mapping = {auto_class: class_reference(cls) for auto_class, cls in classes.items()}
    if is_package_class(type(tokenizer)):
        # [slow, fast] tokenizer classes, as transformers writes them; ours is a Python (slow) tokenizer.
        mapping["AutoTokenizer"] = [class_reference(type(tokenizer)), None]
    return mapping


def export_checkpoint(
    checkpoint_dir: str,
    out_dir: str,
    max_shard_size: int | str = "5GB",
    license: str = "apache-2.0",
    repo_id: str | None = None,
) -> list[str]:
    """Writes the Hub repository folder `out_dir` (which must not exist or be empty) from `checkpoint_dir`;
    returns the names of the files written. `repo_id` goes into the card's usage snippet."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{out_dir} already exists and is not an empty directory")
    config = check_checkpoint(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir, config)
    model = TitansForCausalLM.from_pretrained(checkpoint_dir, dtype="auto", use_safetensors=True)
    check_finite(model, checkpoint_dir)
    model.config.auto_map = auto_map(tokenizer)
    summary_path = os.path.join(checkpoint_dir, SUMMARY_NAME)
    summary = read_json(summary_path) if os.path.isfile(summary_path) else None

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".titans-export-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; OUT_DIR gets the usual permissions
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        code_modules = [TitansConfig.__module__, TitansForCausalLM.__module__]
        if "AutoTokenizer" in model.config.auto_map:
            _add_tokenizer_auto_map(staging, model.config.auto_map["AutoTokenizer"])
            code_modules.append(type(tokenizer).__module__)
        code_files = write_remote_code(staging, code_modules)
        if summary is not None:
            shutil.copyfile(summary_path, os.path.join(staging, SUMMARY_NAME))
        card = model_card(
            config=model.config,
            num_parameters=model.num_parameters(),
            repo_id=repo_id or f"your-name/{os.path.basename(os.path.abspath(out_dir))}",
            license=license,
            code_files=code_files,
            weight_files=weight_files(staging)[0],
            tokenizer_class=type(tokenizer).__name__,
            package_version=importlib.metadata.version("modeling-titans"),
            summary=summary,
        )
        with open(os.path.join(staging, README_NAME), "w", encoding="utf-8") as f:
            f.write(card)
        check_export_folder(staging)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(os.listdir(out_dir))


def _add_tokenizer_auto_map(folder: str, tokenizer_classes: list):
    """AutoTokenizer finds remote tokenizer code through `auto_map` in tokenizer_config.json."""
    path = os.path.join(folder, TOKENIZER_CONFIG_NAME)
    tokenizer_config = read_json(path)
    tokenizer_config["auto_map"] = {"AutoTokenizer": tokenizer_classes}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_export_folder(folder: str) -> TitansConfig:
    """Validates a folder to be shared: a valid checkpoint whose `auto_map` entries (config.json and
    tokenizer_config.json) all name flat code files that are present."""
    config = check_checkpoint(folder)
    config_auto_map = read_json(os.path.join(folder, "config.json")).get("auto_map") or {}
    if "AutoModelForCausalLM" not in config_auto_map:
        raise CheckpointError(f"{folder}/config.json has no auto_map: not an exported folder (run `titans export`)")
    tokenizer_config_path = os.path.join(folder, TOKENIZER_CONFIG_NAME)
    tokenizer_config = read_json(tokenizer_config_path) if os.path.isfile(tokenizer_config_path) else {}
    tokenizer_auto_map = tokenizer_config.get("auto_map") or {}
    references = []
    for value in list(config_auto_map.values()) + list(tokenizer_auto_map.values()):
        references += value if isinstance(value, list) else [value]
    for reference in filter(None, references):
        code_file = reference.rsplit(".", 1)[0] + ".py"
        if not os.path.isfile(os.path.join(folder, code_file)):
            raise CheckpointError(f"{folder} lacks {code_file}, which auto_map names for {reference}")
    return config
