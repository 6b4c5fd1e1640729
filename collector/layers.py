"""Hook names: the one table that turns what a config says into a site in the model.

Every spelling a user can write (TransformerLens', Activault's, the refusal
collector's `activation_layers` grammar, module paths) resolves here, and only
here, to a `HookSpec`: a *site* (see `collector/sites.py` for what each site
means) on decoder layer *L*, or a module path.

| written in a config                                   | site                      |
|-------------------------------------------------------|---------------------------|
| `blocks.L.<suffix>` for every TransformerLens suffix  | that site (`hook_resid_pre`, `attn.hook_z`, ...) |
| `hook_embed`, `ln_final.hook_normalized`              | model-level sites         |
| `residuals_L` / `mlp_L` / `attention_L`               | `hook_resid_pre` / `hook_mlp_out` / `hook_attn_out` |
| `models.layers.L.mlp.post`, `blocks.L.hook_mlp_post`  | `mlp.module_out` (raw, Activault) |
| `models.layers.L.self_attn.post`, `blocks.L.hook_attn_post` | `attn.module_out` (raw) |
| `models.layers.L.mlp.pre` / `.self_attn.pre`          | `mlp.module_in` / `attn.module_in` (raw) |
| `module:PATH` / `module:PATH:input`                   | `module_out` / `module_in` |
| `all`, `residuals_all`, `mlp_all`, `attention_all`, `residuals_A-B`, ... | expansions |

`L` may also be a range `A-B` or `*` (every layer); `model.layers.L...` is
accepted as well as `models.layers.L...`; a module path may use `*` for an
index (`module:model.layers.*.mlp.down_proj`), expanded against the model.

The directory a hook's data goes to is the name as the user wrote it;
expansions produce one name per layer (`residuals_3`, `blocks.3.attn.hook_z`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from collector.sites import RAW_SITES, SITES, site_order
from vaultsh.errors import ConfigError

__all__ = ["HookSpec", "HookRequest", "accepted_forms", "check_hook_syntax", "describe", "expand_hooks", "parse_hook"]

# --------------------------------------------------------------------------- #
# The table: (template with {L} for the layer, site)
# --------------------------------------------------------------------------- #

_TABLE: list[tuple[str, str]] = [(f"blocks.{{L}}.{s}", s) for s, site in SITES.items() if site.scope == "layer"]
_TABLE += [
    ("blocks.{L}.hook_mlp_post", "mlp.module_out"),  # Activault's shipped configs: the MLP module's output
    ("blocks.{L}.hook_attn_post", "attn.module_out"),
]
for _prefix in ("models.layers", "model.layers"):
    _TABLE += [
        (f"{_prefix}.{{L}}.mlp.post", "mlp.module_out"),
        (f"{_prefix}.{{L}}.self_attn.post", "attn.module_out"),
        (f"{_prefix}.{{L}}.mlp.pre", "mlp.module_in"),
        (f"{_prefix}.{{L}}.self_attn.pre", "attn.module_in"),
    ]
_MODEL_SITES = [s for s, site in SITES.items() if site.scope == "model"]

_LAYER_RX = r"(?P<L>\d+|\d+-\d+|\*)"
_COMPILED: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile("^" + re.escape(t).replace(re.escape("{L}"), _LAYER_RX) + "$"), site, t) for t, site in _TABLE
]

# The refusal collector's grammar: kind -> site; expansions are named `{kind}_{L}`.
_KINDS = {"residuals": "hook_resid_pre", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}
_RANGE = re.compile(r"^(?P<kind>residuals|mlp|attention)_(?P<a>\d+)-(?P<b>\d+)$")
_KIND_ONE = re.compile(r"^(?P<kind>residuals|mlp|attention)_(?P<L>\d+)$")
_KIND_ALL = re.compile(r"^(?P<kind>residuals|mlp|attention)_all$")
_MODULE = re.compile(r"^module:(?P<path>[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z0-9_]+|\*))*)(:(?P<dir>input|output))?$")


def accepted_forms() -> str:
    """A one-line summary of every accepted spelling (for error messages and --help)."""
    return (
        "blocks.N.hook_resid_pre, blocks.N.hook_attn_out, blocks.N.hook_resid_mid, blocks.N.hook_mlp_in, "
        "blocks.N.hook_mlp_out, blocks.N.hook_resid_post, blocks.N.attn.hook_q/hook_k/hook_v/hook_z/hook_pattern, "
        "blocks.N.mlp.hook_pre/hook_pre_linear/hook_post, blocks.N.ln1.hook_normalized, "
        "blocks.N.ln2.hook_normalized, hook_embed, ln_final.hook_normalized (N: a layer, A-B or *), "
        "models.layers.N.mlp.post/pre, models.layers.N.self_attn.post/pre, blocks.N.hook_mlp_post, "
        "blocks.N.hook_attn_post, module:PATH[:input], residuals_N, mlp_N, attention_N, all, residuals_all, "
        "mlp_all, attention_all, residuals_A-B, mlp_A-B, attention_A-B"
    )


@dataclass(frozen=True)
class HookSpec:
    """One capture point: `name` as written (the directory name), `site`, decoder `layer`.

    `layer` is None for model-level sites and module paths; `module` is the
    path for `module:` names (with `*` until expanded against the model).
    """

    name: str
    site: str
    layer: int | None
    module: str | None = None

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass (layer, site order inside the layer); module paths last."""
        if self.site == "hook_embed":
            return (-1, 0)
        if self.layer is None:
            return (1 << 30, site_order(self.site))
        return (self.layer, site_order(self.site))

    @property
    def is_transformerlens(self) -> bool:
        return self.site in SITES


