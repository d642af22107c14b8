"""Titans (Behrouz, Zhong, Mirrokni, arXiv 2501.00663) for Hugging Face Transformers.

Importing this package registers the Titans classes with AutoConfig, AutoModel, AutoModelForCausalLM and
AutoTokenizer, so `from_pretrained` needs no `trust_remote_code` when it is installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .cache_titans import TitansCache
from .configuration import TitansConfig
from .modeling import TitansForCausalLM, TitansModel, TitansPreTrainedModel
from .tokenization import TitansByteTokenizer

AutoConfig.register("titans", TitansConfig, exist_ok=True)
AutoModel.register(TitansConfig, TitansModel, exist_ok=True)
AutoModelForCausalLM.register(TitansConfig, TitansForCausalLM, exist_ok=True)
AutoTokenizer.register(TitansConfig, tokenizer_class=TitansByteTokenizer, exist_ok=True)

__all__ = [
    "TitansByteTokenizer",
    "TitansCache",
    "TitansConfig",
    "TitansForCausalLM",
    "TitansModel",
    "TitansPreTrainedModel",
]
