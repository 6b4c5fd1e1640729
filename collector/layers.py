"""Hook names: the one table that turns what a config says into a place in the model.

Every spelling a user can write (Activault's, TransformerLens', the refusal
collector's `activation_layers` grammar) resolves here, and only here, to a
`HookSpec`: a *site* on decoder layer *L*. `metadata.json` records that
resolution (see `describe`).

| written in a config                                   | site         |
|-------------------------------------------------------|--------------|
| `residuals_L`, `blocks.L.hook_resid_pre`              | `resid_pre`  |
| `blocks.L.hook_resid_post`                            | `resid_post` |
| `mlp_L`, `blocks.L.hook_mlp_out`, `models.layers.L.mlp.post`,
  `blocks.L.hook_mlp_post` (Activault's shipped configs) | `mlp_out`    |
| `attention_L`, `blocks.L.hook_attn_out`, `models.layers.L.self_attn.post`,
  `blocks.L.hook_attn_post` (Activault's shipped configs)| `attn_out`  |
| `models.layers.L.mlp.pre`                             | `mlp_in`     |
| `models.layers.L.self_attn.pre`                       | `attn_in`    |
| `all`, `residuals_all`, `mlp_all`, `attention_all`,
  `residuals_A-B`, `mlp_A-B`, `attention_A-B`           | expansions   |

(`model.layers.L...` is accepted as well as `models.layers.L...`.)

Sites, all `[batch, tokens, d_model]` tensors exactly as the model produces them:

- `resid_pre`  residual stream entering layer L (= HF `hidden_states[L]`; for
  L = 0 the embedding output). A forward pre-hook on decoder layer L.
- `resid_post` residual stream leaving layer L (decoder layer L's output; for
  L < last this is HF `hidden_states[L+1]`, for the last layer it is *not* the
  final-normed `hidden_states[-1]`). A forward hook on decoder layer L.
- `attn_out` / `mlp_out`: the self-attention / MLP module's output.
- `attn_in` / `mlp_in`: the module's input (after the layer's norm). Forward
  pre-hooks registered `with_kwargs=True`: HF passes `hidden_states=` by keyword.

The directory a hook's data goes to is the name as the user wrote it;
expansions produce the short form (`residuals_3`, `mlp_3`, `attention_3`).

`ActivationCapture` registers the hooks and, by default, stops the forward pass
as soon as every requested tensor has been captured, so deeper layers, the
final norm and the LM head never run.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from vaultsh.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily: `vaultsh s3` must start fast
    import torch

__all__ = [
    "SITES",
    "HookSpec",
    "HookRequest",
    "ActivationCapture",
    "check_hook_syntax",
    "expand_hooks",
    "find_decoder_layers",
    "submodule_for",
    "describe",
    "accepted_forms",
]

# --------------------------------------------------------------------------- #
# The table
# --------------------------------------------------------------------------- #

#: site -> human description ({L} is the layer)
SITES: dict[str, str] = {
    "resid_pre": "residual stream entering decoder layer {L} (= HF hidden_states[{L}])",
    "resid_post": "residual stream leaving decoder layer {L} (the layer's output)",
    "attn_in": "input to the self-attention module of decoder layer {L} (after its input norm)",
    "attn_out": "output of the self-attention module of decoder layer {L}",
    "mlp_in": "input to the MLP module of decoder layer {L} (after its post-attention norm)",
    "mlp_out": "output of the MLP module of decoder layer {L}",
}

# Order of the sites inside one decoder layer (for "deepest" and sorting).
_SITE_ORDER = {"resid_pre": 0, "attn_in": 1, "attn_out": 2, "mlp_in": 3, "mlp_out": 4, "resid_post": 5}

# THE table: (pattern with {L} for the layer number, site, a template for suggestions)
_L = r"(?P<L>\d+)"
_TABLE: list[tuple[str, str]] = [
    # template                               site
    ("residuals_{L}", "resid_pre"),
    ("blocks.{L}.hook_resid_pre", "resid_pre"),
    ("blocks.{L}.hook_resid_post", "resid_post"),
    ("mlp_{L}", "mlp_out"),
    ("blocks.{L}.hook_mlp_out", "mlp_out"),
    ("blocks.{L}.hook_mlp_post", "mlp_out"),  # Activault's shipped configs (meant: MLP output)
    ("models.layers.{L}.mlp.post", "mlp_out"),
    ("model.layers.{L}.mlp.post", "mlp_out"),
    ("attention_{L}", "attn_out"),
    ("blocks.{L}.hook_attn_out", "attn_out"),
    ("blocks.{L}.hook_attn_post", "attn_out"),  # Activault's shipped configs (meant: attention output)
    ("models.layers.{L}.self_attn.post", "attn_out"),
    ("model.layers.{L}.self_attn.post", "attn_out"),
    ("models.layers.{L}.mlp.pre", "mlp_in"),
    ("model.layers.{L}.mlp.pre", "mlp_in"),
    ("models.layers.{L}.self_attn.pre", "attn_in"),
    ("model.layers.{L}.self_attn.pre", "attn_in"),
]
_COMPILED: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile("^" + re.escape(t).replace(re.escape("{L}"), _L) + "$"), site, t) for t, site in _TABLE
]

# Expansion grammar (the refusal-circuit collector's): kind -> site; short names.
_KINDS = {"residuals": "resid_pre", "mlp": "mlp_out", "attention": "attn_out"}
_SHORT = {site: kind for kind, site in _KINDS.items()}
_RANGE = re.compile(r"^(?P<kind>residuals|mlp|attention)_(?P<a>\d+)-(?P<b>\d+)$")
_KIND_ALL = re.compile(r"^(?P<kind>residuals|mlp|attention)_all$")


def accepted_forms() -> str:
    """A one-line summary of every accepted spelling (for error messages and --help)."""
    singles = ", ".join(t.replace("{L}", "N") for t, _ in _TABLE if not t.startswith("model.layers"))
    return f"{singles}, all, residuals_all, mlp_all, attention_all, residuals_A-B, mlp_A-B, attention_A-B"


@dataclass(frozen=True)
class HookSpec:
    """One capture point: `name` as written (the directory name), `site`, decoder `layer`."""

    name: str
    site: str
    layer: int

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass (layer, site order inside the layer)."""
        return (self.layer, _SITE_ORDER[self.site])