@dataclass(frozen=True)
class HookRequest:
    """One parsed config entry, before the layer count is known.

    `layers` is (first, last) inclusive, or None for every layer; `template`
    names each expanded hook (`{L}` is the layer); a single-layer name that is
    not an expansion keeps its text.
    """

    text: str
    site: str
    layers: tuple[int, int] | None
    expansion: bool
    template: str = ""
    module: str | None = None

    def names(self, n_layers: int) -> list[HookSpec]:
        if self.module is not None:
            return [HookSpec(self.text, self.site, None, self.module)]
        if SITES.get(self.site) is not None and SITES[self.site].scope == "model":
            return [HookSpec(self.text, self.site, None)]
        if not self.expansion:
            assert self.layers is not None
            return [HookSpec(self.text, self.site, self.layers[0])]
        lo, hi = self.layers if self.layers is not None else (0, n_layers - 1)
        return [HookSpec(self.template.format(L=i), self.site, i) for i in range(lo, hi + 1)]


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
    out = [t.replace("{L}", layer) for t, _ in _TABLE] + _MODEL_SITES
    out += [f"{k}_{layer}" for k in _KINDS] + ["all", "residuals_all", "mlp_all", "attention_all"]
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


def _layers_of(token: str, field: str, text: str) -> tuple[tuple[int, int] | None, bool]:
    """(layers, expansion) of a layer token: '3', '2-5' or '*'."""
    if token == "*":
        return None, True
    if "-" in token:
        a, b = (int(x) for x in token.split("-"))
        if a > b:
            raise ConfigError(f"{field}: {text!r} is an empty range ({a} > {b}); write {b}-{a}")
        return (a, b), True
    return (int(token), int(token)), False


