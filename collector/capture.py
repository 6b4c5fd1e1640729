"""Capture hook sites during a forward pass, each exactly as its name means.

`resolve_probes(model, specs)` turns each `HookSpec` into a `Probe`: the
module to hook, whether its input or output, and how to turn what the hook
sees into the site's tensor (split a fused q/k/v projection into heads, apply
Granite's residual multiplier, take attention probabilities from the
attention module's second output). Where a family keeps a site is the
`Layout` of `collector/sites.py`; a site the family does not have is a
ConfigError that says why.

`ActivationCapture` registers the probes and, by default, stops the forward
pass as soon as every requested tensor has been captured, so deeper layers,
the final norm and the LM head never run. Every captured tensor is a copy
made at the hook: some blocks change a sublayer's output in place afterwards
(Falcon adds the attention output into the MLP's output tensor).

`self_check(model, specs, inputs)` runs the residual identity of the family's
block layout on a few sequences and says how far off it is.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collector.config import text_config
from collector.layers import HookSpec, describe
from collector.sites import Layout, known_families, layout_for, site_axes
from vaultsh.errors import ConfigError, UserError

if TYPE_CHECKING:  # torch is imported lazily: `vaultsh s3` must start fast
    import torch

__all__ = [
    "ActivationCapture",
    "Probe",
    "SelfCheckError",
    "expand_module_globs",
    "hook_description",
    "per_token_shape",
    "meta_model",
    "shapes_on_meta",
    "find_decoder_layers",
    "model_layout",
    "resolve_probes",
    "self_check",
]

# --------------------------------------------------------------------------- #
# Finding things in a model
# --------------------------------------------------------------------------- #

_LAYER_PATHS = [
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi, OLMo, Granite, Cohere, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava, Mistral3) in transformers 5
    "language_model.model.layers",  # older multimodal wrappers
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.blocks",  # MPT
    "model.transformer.h",
    "layers",  # a bare base model (LlamaModel)
    "decoder.layers",
    "h",
]

_SUBMODULES = {
    "attn": ("self_attn", "attn", "attention", "self_attention", "mixer"),
    "mlp": ("mlp", "feed_forward", "block_sparse_moe", "ffn", "mlp_block"),
}


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _text_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    return text_config(cfg) if cfg is not None else None


def layers_path(model: Any) -> str:
    """The attribute path of the decoder layers' ModuleList (e.g. 'model.layers')."""
    import torch

    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return path
    # Fallback: the one ModuleList whose length is the config's layer count.
    text = _text_config(model)
    n = (getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)) if text is not None else None
    if n:
        found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
        if len(found) == 1:
            return found[0]
    raise ConfigError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        + ", ".join(_LAYER_PATHS)
        + "; this architecture is not supported yet (module: paths name any module)"
    )


def find_decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers of a HF causal LM (common layouts)."""
    return model.get_submodule(layers_path(model))


def model_layout(model: Any) -> Layout | None:
    """The block layout of `model`'s family (None when the table does not know it)."""
    text = _text_config(model)
    return layout_for(text) if text is not None else None


def _raw_submodule(layer: Any, kind: str, layout: Layout | None) -> tuple[str, Any]:
    names = ((layout.attn if kind == "attn" else layout.mlp),) if layout is not None else _SUBMODULES[kind]
    for attr in names:
        m = getattr(layer, attr, None)
        if m is not None and hasattr(m, "register_forward_hook"):
            return attr, m
    raise ConfigError(
        f"{type(layer).__name__} has no {'self-attention' if kind == 'attn' else 'MLP'} submodule "
        f"(looked for {', '.join(names)}); use a module: path for this architecture"
    )


def _closest_modules(model: Any, path: str, n: int = 3) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", path)
    got = difflib.get_close_matches(path, names, n=n, cutoff=0.5)
    if not got:
        got = [nm for nm in names if re.sub(r"\.\d+(?=\.|$)", ".*", nm) == generic][:n]
    return got or names[:n]


