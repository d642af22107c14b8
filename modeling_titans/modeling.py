"""Titans language models for Hugging Face Transformers (paper Sec. 4): the decoder stack, the causal-LM head and
the `PreTrainedModel` plumbing. The blocks' token mixers live in `layers/token_mixers.py` (one class per kind,
chosen per layer by `config.mixer_types`), the neural memory's math in `ops/`.

Padding: inside the model every row is "packed" so that its real tokens come first, pads after them; positions
count real tokens only, and pads never write into the memory nor take attention (`layers/tokens.py`).
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging

from .cache_titans import TitansCache
from .configuration.configuration_titans import TITANS_FORMAT_VERSION, VARIANTS, TitansConfig
from .layers.attention import TitansAttention
from .layers.basics import TitansMLP, TitansRMSNorm, TitansRotaryEmbedding
from .layers.memory_layer import MEMORY_GATES, CausalDepthwiseConv, ConstantGate, MemoryProjection, TitansGate
from .layers.token_mixers import TOKEN_MIXERS, block_size
from .layers.tokens import RowPacking, TokenInfo
from .ops.memory_network import MemoryInitialWeights

logger = logging.get_logger(__name__)


class TitansDecoderLayer(GradientCheckpointingLayer):
    """One block: the layer's token mixer (kind `config.mixer_types[layer_idx]`), then the gated MLP."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer = TOKEN_MIXERS[config.mixer_types[layer_idx]](config, layer_idx)
        self.post_attention_layernorm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = TitansMLP(config)

    def forward(self, hidden_states, tokens: TokenInfo, rotary, cache=None, output_attentions=False):
        """`cache` is this layer's slot of the TitansCache, updated in place by the mixer (a keyword argument, so
        that activation checkpointing drops it instead of writing the state twice)."""
        mixed, weights = self.mixer(hidden_states, tokens, rotary, cache=cache, output_attentions=output_attentions)
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class TitansPreTrainedModel(PreTrainedModel):
    config_class = TitansConfig
    config: TitansConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TitansDecoderLayer"]
    _keep_in_fp32_modules = list(MEMORY_GATES)  # loaded in fp16, the gates keep fp32 weights (they compute in fp32)
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _is_stateful = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint saved by a model of another structure (e.g. a
        MAG checkpoint loaded with a MAC config, or with another depth) instead of silently initialising the
        weights it lacks. Weights missing from a checkpoint of this very structure are reported as transformers
        reports them for any model (the load report, `output_loading_info`). A local checkpoint of an older
        format has its weights renamed to the current layout as it loads."""
        if kwargs.get("variant") in VARIANTS:
            raise ValueError(
                f"from_pretrained(variant={kwargs['variant']!r}): `variant` there names a weights-file variant in "
                "transformers. A checkpoint keeps the Titans variant it was trained with; to build another one, "
                "use a new config: TitansForCausalLM(TitansConfig(..., variant=...))."
            )
        source = pretrained_model_name_or_path
        legacy = legacy_checkpoint(source) if kwargs.get("state_dict") is None else None
        if legacy is not None:
            saved_config, kwargs["state_dict"] = legacy
            kwargs.setdefault("config", saved_config)
            pretrained_model_name_or_path = None
        else:
            saved_config = checkpoint_config(source, kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model.config.titans_format_version = TITANS_FORMAT_VERSION  # saved again, it is in the current layout
        if saved_config is not None:
            expected, saved = layer_weight_names(model.config), layer_weight_names(saved_config)
            if expected != saved:
                raise ValueError(
                    f"The checkpoint at {source} was saved by a Titans model of another structure (variant "
                    f"{saved_config.variant!r}, mixer_types {saved_config.mixer_types}) than this one (variant "
                    f"{model.config.variant!r}, mixer_types {model.config.mixer_types}): its decoder layers hold "
                    f"other weights (e.g. layers.{min(expected ^ saved)}). A checkpoint of one variant, depth or "
                    "ablation cannot be loaded as another."
                )
        return (model, info) if wants_info else model

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (TitansGate, ConstantGate)):
            module.bias.fill_(module.bias_init)
        elif isinstance(module, MemoryProjection):
            module.weight.normal_(0.0, module.in_features**-0.5)
        elif isinstance(module, CausalDepthwiseConv):
            module.weight.zero_()
            module.weight[:, 0, -1] = 1.0
        elif isinstance(module, MemoryInitialWeights):
            module.reset_parameters()
        elif isinstance(module, TitansAttention) and module.persistent_tokens is not None:
            module.persistent_tokens.normal_(0.0, self.config.initializer_range)


class TitansModel(TitansPreTrainedModel):
    """The decoder stack: embeddings, `num_hidden_layers` Titans blocks, final RMSNorm."""

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(TitansDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = TitansRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TitansRotaryEmbedding(config)
        self.block_size = block_size(config)  # a pass of several tokens must start every row on a multiple
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_memory_writes(self, enabled: bool):
        """Switches test-time learning on or off in every layer. Off, no token is written: each memory stays where
        it stands (at its learned M_0 for a new sequence, or the state a cache holds) and every token reads it, so
        the model keeps only what attention sees and what is already stored, which isolates what the memory adds."""
        for memory in self.memories():
            memory.writes_enabled = enabled

    def set_memory_scan_compiled(self, enabled: bool = True):
        """Runs the per-chunk steps of every layer's memory scan (training and prefill; not the one-token decoding
        step) through `torch.compile`: the same numbers, 1.0-1.7x the training speed of the model in our CPU runs
        (the op's elementwise passes over the memory state fuse; `benchmarks/README.md`), after a compilation of
        ~30 s on first use. Compiling the whole model instead (`torch.compile(model)`) unrolls the scan's chunk
        loop, which compiles for many minutes at each training length."""
        for memory in self.memories():
            memory.compile_scan = enabled

    def memories(self):
        """The neural memory module of every layer that has one, in layer order."""
        return [layer.mixer.memory for layer in self.layers if layer.mixer.has_memory]

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TitansCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: TitansCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Runs the decoder stack. `attention_mask` (batch, cached + new tokens) marks real tokens with 1 (pads
        anywhere: left, right, or between real tokens); `cache` (alias `past_key_values`) is a TitansCache to
        continue and update.

        `output_attentions` (eager attention only; otherwise a warning and no weights, as in Llama): one tensor
        per attention layer, (batch, heads, T, P + K), T the new tokens in input order, the key axis holding the
        P persistent tokens first and then K columns aligned with the input columns so far (cached ones
        included): one per column, or for MAC two, the retrieved memory token h_c then the token x_c. Pads,
        as queries or keys, and keys out of reach have weight 0."""
        cache = cache if cache is not None else past_key_values
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            self.check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is not None and not isinstance(cache, TitansCache):
            raise TypeError(
                f"Titans keeps its neural memory in a TitansCache, got {type(cache).__name__}; pass "
                "`cache=TitansCache(model.config)` or let generate() create one."
            )
        if cache is not None:
            cache.check_model(self.config)
        if use_cache and cache is None:
            cache = TitansCache(self.config)
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"{self.config._attn_implementation!r} attention does not return attention weights "
                "(output_attentions=True); load the model with attn_implementation=\"eager\" to get them."
            )
        return_weights = output_attentions and self.config._attn_implementation == "eager"

        batch_size, seq_len, _ = inputs_embeds.shape
        past_positions = cache.num_positions if cache is not None else 0
        new_mask = self.new_token_mask(attention_mask, batch_size, seq_len, past_positions, inputs_embeds.device)
        seen = cache.seen_tokens if cache is not None and cache.seen_tokens is not None else None
        if seen is None:
            seen = torch.zeros(batch_size, dtype=torch.long, device=inputs_embeds.device)
        elif seen.shape[0] != batch_size:
            raise ValueError(f"The cache holds {seen.shape[0]} rows but the input has {batch_size}.")

        resuming = cache is not None and cache.seen_tokens is not None  # else every row starts at position 0
        if seq_len > 1 and resuming and bool((seen % self.block_size != 0).any()):
            # Some row stands inside a chunk or segment: the parallel forms assume each row starts on a boundary.
            # Continue token by token, which is exact (the same math the decoding step uses).
            return self.forward_token_by_token(
                inputs_embeds, new_mask, position_ids, cache, output_attentions, output_hidden_states
            )

        # Packed layout: each row's real tokens first, its pads after them. Without a mask nothing is read from a
        # tensor to know that (no host sync on the hot path). A compiled decoding step does not read its mask either
        # (a single column is packed, a pad there is masked where it would write), so it traces into one graph;
        # eager reads it, which skips that masking of the memory's state when no row is a pad.
        if attention_mask is None:
            all_valid = True
        elif seq_len == 1 and torch.compiler.is_compiling():
            all_valid = False
        else:
            all_valid = bool(new_mask.all())
        packing = RowPacking(new_mask, all_valid)
        hidden_states = packing.pack(inputs_embeds)
        columns = torch.arange(seq_len, device=seen.device).expand(batch_size, -1)
        positions = seen[:, None] + columns
        tokens = TokenInfo(
            positions=positions,
            valid=packing.valid,
            seen=seen,
            all_valid=all_valid,
            columns=past_positions + (columns if packing.order is None else packing.order),
            num_columns=past_positions + seq_len,
            first_position=0 if all_valid and not resuming else None,
        )
        rope_positions = positions if position_ids is None else packing.pack(position_ids.expand(batch_size, -1))
        rotary = self.rotary_emb(hidden_states, rope_positions)

        all_hidden_states, all_attentions = [], []
        for layer_idx, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states.append(packing.unpack(hidden_states))
            layer_cache = cache.layers[layer_idx] if cache is not None else None
            hidden_states, weights = decoder_layer(
                hidden_states, tokens, rotary, cache=layer_cache, output_attentions=return_weights
            )
            if weights is not None:  # a layer without attention has none
                all_attentions.append(packing.unpack(weights, dim=2))
        hidden_states = packing.unpack(self.norm(hidden_states))
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.seen_tokens = seen + tokens.lengths
            cache.num_positions = past_positions + seq_len
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )

    def forward_token_by_token(
        self, inputs_embeds, new_mask, position_ids, cache, output_attentions, output_hidden_states
    ):
        if not bool(new_mask.all()):
            raise ValueError(
                "Padding inside a continuation is not supported: when continuing from a TitansCache, every new "
                "token of every row must be real (attention_mask of the new part all ones)."
            )
        steps = []
        for t in range(inputs_embeds.shape[1]):
            step_positions = None if position_ids is None else position_ids[:, t : t + 1]
            steps.append(
                self(
                    inputs_embeds=inputs_embeds[:, t : t + 1],
                    position_ids=step_positions,
                    cache=cache,
                    use_cache=True,
                    output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states,
                )
            )
        hidden_states = attentions = None
        if output_hidden_states:
            hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*(s.hidden_states for s in steps)))
        if output_attentions:  # each step's key axis ends at its own column: zeros for the later ones
            attentions = tuple(
                torch.cat([F.pad(w, (0, layer[-1].shape[-1] - w.shape[-1])) for w in layer], dim=2)
                for layer in zip(*(s.attentions for s in steps))
            )
        return BaseModelOutputWithPast(
            last_hidden_state=torch.cat([s.last_hidden_state for s in steps], dim=1),
            cache=cache,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def check_token_ids(self, input_ids):
        """Refuses ids outside the vocabulary. On CPU in eager mode with the offending id; elsewhere (an
        accelerator, or while `torch.compile` traces) as an asynchronous device assertion, which does not stall
        the host nor break the compiled graph."""
        outside = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        message = f"input_ids outside the vocabulary [0, {self.config.vocab_size}): does the tokenizer match the model?"
        if input_ids.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(~outside.any(), message)
        elif bool(outside.any()):
            raise ValueError(
                f"input_ids contain {input_ids[outside][0].item()}, outside the vocabulary [0, "
                f"{self.config.vocab_size}); check that the tokenizer matches the model's vocab_size."
            )

    @staticmethod
    def new_token_mask(attention_mask, batch_size, seq_len, past_positions, device):
        """(batch, T) bool mask of the new tokens (pads anywhere: left, right, or between real tokens)."""
        if attention_mask is None:
            return torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        expected = [(batch_size, past_positions + seq_len)]
        if past_positions:
            expected.append((batch_size, seq_len))
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) not in expected:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected a 2D 0/1 mask of shape "
                f"{' or '.join(str(s) for s in expected)} (batch, cached + new tokens)."
            )
        return attention_mask[:, -seq_len:].bool()


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TitansCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: TitansCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward. `cache` (alias `past_key_values`) is a `TitansCache` that the memory writes into;
        `labels` give the shifted next-token loss through `self.loss_function` (handles `num_items_in_batch`)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def set_memory_writes(self, enabled: bool):
        """See `TitansModel.set_memory_writes`."""
        self.model.set_memory_writes(enabled)

    def set_memory_scan_compiled(self, enabled: bool = True):
        """See `TitansModel.set_memory_scan_compiled`."""
        self.model.set_memory_scan_compiled(enabled)

    @classmethod
    def from_llama(cls, model_or_path, variant="mag", sliding_window=2048, memory_layers=None, **memory_config):
        """A Titans model built from a pretrained `LlamaForCausalLM` (in memory, a folder or a .gguf file): the
        Llama's weights, plus a neural memory in `memory_layers` (default all) that contributes exactly nothing
        until it is trained, so the new model gives the Llama's logits under a `sliding_window` mask. `variant`
        is "mag" or "mal"; `memory_config` sets other TitansConfig fields (memory_depth, memory_chunk_size, ...).
        See `modeling_titans/upcycling.py`."""
        from .upcycling import from_llama

        return from_llama(model_or_path, variant, sliding_window, memory_layers, **memory_config)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a TitansCache (never a DynamicCache); a cache passed in by the user is continued."""
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if user_cache is not None:
            if not isinstance(user_cache, TitansCache):
                raise TypeError(f"Titans generates with a TitansCache, got {type(user_cache).__name__}.")
            user_cache.check_model(self.config)
            model_kwargs["cache"] = user_cache
            user_cache._is_user_defined = True
            return
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: Titans always "
                "uses its own TitansCache."
            )
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = TitansCache(self.config)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        """GenerationMixin's, refusing a passed-in cache that has consumed as many input columns as `input_ids` has,
        or more: generate() feeds the columns after the cached ones, and with none left it would feed the whole
        input again (the memory would learn the prompt twice)."""
        if next_sequence_length is not None and next_sequence_length <= 0:
            consumed = input_ids.shape[1] - next_sequence_length
            raise ValueError(
                f"The TitansCache passed to generate() has already consumed {consumed} input columns, and input_ids "
                f"has {input_ids.shape[1]}: continue with the columns it consumed followed by at least one new token "
                "(e.g. the sequences a previous generate() returned), or pass a new TitansCache."
            )
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)


def checkpoint_config(source, from_pretrained_kwargs) -> TitansConfig | None:
    """The config saved with the checkpoint at `source` (a folder or a Hub id, found with the same download
    settings as the weights), or None where there is none to read (weights passed as a state dict)."""
    if source is None or from_pretrained_kwargs.get("state_dict") is not None:
        return None
    download = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
    settings = {key: value for key, value in from_pretrained_kwargs.items() if key in download}
    try:
        return TitansConfig.from_pretrained(source, **settings)
    except OSError:
        return None


def layer_weight_names(config: TitansConfig) -> set[str]:
    """Names of the weights the decoder layers of a model of `config` hold (built on the meta device: no memory)."""
    with torch.device("meta"):
        layers = nn.ModuleList(TitansDecoderLayer(config, i) for i in range(config.num_hidden_layers))
    return set(layers.state_dict())


# The renames from each older checkpoint format to the next. Format 1 kept the token mixer's modules directly in
# the decoder layer and M_0 in the memory module itself; format 2 has today's names (format 3 changed the inner
# step's config fields only; format 4 added MAC's `memory_input_norm`, which an older config leaves out: see
# `configuration_titans.FORMER_DEFAULTS`).
LEGACY_WEIGHT_NAMES = {
    1: [
        (
            r"(layers\.\d+\.)(input_layernorm|memory|self_attn|output_gate|retrieve_q_proj|retrieve_o_proj|"
            r"attention_layernorm)\.",
            r"\1mixer.\2.",
        ),
        (r"(\.memory\.)initial_weights\.", r"\1network.initial_weights."),
    ],
    2: [],
    3: [],
}


def legacy_checkpoint(path) -> tuple[TitansConfig, dict] | None:
    """(config, renamed weights) of a local checkpoint folder written in an older format, else None."""
    config_file = os.path.join(str(path), "config.json") if path is not None else ""
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        version = json.load(f).get("titans_format_version", TITANS_FORMAT_VERSION)
    if version >= TITANS_FORMAT_VERSION:
        return None
    from safetensors.torch import load_file

    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state_dict = {}
    for name in files:
        state_dict.update(load_file(os.path.join(path, name)))
    state_dict = {current_weight_name(key, version): value for key, value in state_dict.items()}
    return TitansConfig.from_pretrained(path), state_dict


def current_weight_name(name: str, version: int) -> str:
    """The name a weight saved by checkpoint format `version` has in the current format."""
    for old_version in range(version, TITANS_FORMAT_VERSION):
        for pattern, replacement in LEGACY_WEIGHT_NAMES[old_version]:
            name = re.sub(pattern, replacement, name)
    return name


__all__ = ["TitansForCausalLM", "TitansModel", "TitansPreTrainedModel"]
