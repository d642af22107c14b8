"""Titans model configuration.

`docs/architecture.md` explains every Titans field; the paper's model sizes are presets (`TitansConfig.from_preset("170m")`).
"""

import json
import math
import os

from transformers import PreTrainedConfig
from transformers.activations import ACT2CLS
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# The paper's four variants (Sec. 4). Each names a token-mixer class in `layers/token_mixers.py` (`TOKEN_MIXERS`).
VARIANTS = ("mac", "mag", "mal", "lmm")
# The token mixers a layer may have (`mixer_types`): a variant's, or sliding-window attention without a memory
# ("swa": the layers a model converted from Llama leaves without memory, `modeling_titans/upcycling.py`).
MIXER_KINDS = (*VARIANTS, "swa")
ACTIVATIONS = tuple(sorted(ACT2CLS))  # the names transformers' ACT2FN knows
ROPE_TYPES = ("default", *sorted(ROPE_INIT_FUNCTIONS))
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")

# Version of the config format written by this code. A checkpoint written by a newer format is refused with a
# clear message instead of being loaded with fields this code does not know.
# Format 2 put each block's token mixer under `layers.N.mixer.` and M_0 under `memory.network.`; `from_pretrained`
# renames the weights of a format-1 checkpoint as it loads.
# Later formats added fields whose defaults compute something new. A config of an older format has no such field,
# so it loads with the value that reproduces what its checkpoint was trained with (`FORMER_DEFAULTS`):
# format 3 added `memory_lr_relative` and `memory_normalize_grad` (on by default; older: the plain inner step),
# format 4 added `mac_memory_input` ("residual" by default; older: MAC writes its attention outputs as they are).
TITANS_FORMAT_VERSION = 4
FORMER_DEFAULTS = {
    3: {"memory_lr_relative": False, "memory_normalize_grad": False},
    4: {"mac_memory_input": "attention"},
}
MAC_MEMORY_INPUTS = ("residual", "normed_attention", "attention")