def expand_module_globs(model: Any, specs: Iterable[HookSpec]) -> list[HookSpec]:
    """Expand `*` in module paths against `model`'s modules; a path matching nothing is a ConfigError."""
    out: list[HookSpec] = []
    names = None
    for spec in specs:
        if spec.module is None or "*" not in spec.module:
            out.append(spec)
            continue
        if names is None:
            names = [name for name, _ in model.named_modules() if name]
        rx = re.compile("^" + re.escape(spec.module).replace(r"\*", r"\d+") + "$")
        hits = [nm for nm in names if rx.match(nm)]
        if not hits:
            near = ", ".join(_closest_modules(model, spec.module.replace("*", "0")))
            raise ConfigError(f"hooks: {spec.name!r} matches no module of {type(model).__name__}; closest: {near}")
        suffix = ":input" if spec.site == "module_in" else ""
        out += [HookSpec(f"module:{nm}{suffix}", spec.site, None, nm) for nm in sorted(hits, key=_natural)]
    return out


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- #
# Probes: where each site is, and how to read it
# --------------------------------------------------------------------------- #


@dataclass
class Probe:
    """How to capture one hook: a module's input or output, then `take` (None: the tensor as it is)."""

    spec: HookSpec
    module: Any
    module_path: str
    direction: str  # "in" | "out"
    take: Callable[[Any], Any] | None = None  # what the hook sees -> the site's [B, T, W] tensor
    output_index: int = 0  # which element of a tuple output (1: attention probabilities)
    heads: int | None = None  # per-head sites: the number of heads the width splits into
    family: str | None = None
    axes: tuple[str, ...] = field(default_factory=tuple)