@dataclass(frozen=True)
class HookRequest:
    """One parsed config entry, before the layer count is known.

    `site` is set for single-site names; `kind` for expansions. `layers` is
    (first, last) inclusive for a single layer or a range, None for `*_all`.
    """

    text: str
    site: str
    layers: tuple[int, int] | None
    expansion: bool

    def names(self, n_layers: int) -> list[HookSpec]:
        if not self.expansion:
            assert self.layers is not None
            return [HookSpec(self.text, self.site, self.layers[0])]
        lo, hi = self.layers if self.layers is not None else (0, n_layers - 1)
        short = _SHORT[self.site]
        return [HookSpec(f"{short}_{i}", self.site, i) for i in range(lo, hi + 1)]


# --------------------------------------------------------------------------- #
# Parsing and expansion
# --------------------------------------------------------------------------- #


def _label(fields: str | Mapping[str, str] | None, name: str) -> str:
    if fields is None:
        return "hooks"
    if isinstance(fields, str):
        return fields
    return fields.get(name, "hooks")


def _candidates_for(text: str) -> list[str]:
    """Valid spellings near `text` (same layer number), for 'did you mean'."""
    nums = re.findall(r"\d+", text)
    layer = nums[0] if nums else "0"
    out = [t.replace("{L}", layer) for t, _ in _TABLE]
    out += ["all", "residuals_all", "mlp_all", "attention_all"]
    if len(nums) >= 2:
        out += [f"{k}_{nums[0]}-{nums[1]}" for k in _KINDS]
    return out


