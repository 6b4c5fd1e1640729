"""Tiny random models of many Hugging Face families, with the real SmolLM2 tokenizer's vocabulary.

Weights are drawn at unit scale (embeddings ~ N(0, 1), each linear layer ~
N(0, 1/fan_in), biases ~ N(0, 0.1²)) instead of HF's 0.02: with the default
init every sublayer adds almost nothing to the residual stream, and a check
that confuses "the MLP's output" with "the MLP's output after a norm" could
not fail.
"""

from __future__ import annotations

import importlib
from typing import Any

from tests.modelfixtures import TOKENIZER_DIR

D, D_MLP, LAYERS, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 64, 96, 3, 4, 2, 16, 128

# the sizes under the names most families use (Falcon's config names only the first three); _COMMON adds
# grouped-query attention and the head size
_FALCON = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
_SIZES = dict(_FALCON, intermediate_size=D_MLP, max_position_embeddings=CONTEXT)
_COMMON = dict(_SIZES, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)

#: family -> (config class name, kwargs)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _COMMON),
    "mistral": ("MistralConfig", _COMMON),
    "mixtral": ("MixtralConfig", dict(_COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", _COMMON),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
        ),
    ),
    "qwen3": ("Qwen3Config", _COMMON),
    "gemma": ("GemmaConfig", _COMMON),
    "gemma2": ("Gemma2Config", _COMMON),
    "gemma3": ("Gemma3TextConfig", dict(_COMMON, sliding_window=16)),
    "olmo": ("OlmoConfig", _COMMON),
    "olmo2": ("Olmo2Config", _COMMON),
    "granite": ("GraniteConfig", dict(_COMMON, residual_multiplier=0.5, embedding_multiplier=3.0)),
    "phi": ("PhiConfig", dict(_COMMON, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", _COMMON),
    "gpt2": ("GPT2Config", dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, n_inner=D_MLP)),
    "gpt_neox": ("GPTNeoXConfig", _SIZES),
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(_SIZES, use_parallel_residual=False)),
    "gptj": (
        "GPTJConfig",
        dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, rotary_dim=8, n_inner=D_MLP),
    ),
    "falcon": ("FalconConfig", _FALCON),
    "falcon_new": ("FalconConfig", dict(_FALCON, new_decoder_architecture=True, num_kv_heads=KV_HEADS)),
    "cohere": ("CohereConfig", _COMMON),
    "starcoder2": ("Starcoder2Config", _COMMON),
}


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def config_for(family: str, vocab_size: int):
    """The HF config of a tiny `family` model; ImportError naming the class if transformers lacks it."""
    import transformers

    cls_name, kwargs = FAMILIES[family]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ImportError(f"transformers {transformers.__version__} has no {cls_name}")
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = cls(vocab_size=vocab_size, **ids, **kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def unit_scale_(model: Any, seed: int = 0) -> Any:
    """Redraw every weight at unit scale (see the module docstring); norms keep their init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if module is emb:
                w.copy_(torch.randn(w.shape, generator=g))
                continue
            for name, p in module.named_parameters(recurse=False):
                if "norm" in type(module).__name__.lower() or "layernorm" in name:
                    continue
                if p.dim() >= 2:
                    fan_in = p.shape[0] if type(module).__name__ == "Conv1D" else p.shape[-1]
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
                elif name == "bias" and not isinstance(module, torch.nn.LayerNorm):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def build(family: str, vocab_size: int, seed: int = 0):
    """A tiny eval-mode `family` model in float32 with unit-scale weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(family, vocab_size), attn_implementation="eager")
    return unit_scale_(model.float().eval(), seed)


def build_or_skip(family: str, vocab_size: int, seed: int = 0):
    """`build`, or skip the test with the reason when the installed transformers lacks the family."""
    import pytest

    try:
        return build(family, vocab_size, seed)
    except ImportError as e:
        pytest.skip(str(e))


def module_of(obj: Any):
    """The modeling module a model class lives in (to reach its helper functions)."""
    return importlib.import_module(type(obj).__module__)