def parse_hook(text: Any, field: str = "hooks") -> HookRequest:
    """Parse one entry of a hook list (no layer count needed). Raises ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"{field}: {text!r} is not a hook name (hook names are strings such as 'residuals_3')")
    s = text.strip()
    if not s:
        raise ConfigError(f"{field}: an empty hook name is not allowed")
    if s == "all":
        return HookRequest(s, "hook_resid_pre", None, True, "residuals_{L}")
    if s in _MODEL_SITES:
        return HookRequest(s, s, None, False)
    if s.startswith("module:"):
        m = _MODULE.match(s)
        if not m:
            raise ConfigError(
                f"{field}: {s!r} is not a module path (write module:model.layers.3.mlp.down_proj, "
                "optionally with :input, and * for an index)"
            )
        site = "module_in" if m["dir"] == "input" else "module_out"
        return HookRequest(s, site, None, "*" in m["path"], module=m["path"])
    m = _KIND_ALL.match(s) or _RANGE.match(s) or _KIND_ONE.match(s)
    if m:
        site, template = _KINDS[m["kind"]], f"{m['kind']}_{{L}}"
        token = "*" if m.re is _KIND_ALL else m["L"] if m.re is _KIND_ONE else f"{m['a']}-{m['b']}"
        layers, expansion = _layers_of(token, field, s)
        return HookRequest(s, site, layers, expansion, template)
    for rx, site, template in _COMPILED:
        m = rx.match(s)
        if m:
            layers, expansion = _layers_of(m["L"], field, s)
            return HookRequest(s, site, layers, expansion, template)
    near = _suggest(s, _candidates_for(s))
    hint = f"; did you mean {', '.join(repr(x) for x in near)}?" if near else f" (accepted: {accepted_forms()})"
    raise ConfigError(f"{field}: {s!r} is not a known hook name{hint}")


def check_hook_syntax(names: Iterable[Any], fields: str | Mapping[str, str] | None = None) -> list[HookRequest]:
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
        lo = min(req.layers[0], last)  # type: ignore[index]
        if req.template.startswith(("residuals", "mlp", "attention")):
            kind = req.template.split("_")[0]
            return f"{kind}_{lo}-{last}" if lo < last else f"{kind}_{last}"
        return req.template.replace("{L}", f"{lo}-{last}" if lo < last else str(last))
    return req.template.replace("{L}", str(last))


def expand_hooks(names: Iterable[Any], n_layers: int, fields: str | Mapping[str, str] | None = None) -> list[HookSpec]:
    """Resolve config hook names against a model with `n_layers` decoder layers.

    Expansions (`all`, `*_all`, ranges, `*`) become one name per layer;
    duplicates — the same site and layer, however spelled — are dropped,
    keeping the first spelling and the order in which things were written.
    Unknown names and out-of-range layers raise ConfigError naming the layer
    count and the closest valid names. Module paths with `*` stay as written
    until `collector.capture.expand_module_globs` sees the model.
    """
    if n_layers < 1:
        raise ConfigError(f"the model has {n_layers} decoder layers; nothing to hook")
    reqs = check_hook_syntax(names, fields)
    out: list[HookSpec] = []
    seen: set[tuple[str, int | None, str | None]] = set()
    for req in reqs:
        if req.layers is not None and req.layers[1] >= n_layers:
            bad = req.layers[1]
            what = f"layer {bad}" if not req.expansion else f"layers up to {bad}"
            raise ConfigError(
                f"{_label(fields, req.text)}: {req.text!r} names {what} but the model has "
                f"{n_layers} layers (0-{n_layers - 1}); closest valid: {_closest_in_range(req, n_layers)}"
            )
        for spec in req.names(n_layers):
            key = (spec.site, spec.layer, spec.module)
            if key in seen:
                continue
            seen.add(key)
            out.append(spec)
    return out


def describe(spec: HookSpec) -> dict[str, Any]:
    """What a hook means, for `{hook}/metadata.json` (the capture adds family, module and shape)."""
    site = SITES.get(spec.site)
    words = site.meaning if site is not None else RAW_SITES[spec.site]
    out: dict[str, Any] = {
        "hook": spec.name,
        "site": spec.site,
        "layer": spec.layer,
        "vocabulary": "transformerlens" if site is not None else "module",
        "description": words.format(L=spec.layer, module=spec.module),
    }
    if spec.module is not None:
        out["module"] = spec.module
    return out
