"""What each hook site means, and where each Hugging Face family keeps it.

Two vocabularies (see docs/hooks.md):

- **TransformerLens sites** mean what TransformerLens means on the unprocessed
  model (`HookedTransformer.from_pretrained_no_processing`). `hook_attn_out`
  and `hook_mlp_out` are what each sublayer *adds to the residual stream*:
  after Gemma-2/3's and OLMo-2's post-sublayer norms, after Granite's
  `residual_multiplier`. So on every family
  `resid_pre + attn_out (+ ...) + mlp_out = resid_post`.
- **Raw module sites** (Activault's `models.layers.L.mlp.post`, ...,
  and `module:PATH[:input]`) are a module's output or input, unchanged.

`SITES` is the table of TransformerLens sites; `Layout` says where a family
keeps each of them (which submodule, before or after a norm, which fused
projection holds q/k/v). `layout_for(config)` picks the layout from an HF
config; an unknown family gets `None` and TransformerLens names are refused
for it (module paths still work).

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Site", "SITES", "RAW_SITES", "Layout", "layout_for", "site_axes", "known_families"]


@dataclass(frozen=True)
class Site:
    """A TransformerLens hook site: its name suffix, scope, meaning and per-token axes."""

    name: str  # the TransformerLens suffix: "hook_resid_pre", "attn.hook_z", ...
    scope: str  # "layer" (blocks.L.<name>) or "model" (<name>)
    meaning: str  # in words; {L} is the layer
    axes: tuple[str, ...]  # axes after (batch, pos)
    order: int  # position in the forward pass inside a layer


_ROWS = [
    ("hook_resid_pre", "residual stream entering block {L} (= HF hidden_states[{L}])", ("d_model",)),
    (
        "ln1.hook_normalized",
        "block {L}'s attention input: resid_pre after ln1 (the norm before attention)",
        ("d_model",),
    ),
    (
        "attn.hook_q",
        "block {L}'s queries per head (projection output, before any q-norm and rotary)",
        ("head", "d_head"),
    ),
    (
        "attn.hook_k",
        "block {L}'s keys per key-value head (projection output, before any k-norm and rotary)",
        ("kv_head", "d_head"),
    ),
    ("attn.hook_v", "block {L}'s values per key-value head", ("kv_head", "d_head")),
    (
        "attn.hook_pattern",
        "block {L}'s attention probabilities, per query position: [head, key_pos]",
        ("head", "key_pos"),
    ),
    (
        "attn.hook_z",
        "block {L}'s attention-weighted values per head, the input of the output projection",
        ("head", "d_head"),
    ),
    (
        "hook_attn_out",
        "what block {L}'s attention adds to the residual stream (after any post-attention norm "
        "and residual multiplier)",
        ("d_model",),
    ),
    ("hook_resid_mid", "residual stream between block {L}'s attention and MLP (resid_pre + attn_out)", ("d_model",)),
    (
        "hook_mlp_in",
        "the stream block {L}'s MLP reads, before ln2 (resid_mid; resid_pre in parallel blocks)",
        ("d_model",),
    ),
    ("ln2.hook_normalized", "block {L}'s MLP input: mlp_in after ln2 (the norm before the MLP)", ("d_model",)),
    ("mlp.hook_pre", "block {L}'s MLP pre-activation (the gate projection in gated MLPs)", ("d_mlp",)),
    ("mlp.hook_pre_linear", "block {L}'s gated-MLP up projection (the linear branch)", ("d_mlp",)),
    (
        "mlp.hook_post",
        "block {L}'s MLP activation, the input of its down projection (act(gate) * up when gated)",
        ("d_mlp",),
    ),
    (
        "hook_mlp_out",
        "what block {L}'s MLP adds to the residual stream (after any post-MLP norm and residual multiplier)",
        ("d_model",),
    ),
    (
        "hook_resid_post",
        "residual stream leaving block {L} (before the final norm, also for the last block)",
        ("d_model",),
    ),
]

#: TransformerLens site suffix -> Site
SITES: dict[str, Site] = {n: Site(n, "layer", m, a, i) for i, (n, m, a) in enumerate(_ROWS)}
SITES["hook_embed"] = Site(
    "hook_embed",
    "model",
    "token embeddings as they enter the residual stream (with the model's embedding scale, e.g. Gemma's sqrt(d_model))",
    ("d_model",),
    -1,
)
SITES["ln_final.hook_normalized"] = Site(
    "ln_final.hook_normalized", "model", "the final norm's output (= HF hidden_states[-1])", ("d_model",), 99
)

#: raw module sites (Activault's meaning): site -> meaning
RAW_SITES: dict[str, str] = {
    "attn.module_in": "raw input of block {L}'s self-attention module (Activault meaning)",
    "attn.module_out": "raw output of block {L}'s self-attention module (Activault meaning)",
    "mlp.module_in": "raw input of block {L}'s MLP module (Activault meaning)",
    "mlp.module_out": "raw output of block {L}'s MLP module (Activault meaning)",
    "module_out": "raw output of module {module}",
    "module_in": "raw input of module {module}",
}
_RAW_ORDER = {"attn.module_in": 1, "attn.module_out": 7, "mlp.module_in": 10, "mlp.module_out": 14}


def site_axes(site: str) -> tuple[str, ...]:
    """Per-token axes of a site's tensor (raw module sites: one `d` axis)."""
    s = SITES.get(site)
    return s.axes if s is not None else ("d",)