class _Resolver:
    def __init__(self, model: Any):
        self.model = model
        self.path = layers_path(model)
        self.layers = model.get_submodule(self.path)
        self.layout = model_layout(model)
        self.config = _text_config(model)

    # -- helpers ---------------------------------------------------------------
    def _need_layout(self, spec: HookSpec) -> Layout:
        if self.layout is None:
            mt = getattr(self.config, "model_type", type(self.model).__name__)
            example = f"module:{self.path}.{spec.layer if spec.layer is not None else 0}"
            raise ConfigError(
                f"hooks: {spec.name!r} is a TransformerLens name, but vaultsh does not know the block layout of "
                f"model type {mt!r} (known: {', '.join(known_families())}), so it cannot guarantee its meaning; "
                f"use module: paths instead (e.g. {example} for a block's output)"
            )
        return self.layout

    def _refuse(self, spec: HookSpec, why: str) -> ConfigError:
        return ConfigError(f"hooks: {spec.name!r} is not available for {self.layout.family}: {why}")  # type: ignore[union-attr]

    def _sub(self, spec: HookSpec, parent: Any, parent_path: str, attr: str | None, what: str) -> tuple[Any, str]:
        m = getattr(parent, attr, None) if attr else None
        if m is None or not hasattr(m, "register_forward_hook"):
            raise self._refuse(spec, f"its blocks have no {what}")
        return m, f"{parent_path}.{attr}"

    def probe(self, spec: HookSpec) -> Probe:
        if spec.module is not None:
            return self._module_probe(spec)
        if spec.site == "hook_embed":
            return self._embed_probe(spec)
        if spec.site == "ln_final.hook_normalized":
            lo = self._need_layout(spec)
            parent_path = self.path.rsplit(".", 1)[0] if "." in self.path else ""
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            m, p = self._sub(spec, parent, parent_path, lo.final_norm, "final norm")
            return Probe(spec, m, p.lstrip("."), "out", family=lo.family, axes=site_axes(spec.site))
        assert spec.layer is not None
        n = len(self.layers)
        if not 0 <= spec.layer < n:
            raise ConfigError(f"hook {spec.name!r} names layer {spec.layer} but the model has {n} layers (0-{n - 1})")
        layer = self.layers[spec.layer]
        lpath = f"{self.path}.{spec.layer}"
        if spec.site.endswith(".module_in") or spec.site.endswith(".module_out"):
            kind = spec.site.split(".")[0]
            attr, m = _raw_submodule(layer, kind, self.layout)
            direction = "in" if spec.site.endswith("_in") else "out"
            fam = self.layout.family if self.layout else None
            return Probe(spec, m, f"{lpath}.{attr}", direction, family=fam, axes=("d",))
        lo = self._need_layout(spec)
        probe = self._layer_probe(spec, lo, layer, lpath)
        probe.family, probe.axes = lo.family, site_axes(spec.site)
        return probe

    def _module_probe(self, spec: HookSpec) -> Probe:
        path = spec.module or ""
        try:
            m = self.model.get_submodule(path)
        except AttributeError:
            near = ", ".join(_closest_modules(self.model, path))
            raise ConfigError(
                f"hooks: {spec.name!r} names no module of {type(self.model).__name__}; closest: {near}"
            ) from None
        return Probe(
            spec,
            m,
            path,
            "in" if spec.site == "module_in" else "out",
            family=self.layout.family if self.layout else None,
            axes=("d",),
        )

    def _embed_probe(self, spec: HookSpec) -> Probe:
        lo = self._need_layout(spec)
        emb = self.model.get_input_embeddings()
        path = next((name for name, mod in self.model.named_modules() if mod is emb), "embed")
        take = None
        if lo.embed_scale == "sqrt_d" and not hasattr(emb, "embed_scale"):  # newer transformers scale in the module
            d = emb.weight.shape[-1]
            take = _scale_by(lambda t: math.sqrt(d), as_tensor=True)
        elif lo.embed_scale == "multiplier":
            mult = float(getattr(self.config, "embedding_multiplier", 1.0))
            take = _scale_by(lambda t: mult)
        return Probe(spec, emb, path, "out", take, family=lo.family, axes=site_axes(spec.site))

    def _layer_probe(self, spec: HookSpec, lo: Layout, layer: Any, lpath: str) -> Probe:
        site = spec.site
        sub = lambda attr, what: self._sub(spec, layer, lpath, attr, what)  # noqa: E731
        if site == "hook_resid_pre":
            return Probe(spec, layer, lpath, "in")
        if site == "hook_resid_post":
            return Probe(spec, layer, lpath, "out")
        if site in ("ln1.hook_normalized", "ln2.hook_normalized"):
            attr = lo.ln1 if site.startswith("ln1") else lo.ln2
            if attr is None:
                raise self._refuse(
                    spec,
                    f"its blocks have no norm before the {'attention' if site.startswith('ln1') else 'MLP'} "
                    "(they normalize each sublayer's output instead)",
                )
            return Probe(spec, *sub(attr, "norm"), "out")
        if site in ("hook_attn_out", "hook_mlp_out"):
            is_attn = site == "hook_attn_out"
            post = lo.attn_post_norm if is_attn else lo.mlp_post_norm
            m, p = sub(post, "post-sublayer norm") if post else sub(lo.attn if is_attn else lo.mlp, "sublayer")
            take = None
            if lo.residual_multiplier:
                mult = float(getattr(layer, lo.residual_multiplier))
                take = _scale_by(lambda t: mult)
            return Probe(spec, m, p, "out", take)
        if site in ("hook_resid_mid", "hook_mlp_in"):
            if site == "hook_resid_mid" and lo.parallel:
                raise self._refuse(
                    spec,
                    "its blocks are parallel (attention and MLP both read hook_resid_pre and "
                    "hook_resid_post = resid_pre + attn_out + mlp_out), so there is no stream "
                    "between the sublayers; use hook_resid_pre or hook_mlp_in",
                )
            if lo.ln2:
                return Probe(spec, *sub(lo.ln2, "norm"), "in")
            return Probe(spec, *sub(lo.mlp, "MLP"), "in")
        if site.startswith("attn."):
            return self._attn_probe(spec, lo, *sub(lo.attn, "self-attention"))
        if site.startswith("mlp."):
            return self._mlp_probe(spec, lo, *sub(lo.mlp, "MLP"))
        raise ValueError(f"unknown site {site!r}")

    def _attn_probe(self, spec: HookSpec, lo: Layout, attn: Any, apath: str) -> Probe:
        site = spec.site
        H, KV = lo.n_heads, lo.n_kv_heads
        if site == "attn.hook_z":
            o, p = self._sub(spec, attn, apath, lo.o, "attention output projection")
            return Probe(spec, o, p, "in", heads=H)
        if site == "attn.hook_pattern":
            return Probe(spec, attn, apath, "out", _pattern_rows, output_index=1, heads=H)
        which = site[-1]  # q, k or v
        heads = H if which == "q" else KV
        if lo.qkv == "separate":
            proj, p = self._sub(spec, attn, apath, getattr(lo, which), f"{which} projection")
            return Probe(spec, proj, p, "out", heads=heads)
        fused, p = self._sub(spec, attn, apath, lo.q, "fused qkv projection")
        head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
        take = _split_qkv(lo.qkv, "qkv".index(which), H, KV, head_dim)
        return Probe(spec, fused, p, "out", take, heads=heads)

    def _mlp_probe(self, spec: HookSpec, lo: Layout, mlp: Any, mpath: str) -> Probe:
        site = spec.site
        if lo.mlp_kind == "moe":
            raise self._refuse(
                spec,
                "its MLP is a mixture of experts, whose internals are per expert; use module: "
                f"paths (e.g. module:{mpath}.experts)",
            )
        if site == "mlp.hook_post":
            return Probe(spec, *self._sub(spec, mlp, mpath, lo.mlp_down, "MLP down projection"), "in")
        if site == "mlp.hook_pre_linear" and lo.mlp_kind == "plain":
            raise self._refuse(spec, "its MLP is not gated (no linear branch): use mlp.hook_pre and mlp.hook_post")
        if lo.mlp_kind == "fused_gated":
            m, p = self._sub(spec, mlp, mpath, lo.mlp_first, "fused gate/up projection")
            half = 0 if site == "mlp.hook_pre" else 1
            return Probe(spec, m, p, "out", lambda t: t.chunk(2, dim=-1)[half].contiguous())
        attr = lo.mlp_first if site == "mlp.hook_pre" else lo.mlp_up
        return Probe(spec, *self._sub(spec, mlp, mpath, attr, "MLP projection"), "out")