def _suggest(text: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    cands = list(dict.fromkeys(candidates))
    got = difflib.get_close_matches(text, cands, n=n, cutoff=0.6)
    if not got:  # case/separator slips: compare normalised forms
        norm = re.sub(r"[^a-z0-9]", "", text.lower())
        got = [c for c in cands if re.sub(r"[^a-z0-9]", "", c.lower()) == norm][:n]
    return got


def parse_hook(text: Any, field: str = "hooks") -> HookRequest:
    """Parse one entry of a hook list (no layer count needed). Raises ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"{field}: {text!r} is not a hook name (hook names are strings such as 'residuals_3')")
    s = text.strip()
    if not s:
        raise ConfigError(f"{field}: an empty hook name is not allowed")
    if s == "all":
        return HookRequest(s, "resid_pre", None, True)
    m = _KIND_ALL.match(s)
    if m:
        return HookRequest(s, _KINDS[m["kind"]], None, True)
    m = _RANGE.match(s)
    if m:
        a, b = int(m["a"]), int(m["b"])
        if a > b:
            raise ConfigError(
                f"{field}: {s!r} is an empty range ({a} > {b}); write {m['kind']}_{b}-{a}"
            )
        return HookRequest(s, _KINDS[m["kind"]], (a, b), True)
    for rx, site, _t in _COMPILED:
        m = rx.match(s)
        if m:
            layer = int(m["L"])
            return HookRequest(s, site, (layer, layer), False)
    near = _suggest(s, _candidates_for(s))
    if near:
        hint = f"; did you mean {', '.join(repr(x) for x in near)}?"
    else:
        hint = f" (accepted: {accepted_forms()})"
    raise ConfigError(f"{field}: {s!r} is not a known hook name{hint}")


def check_hook_syntax(
    names: Iterable[Any], fields: str | Mapping[str, str] | None = None
) -> list[HookRequest]:
    """Check every entry parses, without knowing the model. Returns the parsed requests.

    `fields` names where the entries came from in the config (one label, or a
    mapping name -> label) for the error message.
    """
    names = list(names)
    if not names:
        raise ConfigError(f"{_label(fields, '')}: no hooks given (at least one is required)")
    return [parse_hook(n, _label(fields, n if isinstance(n, str) else "")) for n in names]


def _closest_in_range(req: HookRequest, n_layers: int) -> str:
    last = n_layers - 1
    if req.expansion:
        lo, hi = req.layers  # type: ignore[misc]
        lo = min(lo, last)
        kind = _SHORT[req.site]
        return f"{kind}_{lo}-{last}" if lo < last else f"{kind}_{last}"
    # same spelling, clamped layer number
    for rx, site, template in _COMPILED:
        if site == req.site and rx.match(req.text):
            return template.replace("{L}", str(last))
    return f"{_SHORT.get(req.site, req.site)}_{last}"


def expand_hooks(
    names: Iterable[Any], n_layers: int, fields: str | Mapping[str, str] | None = None
) -> list[HookSpec]:
    """Resolve config hook names against a model with `n_layers` decoder layers.

    Expansions (`all`, `*_all`, ranges) become short names; duplicates — the
    same site and layer, however spelled — are dropped, keeping the first
    spelling and the order in which things were written. Unknown names and
    out-of-range layers raise ConfigError naming the layer count and the
    closest valid names.
    """
    if n_layers < 1:
        raise ConfigError(f"the model has {n_layers} decoder layers; nothing to hook")
    reqs = check_hook_syntax(names, fields)
    out: list[HookSpec] = []
    seen: set[tuple[str, int]] = set()
    for req in reqs:
        if req.layers is not None and req.layers[1] >= n_layers:
            bad = req.layers[1]
            what = f"layer {bad}" if not req.expansion else f"layers up to {bad}"
            raise ConfigError(
                f"{_label(fields, req.text)}: {req.text!r} names {what} but the model has "
                f"{n_layers} layers (0-{n_layers - 1}); closest valid: {_closest_in_range(req, n_layers)}"
            )
        for spec in req.names(n_layers):
            key = (spec.site, spec.layer)
            if key in seen:
                continue
            seen.add(key)
            out.append(spec)
    return out


def describe(spec: HookSpec) -> dict[str, Any]:
    """What a hook means, for `{hook}/metadata.json`."""
    return {
        "hook": spec.name,
        "site": spec.site,
        "layer": spec.layer,
        "description": SITES[spec.site].format(L=spec.layer),
    }


# --------------------------------------------------------------------------- #
# Resolution to modules
# --------------------------------------------------------------------------- #

_LAYER_PATHS = [
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi3, OLMo, ...
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


def find_decoder_layers(model: Any) -> "torch.nn.ModuleList":
    """The ModuleList of decoder layers of a HF causal LM (common layouts)."""
    import torch

    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    # Fallback: the ModuleList whose length is the config's layer count.
    n = None
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if n:
        found = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) == n
        ]
        if len(found) == 1:
            return found[0][1]
    raise ConfigError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        + ", ".join(_LAYER_PATHS)
        + "; this architecture is not supported yet"
    )


def submodule_for(layer_module: Any, site: str) -> Any:
    """The module of a decoder layer that `site` hooks: the layer itself for
    resid_pre/resid_post, its self-attention for attn_*, its MLP for mlp_*."""
    if site in ("resid_pre", "resid_post"):
        return layer_module
    kind = "attn" if site.startswith("attn") else "mlp" if site.startswith("mlp") else None
    if kind is None:
        raise ValueError(f"unknown site {site!r} (known: {', '.join(SITES)})")
    for attr in _SUBMODULES[kind]:
        m = getattr(layer_module, attr, None)
        if m is not None and hasattr(m, "register_forward_hook"):
            return m
    raise ConfigError(
        f"{type(layer_module).__name__} has no {'self-attention' if kind == 'attn' else 'MLP'} "
        f"submodule (looked for {', '.join(_SUBMODULES[kind])}); site {site!r} is not available "
        "for this architecture"
    )


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


def _output_tensor(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for attr in ("last_hidden_state", "hidden_states"):
        v = getattr(output, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError(f"hook saw an output of type {type(output).__name__}, not a tensor")


def _accepts_kwarg(model: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class ActivationCapture:
    """Capture hook sites during a forward pass.

    ```python
    with ActivationCapture(model, specs) as cap:
        outs = cap.run(input_ids=ids, attention_mask=mask)   # {name: [B, T, D] tensor}
    ```

    With `stop_after_deepest=True` (default), the hook that captures the last
    missing tensor raises a private `StopForward`, which `run` catches: deeper
    layers, the final norm and the LM head do no work. Call the model through
    `run` (calling it directly inside the block would let `StopForward` escape).
    Tensors are stored detached (`clone=True` copies them too). Hooks are
    removed on exit.
    """

    def __init__(self, model: Any, specs: Iterable[HookSpec], stop_after_deepest: bool = True, clone: bool = False):
        self.model = model
        self.specs = list(specs)
        if not self.specs:
            raise ValueError("ActivationCapture needs at least one HookSpec")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate hook names: {names}")
        self.stop_after_deepest = stop_after_deepest
        self.clone = clone
        self.outputs: dict[str, Any] = {}
        self._handles: list[Any] = []
        self.stopped = False

    # -- hook factories ----------------------------------------------------
    def _store(self, name: str, tensor: Any) -> None:
        t = tensor.detach()
        self.outputs[name] = t.clone() if self.clone else t
        if self.stop_after_deepest and len(self.outputs) == len(self.specs):
            self.stopped = True
            raise StopForward()

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            self._store(name, _first_tensor(args, kwargs))
            return None

        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            self._store(name, _output_tensor(output))
            return None

        return hook

    # -- lifecycle ---------------------------------------------------------
    def attach(self) -> "ActivationCapture":
        if self._handles:
            return self
        layers = find_decoder_layers(self.model)
        n = len(layers)
        try:
            for spec in self.specs:
                if not 0 <= spec.layer < n:
                    raise ConfigError(
                        f"hook {spec.name!r} names layer {spec.layer} but the model has {n} layers (0-{n - 1})"
                    )
                module = submodule_for(layers[spec.layer], spec.site)
                if spec.site in ("resid_pre", "attn_in", "mlp_in"):
                    h = module.register_forward_pre_hook(self._pre_hook(spec.name), with_kwargs=True)
                else:
                    h = module.register_forward_hook(self._post_hook(spec.name))
                self._handles.append(h)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "ActivationCapture":
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