def site_order(site: str) -> int:
    s = SITES.get(site)
    return s.order if s is not None else _RAW_ORDER.get(site, 99)


@dataclass(frozen=True)
class Layout:
    """Where one family keeps each site, relative to a decoder layer.

    Module fields are attribute names on the layer (`attn`, `mlp`, norms) or on
    its attention/MLP module (projections). `None` means the family has no such
    module, and the sites that need it are refused with the reason.
    """

    family: str
    parallel: bool  # attention and MLP both read resid_pre
    attn: str = "self_attn"
    mlp: str = "mlp"
    ln1: str | None = "input_layernorm"
    ln2: str | None = "post_attention_layernorm"
    attn_post_norm: str | None = None  # Gemma-2/3, OLMo-2
    mlp_post_norm: str | None = None
    residual_multiplier: str | None = None  # layer attribute (Granite)
    qkv: str = "separate"  # separate | gpt2 | neox | phi3 | falcon
    q: str = "q_proj"  # the fused projection when qkv != separate
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp_kind: str = "gated"  # gated | fused_gated | plain | moe
    mlp_first: str | None = "gate_proj"  # gate (gated), the fused gate_up (fused_gated), first linear (plain)
    mlp_up: str | None = "up_proj"
    mlp_down: str | None = "down_proj"
    final_norm: str = "norm"  # attribute of the module holding the layer list
    embed_scale: str = "none"  # none | sqrt_d | multiplier
    n_heads: int = 0
    n_kv_heads: int = 0