def _scale_by(factor: Callable[[Any], float], as_tensor: bool = False) -> Callable[[Any], Any]:
    """Multiply as the model does: by a Python float, or by a tensor of the activation's dtype (Gemma)."""

    def take(t: Any) -> Any:
        import torch

        f = factor(t)
        return t * (torch.tensor(f, dtype=t.dtype, device=t.device) if as_tensor else f)

    return take


def _pattern_rows(w: Any) -> Any:
    """[B, H, T, S] attention probabilities -> [B, T, H*S]: one row per query position."""
    if w is None:
        raise UserError("attn.hook_pattern: the attention module returned no probabilities (it needs eager attention)")
    b, h, t, s = w.shape
    return w.permute(0, 2, 1, 3).reshape(b, t, h * s)


def _split_qkv(kind: str, which: int, n_heads: int, n_kv: int, head_dim: int | None) -> Callable[[Any], Any]:
    """q, k or v (which = 0, 1, 2) out of a fused projection's output, as [B, T, heads * d_head]."""

    def take(t: Any) -> Any:
        b, s, w = t.shape
        if kind == "gpt2":  # [q | k | v], each d_model wide
            out = t.split(w // 3, dim=-1)[which]
        elif kind == "neox":  # per head: [q | k | v] of d_head each
            out = t.view(b, s, n_heads, 3, w // (3 * n_heads))[:, :, :, which]
        elif kind == "phi3":  # [q (H heads) | k (KV heads) | v (KV heads)]
            d = head_dim or w // (n_heads + 2 * n_kv)
            out = t.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)[which]
        elif kind == "falcon":
            d = head_dim or w // (n_heads + 2 * n_kv)
            if n_kv == n_heads and w == 3 * n_heads * d:  # per head: q, k, v interleaved
                out = t.view(b, s, n_heads, 3, d)[:, :, :, which]
            elif n_kv == 1:  # multi-query: H query heads, then one key and one value head
                out = t.view(b, s, n_heads + 2, d).split([n_heads, 1, 1], dim=-2)[which]
            else:  # grouped: per kv group, its queries, then its key and its value
                g = t.view(b, s, n_kv, n_heads // n_kv + 2, d)
                out = (g[..., :-2, :], g[..., -2:-1, :], g[..., -1:, :])[which]
        else:
            raise ValueError(f"unknown fused qkv layout {kind!r}")
        return out.reshape(b, s, -1).contiguous()

    return take


def resolve_probes(model: Any, specs: Iterable[HookSpec]) -> list[Probe]:
    """One Probe per spec; ConfigError for a site the model's family cannot provide."""
    r = _Resolver(model)
    return [r.probe(s) for s in specs]


# --------------------------------------------------------------------------- #
# Capture
# --------------------------------------------------------------------------- #


class StopForward(BaseException):
    """Raised by a hook once every requested tensor is captured; caught by
    `ActivationCapture.run`. A BaseException so model code that catches
    `Exception` cannot swallow it."""


def _first_tensor(args: tuple, kwargs: dict, key: str = "hidden_states") -> Any:
    import torch

    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if key in kwargs and isinstance(kwargs[key], torch.Tensor):
        return kwargs[key]
    for v in kwargs.values():  # other spellings (x=, input=, hidden_state=)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    for v in args:
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError("hook saw no tensor input")


def _output_tensor(output: Any, index: int = 0) -> Any:
    import torch

    if isinstance(output, torch.Tensor) and index == 0:
        return output
    if isinstance(output, (tuple, list)) and len(output) > index:
        return output[index]
    for attr in ("last_hidden_state", "hidden_states"):
        v = getattr(output, attr, None)
        if isinstance(v, torch.Tensor) and index == 0:
            return v
    raise RuntimeError(f"hook saw an output of type {type(output).__name__}, not a tensor")


def _accepts_kwarg(model: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _use_eager_attention(model: Any) -> None:
    """Attention probabilities exist only in the eager implementation (SDPA/flash never form them)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", "eager") == "eager":
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        cfg._attn_implementation = "eager"


class ActivationCapture:
    """Capture hook sites during a forward pass.

    ```python
    with ActivationCapture(model, specs) as cap:
        outs = cap.run(input_ids=ids, attention_mask=mask)   # {name: [B, T, W] tensor}
    ```

    With `stop_after_deepest=True` (default), the hook that captures the last
    missing tensor raises a private `StopForward`, which `run` catches: deeper
    layers, the final norm and the LM head do no work. Call the model through
    `run` (calling it directly inside the block would let `StopForward` escape).
    Per-head sites come flat (`[B, T, heads * d_head]`); `probes` say how to
    view them. Tensors are detached copies. Hooks are removed on exit.
    """

    def __init__(self, model: Any, specs: Iterable[HookSpec], stop_after_deepest: bool = True):
        self.model = model
        self.specs = list(specs)
        if not self.specs:
            raise ValueError("ActivationCapture needs at least one HookSpec")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate hook names: {names}")
        self.stop_after_deepest = stop_after_deepest
        self.outputs: dict[str, Any] = {}
        self.probes: list[Probe] = []
        self._handles: list[Any] = []
        self.stopped = False

    # -- hook factories ----------------------------------------------------
    def _store(self, probe: Probe, tensor: Any) -> None:
        t = tensor.detach()
        if probe.take is not None:
            t = probe.take(t)
        else:
            t = t.clone()  # the block may change it in place after the hook (Falcon's MLP output)
        self.outputs[probe.spec.name] = t
        if self.stop_after_deepest and len(self.outputs) == len(self.specs):
            self.stopped = True
            raise StopForward()

    def _hook(self, probe: Probe):
        if probe.direction == "in":

            def pre_hook(module, args, kwargs):
                self._store(probe, _first_tensor(args, kwargs))
                return None

            return pre_hook

        def hook(module, args, output):
            self._store(probe, _output_tensor(output, probe.output_index))
            return None

        return hook

    # -- lifecycle ---------------------------------------------------------
    def resolve(self) -> ActivationCapture:
        """Find every site in the model (ConfigError for one the family lacks); attach() does it too."""
        if not self.probes:
            self.probes = resolve_probes(self.model, self.specs)
            if any(p.spec.site == "attn.hook_pattern" for p in self.probes):
                _use_eager_attention(self.model)
        return self

    def attach(self) -> ActivationCapture:
        if self._handles:
            return self
        try:
            self.resolve()
            for probe in self.probes:
                if probe.direction == "in":
                    h = probe.module.register_forward_pre_hook(self._hook(probe), with_kwargs=True)
                else:
                    h = probe.module.register_forward_hook(self._hook(probe))
                self._handles.append(h)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationCapture:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def run(self, **model_inputs: Any) -> dict[str, Any]:
        """Run the model on `model_inputs`; return {hook name: tensor}.

        `use_cache` defaults to False (no KV cache is built). Raises
        RuntimeError if a requested hook never fired.
        """
        import torch

        if not self._handles:
            raise RuntimeError("ActivationCapture.run() outside its `with` block (hooks are not attached)")
        self.outputs = {}
        self.stopped = False
        if "use_cache" not in model_inputs and _accepts_kwarg(self.model, "use_cache"):
            model_inputs["use_cache"] = False  # no KV cache: nothing will be generated
        try:
            with torch.no_grad():
                self.model(**model_inputs)
        except StopForward:
            pass
        missing = [s.name for s in self.specs if s.name not in self.outputs]
        if missing:
            raise RuntimeError(f"hooks never fired during the forward pass: {', '.join(missing)}")
        return dict(self.outputs)


def per_token_shape(probe: Probe, width: int) -> list[int]:
    """The sizes of a probe's per-token axes, given its flat width ([heads, d_head] for per-head sites)."""
    return [probe.heads, width // probe.heads] if probe.heads and len(probe.axes) == 2 else [width]


def hook_description(probe: Probe, width: int) -> dict[str, Any]:
    """What a resolved hook means and how its flat `[N, T, width]` states are shaped, for metadata.json."""
    out = describe(probe.spec)
    out.update(
        family=probe.family,
        module=probe.module_path,
        axes=["batch", "pos", *probe.axes],
        per_token_shape=per_token_shape(probe, width),
    )
    return out


def meta_model(config: Any) -> Any:
    """`config`'s model on the meta device: its modules and shapes, no weights, no memory (bf16: MoE kernels
    only run on meta in a 16-bit dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # eager attention: SDPA's mask code reads mask values, which meta tensors lack
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager").eval()


def shapes_on_meta(model: Any, specs: Iterable[HookSpec], seq_len: int = 4) -> list[tuple[Probe, int]]:
    """(probe, flat width) of every spec, from a forward pass on the meta device (no compute, seconds)."""
    import torch

    specs = expand_module_globs(model, specs)
    ids = torch.zeros((1, seq_len), dtype=torch.long, device="meta")
    with ActivationCapture(model, specs) as cap:  # an explicit mask: without one, HF inspects values
        out = cap.run(input_ids=ids, attention_mask=torch.ones_like(ids))
    return [(p, int(out[p.spec.name].shape[-1])) for p in cap.probes]


# --------------------------------------------------------------------------- #
# The self-check
# --------------------------------------------------------------------------- #


class SelfCheckError(UserError):
    """The residual identity failed: the table's meaning does not hold for this model."""


_HALF_TOL, _FULL_TOL = 2e-2, 1e-3


def _rel(a: Any, b: Any) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def self_check(model: Any, specs: Iterable[HookSpec], inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Check the residual identity on the layers `specs` name with TransformerLens sites.

    Sequential blocks: resid_pre + attn_out = resid_mid and resid_mid + mlp_out
    = resid_post; parallel blocks: resid_pre + attn_out + mlp_out = resid_post;
    with `hook_embed`, embed = resid_pre of block 0 (families without learned
    position embeddings). Returns the report written into metadata.json (None
    when no TransformerLens site is asked for); raises SelfCheckError when an
    error exceeds the tolerance of the model's dtype.
    """
    import torch

    specs = [s for s in specs if s.is_transformerlens]
    if not specs:
        return None
    layout = model_layout(model)
    if layout is None:
        _Resolver(model)._need_layout(specs[0])
    assert layout is not None
    n = len(find_decoder_layers(model))
    layers = sorted({s.layer for s in specs if s.layer is not None} | ({0} if _checks_embed(specs, layout) else set()))
    if not layers:
        layers = [n - 1]
    names = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
    if not layout.parallel:
        names.append("hook_resid_mid")
    side = [HookSpec(f"check.{L}.{s}", s, L) for L in layers for s in names]
    if _checks_embed(specs, layout):
        side.append(HookSpec("check.embed", "hook_embed", None))
    with ActivationCapture(model, side) as cap, torch.inference_mode():
        got = cap.run(**inputs)
    dtype = next((t.dtype for t in got.values()), torch.float32)
    tol = _HALF_TOL if dtype in (torch.float16, torch.bfloat16) else _FULL_TOL
    worst: tuple[float, str, Any] = (0.0, "", None)
    for L in layers:
        g = {s: got[f"check.{L}.{s}"].float() for s in names}
        if layout.parallel:
            checks = [
                (
                    "hook_resid_pre + hook_attn_out + hook_mlp_out = hook_resid_post",
                    g["hook_resid_pre"] + g["hook_attn_out"] + g["hook_mlp_out"],
                    g["hook_resid_post"],
                )
            ]
        else:
            checks = [
                (
                    "hook_resid_pre + hook_attn_out = hook_resid_mid",
                    g["hook_resid_pre"] + g["hook_attn_out"],
                    g["hook_resid_mid"],
                ),
                (
                    "hook_resid_mid + hook_mlp_out = hook_resid_post",
                    g["hook_resid_mid"] + g["hook_mlp_out"],
                    g["hook_resid_post"],
                ),
            ]
        for text, lhs, rhs in checks:
            e = _rel(lhs, rhs)
            if not e <= worst[0]:
                worst = (e, text, L)
    if "check.embed" in got:
        e = _rel(got["check.embed"], got["check.0.hook_resid_pre"])
        if not e <= worst[0]:
            worst = (e, "hook_embed = blocks.0.hook_resid_pre", None)
    identity = (
        "hook_resid_pre + hook_attn_out + hook_mlp_out = hook_resid_post"
        if layout.parallel
        else "hook_resid_pre + hook_attn_out + hook_mlp_out = hook_resid_post (via hook_resid_mid)"
    )
    report = {
        "family": layout.family,
        "block": "parallel" if layout.parallel else "sequential",
        "identity": identity,
        "layers": layers,
        "max_rel_error": worst[0],
        "tolerance": tol,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if not worst[0] <= tol:  # also catches NaN
        where = f"layer {worst[2]}" if worst[2] is not None else "the embedding"
        raise SelfCheckError(
            f"hook self-check failed on {layout.family} {where}: {worst[1]} is off by a relative error of "
            f"{worst[0]:.3g} (tolerance {tol:g}), so vaultsh's table does not match this model and nothing is stored "
            "under TransformerLens names; use module: paths, and report the model type"
        )
    return report


def _checks_embed(specs: list[HookSpec], layout: Layout) -> bool:
    return layout.family != "gpt2" and any(s.site == "hook_embed" for s in specs)