class TitansConfig(PreTrainedConfig):
    r"""Configuration of a Titans language model (Behrouz et al., arXiv 2501.00663).

    Backbone fields are the usual Llama ones, read as transformers 5 reads them: `hidden_act` names the MLP's
    activation in `transformers.activations.ACT2FN`, and `rope_parameters` holds `rope_type` ("default" or any
    RoPE scaling of `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`: linear, dynamic, yarn, llama3, ...),
    `rope_theta` and the type's own fields; `rope_theta=...` and the older `rope_scaling={...}` are read into it.
    Titans fields:

    - `variant`: `"mac"` (memory as context), `"mag"` (memory as gate), `"mal"` (memory as layer) or `"lmm"`
      (the neural memory alone).
    - `mixer_types`: the token mixer of each layer, one of the variants per layer (default: `variant` in every
      layer); a hybrid model is a list such as `["mag", "mag", "mac", "mag"]`. `"swa"` is sliding-window
      attention without a neural memory (the layers of a model converted from Llama that get no memory).
    - `memory_depth` (L_M >= 1; 1 = matrix memory), `memory_expansion` (hidden width of a deep memory, as a
      multiple of the head width), `memory_num_heads` (each head has its own memory MLP over
      `hidden_size / memory_num_heads` channels).
    - `memory_chunk_size`: tokens per inner gradient step (b in Sec. 3.2); gradients of a chunk are taken at the
      weights of its start.
    - `segment_size` (MAC): tokens per attention segment; a multiple of `memory_chunk_size`.
    - `sliding_window` (MAG, MAL): tokens each query sees, itself included.
    - `mac_memory_input` (MAC): what each segment writes into the neural memory and reads it with (Eqs. 24-25).
      "residual" (default): RMSNorm(x + y), the block's input plus the attention outputs y, normalised with a
      learned gain; "normed_attention": RMSNorm(y); "attention": y as it is (the literal Eq. 24, the only choice
      before config format 4). y alone is a poor memory input: it is an average over the segment, so the
      vectors of different tokens are nearly parallel and the memory's keys cannot tell them apart (and at
      initialisation it is ~0.3% of the tokens' scale); with it MAC did not learn the demo's passkey task, nor with
      RMSNorm(y) (`docs/architecture.md`, "The blocks").
    - `num_persistent_tokens`: learned attention prefix of every attention layer (Eq. 19).
    - `conv_kernel_size`: causal depthwise convolution on the memory's q, k, v (Sec. 4.4).
    - `memory_lr_max`: cap theta_max of the inner learning rate theta_t = theta_max * sigmoid(.).
    - `memory_lr_relative` (default True): theta_t is divided by the chunk's gain memory_chunk_size / (1 - eta_t),
      so that theta_max is in units of the chunked inner loop's stability bound (~2) for any momentum and chunk
      size; the default theta_max = 1.0 is then safely stable. With False, theta_max is absolute: a chunk moves
      the weights by about theta * chunk / (1 - eta) times a gradient (~86 theta at chunk 16, eta 0.9), so keep
      theta_max <= ~0.02 there.
    - `memory_normalize_grad` (default True): every token's inner gradient is divided by max(1, its curvature
      along itself), a normalised LMS step; without it the deep memory's LayerNorm makes that curvature ~10-100
      and the outer training diverges (`docs/architecture.md`, "The inner step").
    - `memory_forget_init`, `memory_momentum_init`, `memory_lr_init`: initial values of alpha, eta and
      theta / theta_max; they set the gate biases.
    - `memory_forget_scale` (default 1.0): log(1 - alpha_t) is multiplied by it, so the memory retains what it
      wrote 1 / scale times as long ((1 - alpha_t)^scale per token); 0 switches the forgetting off. A setting for
      contexts longer than those the rates were learned on, as RoPE scaling is for positions: the passkey models
      trained up to 16K-64K tokens forget a needle 64K back at their learned rates and find it with 0.25
      (`docs/architecture.md`, "Forgetting at lengths beyond training").
    - `memory_max_norm` (default None: unbounded, the paper's update): where a chunk closes, every weight matrix
      of a memory head is projected onto the ball ||W||_F <= memory_max_norm and its momentum scaled alike. A
      guard for long streams through one cache, where a model's momentum can carry its writes far beyond the
      inner step's bound; like `memory_forget_scale` it can be set on a trained model, and with a bound above the
      norms the model reaches on one document it changes nothing there (`docs/architecture.md`, "Bounding the
      weights").
    - `memory_gates_from_input` (default True): alpha_t, eta_t and theta_t are computed from each token; False
      makes each a learned constant per memory head (the data-independent gates of the paper's ablations).
    - `memory_per_layer_gates` (default False): each weight matrix of a deep memory gets its own alpha_t, eta_t and
      theta_t (the NeurIPS version of the paper); False shares one set by all of them.
    - `memory_forget_per_channel` (default False): one alpha_t per output channel of a matrix memory
      (`memory_depth=1`) instead of one per head, so each column of M forgets at its own rate. Such a layer runs
      on the autograd scan (its backward keeps every chunk's state) instead of the checkpointed one.
    - Ablations of the paper's Table 5: `use_momentum`, `use_forgetting`, `use_conv`,
      `num_persistent_tokens=0`, `memory_depth=1`.
    - `gate_activation`: the non-linearity of the MAG / MAC output gate (a name in ACT2FN).
    - `gate_attention_norm`: whether the MAG / MAC output gate RMS-normalises the attention output (Eq. 28);
      False passes it as it is, which lets a model converted from Llama start as exactly that Llama.
    """

    model_type = "titans"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1_048_576
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    attention_dropout: float = 0.0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    variant: str = "mag"
    mixer_types: list[str] | None = None
    memory_depth: int = 2
    memory_expansion: int = 4
    memory_num_heads: int = 16
    memory_chunk_size: int = 16
    segment_size: int = 512
    sliding_window: int = 2048
    num_persistent_tokens: int = 128
    conv_kernel_size: int = 4
    memory_lr_max: float = 1.0
    memory_forget_init: float = 0.001
    memory_forget_scale: float = 1.0
    memory_max_norm: float | None = None
    memory_momentum_init: float = 0.9
    memory_lr_init: float = 0.3
    memory_lr_relative: bool = True
    memory_normalize_grad: bool = True
    memory_gates_from_input: bool = True
    memory_per_layer_gates: bool = False
    memory_forget_per_channel: bool = False
    use_momentum: bool = True
    use_forgetting: bool = True
    use_conv: bool = True
    gate_activation: str = "sigmoid"
    gate_attention_norm: bool = True
    mac_memory_input: str = "residual"
    titans_format_version: int = TITANS_FORMAT_VERSION

    def __post_init__(self, **kwargs):
        for version, former in FORMER_DEFAULTS.items():
            if isinstance(self.titans_format_version, int) and self.titans_format_version < version:
                for field, value in former.items():
                    setattr(self, field, value)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mixer_types is None:
            self.mixer_types = [self.variant] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self.validate_titans()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def memory_head_dim(self) -> int:
        return self.hidden_size // self.memory_num_heads

    def validate_titans(self):
        """Raises ValueError naming the first field out of range and what is allowed."""

        def require(condition, field, allowed):
            if not condition:
                raise ValueError(f"TitansConfig.{field}={getattr(self, field)!r} is invalid: {allowed}.")

        if self.titans_format_version > TITANS_FORMAT_VERSION:
            raise ValueError(
                f"TitansConfig.titans_format_version={self.titans_format_version} was written by a newer version of "
                f"the Titans code than this one (format {TITANS_FORMAT_VERSION}); upgrade modeling_titans to load it."
            )
        require(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}")
        require(
            isinstance(self.mixer_types, (list, tuple))
            and len(self.mixer_types) == self.num_hidden_layers
            and all(kind in MIXER_KINDS for kind in self.mixer_types),
            "mixer_types",
            f"must list one of {MIXER_KINDS} for each of the num_hidden_layers={self.num_hidden_layers} layers",
        )
        positive = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
            "memory_depth memory_expansion memory_num_heads memory_chunk_size segment_size sliding_window "
            "conv_kernel_size max_position_embeddings"
        )
        for field in positive.split():
            value = getattr(self, field)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "must be an integer >= 1")
        require(
            isinstance(self.num_persistent_tokens, int) and self.num_persistent_tokens >= 0,
            "num_persistent_tokens",
            "must be an integer >= 0",
        )
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"must be divisible by num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.hidden_size % self.memory_num_heads == 0,
            "hidden_size",
            f"must be divisible by memory_num_heads={self.memory_num_heads}",
        )
        require(
            self.head_dim % 2 == 0, "hidden_size", "hidden_size / num_attention_heads must be even (rotary embedding)"
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.segment_size % self.memory_chunk_size == 0,
            "segment_size",
            f"must be a multiple of memory_chunk_size={self.memory_chunk_size}",
        )
        require(self.mac_memory_input in MAC_MEMORY_INPUTS, "mac_memory_input", f"must be one of {MAC_MEMORY_INPUTS}")
        require(self.memory_lr_max > 0, "memory_lr_max", "must be > 0")
        require(
            isinstance(self.memory_forget_scale, (int, float))
            and not isinstance(self.memory_forget_scale, bool)
            and 0.0 <= self.memory_forget_scale < math.inf,
            "memory_forget_scale", "must be a finite number >= 0",
        )
        require(
            self.memory_max_norm is None
            or (isinstance(self.memory_max_norm, (int, float)) and not isinstance(self.memory_max_norm, bool)
                and 0.0 < self.memory_max_norm < math.inf),
            "memory_max_norm", "must be None or a finite number > 0",
        )
        for field in ("memory_forget_init", "memory_momentum_init", "memory_lr_init"):
            require(0.0 < getattr(self, field) < 1.0, field, "must lie strictly between 0 and 1")
        if self.memory_forget_per_channel:
            needs = "needs a matrix memory with one set of gates and forgetting on"
            allowed = self.memory_depth == 1 and not self.memory_per_layer_gates and self.use_forgetting
            require(allowed, "memory_forget_per_channel", f"{needs} (memory_depth=1, memory_per_layer_gates=False, "
                    "use_forgetting=True)")
        require(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        self.validate_rope_parameters(require)
        require(0.0 <= self.initializer_range <= 1.0, "initializer_range", "must lie in [0, 1]")
        require(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must lie in [0, 1)")
        for field in ("hidden_act", "gate_activation"):
            require(getattr(self, field) in ACTIVATIONS, field, f"must be one of ACT2FN's {ACTIVATIONS}")
        for field in ("pad_token_id", "bos_token_id"):
            value = getattr(self, field)
            require(value is None or 0 <= value < self.vocab_size, field, f"must be None or in [0, {self.vocab_size})")

    def validate_rope_parameters(self, require):
        """`rope_parameters` as transformers checks them (`validate_rope`: the fields each type needs), plus what
        Titans' rotary embedding needs: a known `rope_type`, `rope_theta` > 0 and the rotation of whole heads."""
        rope = self.rope_parameters
        require(rope.get("rope_type") in ROPE_TYPES, "rope_parameters", f"rope_type must be one of {ROPE_TYPES}")
        theta = rope.get("rope_theta")
        require(isinstance(theta, (int, float)) and theta > 0, "rope_parameters", "rope_theta must be > 0")
        require(
            rope.get("partial_rotary_factor", 1.0) == 1.0,
            "rope_parameters",
            "partial_rotary_factor must be 1 (RoPE rotates whole heads)",
        )
        try:
            self.validate_rope()
        except (KeyError, ValueError) as error:
            raise ValueError(f"TitansConfig.rope_parameters={rope!r} is invalid: {error.args[0]}") from None

    @staticmethod
    def available_presets() -> list[str]:
        if not os.path.isdir(PRESET_DIR):  # a flat copy in a Hub repository carries no presets
            return []
        return sorted(name[:-5] for name in os.listdir(PRESET_DIR) if name.endswith(".json"))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TitansConfig":
        """A named configuration: the paper's sizes ("170m", "340m", "760m", "1.3b") or small ones for tests and
        CPU demos ("tiny", "small"). Keyword arguments override fields, e.g. `from_preset("tiny", variant="mac")`."""
        path = os.path.join(PRESET_DIR, f"{name}.json")
        if not os.path.isfile(path):
            available = ", ".join(cls.available_presets()) or "none here (presets come with the modeling-titans package)"
            raise ValueError(f"Unknown Titans preset {name!r}; available: {available}.")
        with open(path) as f:
            fields = json.load(f)
        fields.update(overrides)
        return cls(**fields)


__all__ = ["TitansConfig"]
