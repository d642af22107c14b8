"""TitansConfig: validation of every field, presets, save / load, and the ablation switches."""

import json

import pytest
from transformers import AutoConfig

from modeling_titans import TitansConfig
from modeling_titans.configuration.configuration_titans import VARIANTS


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"variant": "mamba"}, "variant", "must be one of"),
        ({"segment_size": 10}, "segment_size", "multiple of memory_chunk_size=4"),
        ({"hidden_size": 30}, "hidden_size", "divisible by num_attention_heads=4"),
        ({"memory_num_heads": 3}, "hidden_size", "divisible by memory_num_heads=3"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "divide num_attention_heads=4"),
        ({"memory_depth": 0}, "memory_depth", ">= 1"),
        ({"memory_depth": 1.5}, "memory_depth", "integer"),
        ({"memory_expansion": 0}, "memory_expansion", ">= 1"),
        ({"memory_chunk_size": 0}, "memory_chunk_size", ">= 1"),
        ({"segment_size": -8}, "segment_size", ">= 1"),
        ({"sliding_window": 0}, "sliding_window", ">= 1"),
        ({"conv_kernel_size": 0}, "conv_kernel_size", ">= 1"),
        ({"hidden_size": -32}, "hidden_size", ">= 1"),
        ({"vocab_size": 0}, "vocab_size", ">= 1"),
        ({"num_hidden_layers": 0}, "num_hidden_layers", ">= 1"),
        ({"intermediate_size": -1}, "intermediate_size", ">= 1"),
        ({"num_persistent_tokens": -1}, "num_persistent_tokens", ">= 0"),
        ({"memory_lr_max": 0.0}, "memory_lr_max", "> 0"),
        ({"memory_forget_init": 0.0}, "memory_forget_init", "strictly between 0 and 1"),
        ({"memory_forget_scale": -0.5}, "memory_forget_scale", "finite number >= 0"),
        ({"memory_forget_scale": float("inf")}, "memory_forget_scale", "finite number >= 0"),
        ({"memory_forget_scale": "0.5"}, "memory_forget_scale", "finite number >= 0"),
        ({"memory_max_norm": 0.0}, "memory_max_norm", "None or a finite number > 0"),
        ({"memory_max_norm": float("nan")}, "memory_max_norm", "None or a finite number > 0"),
        ({"memory_max_norm": True}, "memory_max_norm", "None or a finite number > 0"),
        ({"memory_momentum_init": 1.0}, "memory_momentum_init", "strictly between 0 and 1"),
        ({"memory_lr_init": 1.5}, "memory_lr_init", "strictly between 0 and 1"),
        ({"gate_activation": "swoosh"}, "gate_activation", "must be one of"),
        ({"mac_memory_input": "keys"}, "mac_memory_input", "must be one of ('residual',"),
        ({"hidden_act": "swoosh"}, "hidden_act", "must be one of"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps", "> 0"),
        ({"rope_theta": -1.0}, "rope_parameters", "rope_theta must be > 0"),
        ({"rope_parameters": {"rope_type": "stretchy"}}, "rope_parameters", "rope_type must be one of ('default',"),
        ({"rope_parameters": {"rope_type": "linear"}}, "rope_parameters", "Missing required keys"),
        ({"rope_parameters": {"partial_rotary_factor": 0.5}}, "rope_parameters", "partial_rotary_factor"),
        ({"attention_dropout": 1.0}, "attention_dropout", "[0, 1)"),
        ({"pad_token_id": 259}, "pad_token_id", "[0, 259)"),
        ({"bos_token_id": -1}, "bos_token_id", "[0, 259)"),
        ({"titans_format_version": 99}, "titans_format_version", "newer version"),
    ],
)
def test_invalid_value_raises_naming_the_field(overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        TitansConfig.from_preset("tiny", **overrides)
    message = str(error.value)
    assert f"TitansConfig.{field}=" in message
    assert allowed in message


def test_odd_attention_head_dim_is_refused():
    # hidden 36 / 12 heads = head_dim 3: rotary needs an even head dim; memory heads 2 divide 36.
    with pytest.raises(ValueError, match=r"TitansConfig\.hidden_size=36 .*even"):
        TitansConfig.from_preset("tiny", hidden_size=36, num_attention_heads=12, num_key_value_heads=12)


def test_num_key_value_heads_defaults_to_attention_heads():
    config = TitansConfig(hidden_size=64, num_attention_heads=8, memory_num_heads=4, num_persistent_tokens=0)
    assert config.num_key_value_heads == 8


@pytest.mark.parametrize("name", ["tiny", "small", "170m", "340m", "760m", "1.3b"])
def test_every_preset_loads_by_name(name):
    config = TitansConfig.from_preset(name)
    assert config.model_type == "titans"
    assert config.segment_size % config.memory_chunk_size == 0
    assert name in TitansConfig.available_presets()


def test_paper_presets_grow_in_size():
    widths = [TitansConfig.from_preset(name).hidden_size for name in ("170m", "340m", "760m", "1.3b")]
    assert widths == sorted(widths) and len(set(widths)) > 1


def test_preset_overrides_apply_and_are_validated():
    config = TitansConfig.from_preset("tiny", variant="mac", memory_depth=1)
    assert (config.variant, config.memory_depth, config.hidden_size) == ("mac", 1, 32)
    with pytest.raises(ValueError, match="memory_depth"):
        TitansConfig.from_preset("tiny", memory_depth=0)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError) as error:
        TitansConfig.from_preset("gigantic")
    message = str(error.value)
    assert "'gigantic'" in message and "tiny" in message and "170m" in message


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip(tmp_path, variant):
    config = TitansConfig.from_preset(
        "tiny", variant=variant, use_momentum=False, conv_kernel_size=3, gate_activation="tanh", memory_lr_max=0.5,
        memory_forget_scale=0.25,
    )
    config.save_pretrained(tmp_path)
    for loaded in (TitansConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is TitansConfig
        assert loaded.to_diff_dict() == config.to_diff_dict()


def test_loading_a_saved_invalid_config_is_refused(tmp_path):
    TitansConfig.from_preset("tiny").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"segment_size": 8', '"segment_size": 6'))
    with pytest.raises(ValueError, match="segment_size"):
        TitansConfig.from_pretrained(tmp_path)


def test_rope_theta_and_rope_scaling_are_read_into_rope_parameters(tmp_path):
    """As in transformers 5 (Llama): `rope_theta` (a keyword or an older config.json) and the legacy `rope_scaling`
    land in `rope_parameters`, with `rope_type`."""
    config = TitansConfig.from_preset("tiny", rope_theta=5e5)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    assert TitansConfig.from_preset("tiny").rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    scaled = TitansConfig.from_preset("tiny", rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=100.0)
    assert scaled.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}
    scaled.save_pretrained(tmp_path)
    assert TitansConfig.from_pretrained(tmp_path).rope_parameters == scaled.rope_parameters
    path = tmp_path / "config.json"  # a config.json written before rope_parameters existed
    fields = json.loads(path.read_text())
    del fields["rope_parameters"]
    path.write_text(json.dumps({**fields, "rope_theta": 123.0}))
    assert TitansConfig.from_pretrained(tmp_path).rope_parameters == {"rope_type": "default", "rope_theta": 123.0}


def test_activations_come_from_transformers():
    config = TitansConfig.from_preset("tiny", hidden_act="gelu", gate_activation="relu")
    assert (config.hidden_act, config.gate_activation) == ("gelu", "relu")


def test_an_older_config_keeps_its_inner_step(tmp_path):
    """A config saved before titans_format_version 3 has neither `memory_lr_relative` nor `memory_normalize_grad`:
    it loads with both off (absolute theta, plain inner gradients), the inner step its checkpoint was trained with,
    while a new config gets the stable defaults; a round trip of the loaded config keeps them off."""
    assert TitansConfig().memory_lr_relative and TitansConfig().memory_normalize_grad
    TitansConfig.from_preset("tiny").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    fields = json.loads(path.read_text())
    del fields["memory_lr_relative"], fields["memory_normalize_grad"]
    fields["titans_format_version"] = 2
    path.write_text(json.dumps(fields))
    for loaded in (TitansConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert not loaded.memory_lr_relative and not loaded.memory_normalize_grad
    loaded.save_pretrained(tmp_path / "again")
    again = TitansConfig.from_pretrained(tmp_path / "again")
    assert not again.memory_lr_relative and not again.memory_normalize_grad
