"""`vaultsh hooks MODEL_OR_CONFIG`: every hook point of a model, with its shape, dtype and bytes per token.

Offline and without weights: the model is built on the meta device from its
config and run once there, so each shape is the one the collector will store
(seconds, even for a 70B config). Sites the family does not have are left out
(`--json` lists them with the reason).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from vaultsh import dtypes


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="a model directory, .gguf file, pkg:PACKAGE/FILE.gguf, cached hub id, or a collection YAML",
    )
    p.add_argument(
        "--filter", default=None, metavar="GLOB", help="only names matching this glob (e.g. 'blocks.3.*', '*hook_z')"
    )
    p.add_argument("--modules", action="store_true", help="also list every module as module:PATH (its output)")
    p.add_argument(
        "--seq-length",
        type=int,
        default=None,
        metavar="T",
        help="sequence length for attn.hook_pattern's width (default: the config's, else 1024)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(dtypes.FLOAT_NAMES),
        help="storage dtype for bytes per token (default: the config's, else the model's)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def _model_and_defaults(arg: str) -> tuple[Any, int | None, str | None]:
    """(ModelConfig, seq_length, storage dtype) from a collection YAML or a bare model name."""
    from collector.config import ModelConfig, load_config

    if arg.endswith((".yaml", ".yml")) and Path(arg).is_file():
        cfg = load_config(arg)
        dtype = cfg.storage.dtype or (None if cfg.model.dtype == "auto" else cfg.model.dtype)
        return cfg.model, cfg.data.seq_length, dtype
    return ModelConfig(name=arg), None, None


def list_hooks(
    arg: str,
    *,
    seq_length: int | None = None,
    dtype: str | None = None,
    modules: bool = False,
    pattern: str | None = None,
) -> dict[str, Any]:
    """Every hook point of the model `arg` names: {model, family, n_layers, dtype, seq_length, hooks, refused}."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from collector.capture import layers_path, meta_model, model_layout, per_token_shape, resolve_probes, shapes_on_meta
    from collector.layers import HookSpec
    from collector.sites import SITES
    from vaultsh.errors import ConfigError
    from vaultsh.plan.model import read_hf_config

    model_cfg, cfg_T, cfg_dtype = _model_and_defaults(arg)
    config = read_hf_config(model_cfg)
    config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    model = meta_model(config)  # (sets the config's dtype to the meta model's)
    layout = model_layout(model)
    n = len(model.get_submodule(layers_path(model)))
    T = seq_length or cfg_T or 1024
    stored = dtype or cfg_dtype or str(config_dtype or "float32").replace("torch.", "")
    itemsize = dtypes.itemsize(stored) if stored in dtypes.FLOAT_NAMES else 4
    specs = [HookSpec("hook_embed", "hook_embed", None)]
    specs += [HookSpec(f"blocks.{L}.{s}", s, L) for L in range(n) for s, site in SITES.items() if site.scope == "layer"]
    specs.append(HookSpec("ln_final.hook_normalized", "ln_final.hook_normalized", None))
    if modules:
        specs += [HookSpec(f"module:{name}", "module_out", None, name) for name, _ in model.named_modules() if name]
    if pattern:
        specs = [s for s in specs if fnmatch.fnmatchcase(s.name, pattern)]
    ok, refused = [], {}
    for spec in specs:
        try:
            resolve_probes(model, [spec])
            ok.append(spec)
        except ConfigError as e:
            refused[spec.name] = str(e).removeprefix(f"hooks: {spec.name!r} ")
    rows = []
    for probe, width in shapes_on_meta(model, ok, T) if ok else []:
        rows.append(
            {
                "name": probe.spec.name,
                "site": probe.spec.site,
                "module": probe.module_path,
                "axes": list(probe.axes),
                "shape": per_token_shape(probe, width),
                "width": width,
                "bytes_per_token": width * itemsize,
            }
        )
    return {
        "model": model_cfg.name,
        "model_type": getattr(config, "model_type", None),
        "family": layout.family if layout else None,
        "block": (("parallel" if layout.parallel else "sequential") if layout else None),
        "n_layers": n,
        "dtype": stored,
        "seq_length": T,
        "hooks": rows,
        "refused": refused,
    }


def run(args) -> int:
    from vaultsh.errors import UserError

    if args.seq_length is not None and args.seq_length < 1:
        raise UserError(f"--seq-length: {args.seq_length} is not allowed (must be >= 1)")
    got = list_hooks(
        args.model, seq_length=args.seq_length, dtype=args.dtype, modules=args.modules, pattern=args.filter
    )
    if args.json:
        print(json.dumps(got, indent=2))
        return 0
    if not got["hooks"]:
        raise UserError(
            f"no hook of {got['model']} matches {args.filter!r}"
            if args.filter
            else f"{got['model']}: no hook points found"
        )
    fam = f"{got['family']} ({got['block']} blocks)" if got["family"] else "unknown family: module paths only"
    print(
        f"{got['model']}: {got['model_type']}, {got['n_layers']} layers, {fam}; "
        f"{got['dtype']}, attn.hook_pattern at seq length {got['seq_length']}"
    )
    lines = [("hook", "shape per token", "bytes/token", "module")]
    for r in got["hooks"]:
        shape = " x ".join(f"{ax} {n}" for ax, n in zip(r["axes"], r["shape"]))
        lines.append((r["name"], shape, f"{r['bytes_per_token']:,}", r["module"]))
    w = [max(len(line[i]) for line in lines) for i in range(3)]
    for name, shape, nbytes, module in lines:  # plain columns, never truncated (like `aws s3 ls`)
        print(f"{name:<{w[0]}}  {shape:<{w[1]}}  {nbytes:>{w[2]}}  {module}")
    if got["refused"]:
        sites = sorted({k.split(".", 2)[-1] if k.startswith("blocks.") else k for k in got["refused"]})
        print(f"not available for this family: {', '.join(sites)} (--json says why)")
    return 0