def _int(cfg: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


_LLAMA = Layout("llama", parallel=False)
# what several families change alike (Any: mypy cannot match a dict's values to the fields they go to)
_PLAIN: dict[str, Any] = dict(mlp_kind="plain", mlp_up=None)
_MOE: dict[str, Any] = dict(mlp_kind="moe", mlp_first=None, mlp_up=None, mlp_down=None)
_POST_NORMS: dict[str, Any] = dict(
    attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm"
)
_SHARED_NORM: dict[str, Any] = dict(parallel=True, ln2="input_layernorm")  # one norm feeds attention and MLP
# GPT-2's module names, which GPT-J keeps, and its MLP's, which StarCoder2 keeps
_GPT2_NAMES: dict[str, Any] = dict(attn="attn", ln1="ln_1", final_norm="ln_f")
_GPT2_MLP: dict[str, Any] = dict(mlp_first="c_fc", mlp_down="c_proj", **_PLAIN)
# GPT-NeoX's fused query_key_value, dense output and dense_h_to_4h MLP, which Falcon keeps
_NEOX_NAMES: dict[str, Any] = dict(
    q="query_key_value", o="dense", mlp_first="dense_h_to_4h", mlp_down="dense_4h_to_h", **_PLAIN
)

# model_type -> layout (or a function of the config for families whose layout depends on it)
_FAMILIES: dict[str, Layout | Callable[[Any], Layout]] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, family="mistral"),
    "qwen2": replace(_LLAMA, family="qwen2"),
    "qwen3": replace(_LLAMA, family="qwen3"),
    "olmo": replace(_LLAMA, family="olmo"),
    "gemma": replace(_LLAMA, family="gemma", embed_scale="sqrt_d"),
    "gemma2": replace(_LLAMA, family="gemma2", ln2="pre_feedforward_layernorm", embed_scale="sqrt_d", **_POST_NORMS),
    "gemma3_text": replace(_LLAMA, family="gemma3", ln2="pre_feedforward_layernorm", **_POST_NORMS),
    "olmo2": replace(_LLAMA, family="olmo2", ln1=None, ln2=None, **_POST_NORMS),
    "granite": replace(_LLAMA, family="granite", residual_multiplier="residual_multiplier", embed_scale="multiplier"),
    "mixtral": replace(_LLAMA, family="mixtral", **_MOE),
    "qwen2_moe": replace(_LLAMA, family="qwen2_moe", **_MOE),
    "phi3": replace(
        _LLAMA, family="phi3", qkv="phi3", q="qkv_proj", mlp_kind="fused_gated", mlp_first="gate_up_proj", mlp_up=None
    ),
    "starcoder2": replace(_LLAMA, family="starcoder2", **_GPT2_MLP),
    "cohere": replace(_LLAMA, family="cohere", **_SHARED_NORM),
    "phi": replace(
        _LLAMA,
        family="phi",
        o="dense",
        mlp_first="fc1",
        mlp_down="fc2",
        final_norm="final_layernorm",
        **_SHARED_NORM,
        **_PLAIN,
    ),
    "gpt2": Layout("gpt2", parallel=False, ln2="ln_2", qkv="gpt2", q="c_attn", o="c_proj", **_GPT2_NAMES, **_GPT2_MLP),
    "gptj": Layout(
        "gptj", parallel=True, ln2="ln_1", o="out_proj", mlp_first="fc_in", mlp_down="fc_out", **_GPT2_NAMES, **_PLAIN
    ),
    "gpt_neox": lambda c: Layout(
        "gpt_neox",
        parallel=bool(getattr(c, "use_parallel_residual", True)),
        attn="attention",
        qkv="neox",
        final_norm="final_layer_norm",
        **_NEOX_NAMES,
    ),
    "falcon": lambda c: _falcon(c),
}
_FAMILIES["gemma3"] = _FAMILIES["gemma3_text"]


def _falcon(c: Any) -> Layout:
    new = bool(getattr(c, "new_decoder_architecture", False))
    n_ln = getattr(c, "num_ln_in_parallel_attn", None) or 2
    parallel = new or bool(getattr(c, "parallel_attn", True))
    if new and n_ln == 2:
        ln1, ln2 = "ln_attn", "ln_mlp"
    elif parallel:
        ln1 = ln2 = "input_layernorm"
    else:
        ln1, ln2 = "input_layernorm", "post_attention_layernorm"
    return Layout(
        "falcon",
        parallel=parallel,
        attn="self_attention",
        ln1=ln1,
        ln2=ln2,
        qkv="falcon",
        final_norm="ln_f",
        **_NEOX_NAMES,
    )


def known_families() -> list[str]:
    return sorted(_FAMILIES)


def _heads(c: Any, family: str) -> tuple[int, int]:
    n = _int(c, "num_attention_heads", "n_head", "num_heads") or 0
    if family == "falcon":
        if getattr(c, "new_decoder_architecture", False):
            return n, _int(c, "num_kv_heads") or n
        return n, 1 if getattr(c, "multi_query", True) else n
    return n, _int(c, "num_key_value_heads", "num_kv_heads") or n


def layout_for(config: Any) -> Layout | None:
    """The layout of an HF (text) config's family, or None for a family the table does not know."""
    model_type = str(getattr(config, "model_type", "") or "")
    entry = _FAMILIES.get(model_type)
    if entry is None:
        return None
    layout = entry(config) if callable(entry) else entry
    n, kv = _heads(config, layout.family)
    return replace(layout, n_heads=n, n_kv_heads=kv)
