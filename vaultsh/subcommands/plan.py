"""`vaultsh plan CONFIG`: storage, memory, time and cost of a config, before running it.

Offline and without loading weights (unless `--measure`). Prices and model
facts that cannot be read here come from the command line or from an optional
top-level `plan:` section of the config::

    plan:
      price_gb_month: 0.023     # per GB-month stored (GB = 2**30 bytes)
      price_put_1k: 0.005       # per 1000 PUT/POST/LIST requests
      price_get_1k: 0.0004      # per 1000 GET/HEAD requests
      upload_mbps: 400          # upload rate to the store, MB/s (for the bottleneck)
      devices: 4                # GPUs one worker spreads the model over
      n_layers: 32              # model facts, when the model cannot be read here
      d_model: 4096

Command-line values win over the section.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_OVERRIDE_HELP = {
    "n_layers": "decoder layers",
    "d_model": "hidden size (residual stream width)",
    "d_mlp": "MLP intermediate size",
    "n_heads": "attention heads",
    "n_kv_heads": "key/value heads (grouped-query attention)",
    "vocab_size": "vocabulary size",
    "max_context": "context length",
    "params": "total parameter count (overrides the formula)",
}
_OVERRIDES = tuple(_OVERRIDE_HELP)
_PRICES = ("price_gb_month", "price_put_1k", "price_get_1k")
_SECTION_INT = _OVERRIDES + ("devices",)
_SECTION_FLOAT = _PRICES + ("upload_mbps",)


def add_arguments(p) -> None:
    """This subcommand's arguments (vaultsh/cli.py builds the parser from it)."""
    p.add_argument("config", help="YAML config (Activault schema or ours)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--store", default=None, metavar="URI", help="override the config's storage URI")
    p.add_argument(
        "--devices", type=_pos_int, default=None, metavar="N", help="GPUs one worker spreads the model over (default 1)"
    )
    g = p.add_argument_group("time (runs the model on this machine)")
    g.add_argument("--measure", action="store_true", help="load the model and time a few real batches")
    g.add_argument("--measure-batches", type=_pos_int, default=3, metavar="N", help="batches to time (default 3)")
    g.add_argument(
        "--measure-upload",
        action="store_true",
        help="time parallel uploads of megabatch-sized probe objects to the store (deleted afterwards)",
    )
    g.add_argument(
        "--upload-mbps",
        type=_pos_float,
        default=None,
        metavar="MB/s",
        help="upload rate to the store, to find the bottleneck without --measure-upload",
    )
    c = p.add_argument_group("cost (no built-in prices: give yours)")
    c.add_argument("--price-gb-month", type=_nonneg_float, default=None, metavar="P", help="per GB-month stored")
    c.add_argument("--price-put-1k", type=_nonneg_float, default=None, metavar="P", help="per 1000 PUT/LIST requests")
    c.add_argument("--price-get-1k", type=_nonneg_float, default=None, metavar="P", help="per 1000 GET/HEAD requests")
    m = p.add_argument_group("model facts (when the model cannot be read here, e.g. a hub id not in the cache)")
    for name in _OVERRIDES:
        m.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_pos_int,
            default=None,
            metavar="N",
            help=_OVERRIDE_HELP[name],
        )


def _pos_int(text: str) -> int:
    import argparse

    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not allowed (must be >= 1)")
    return v


def _float(text: str, minimum: float, strict: bool) -> float:
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        raise argparse.ArgumentTypeError(f"{text} is not allowed (must be {'>' if strict else '>='} {minimum:g})")
    return v


def _pos_float(text: str) -> float:
    return _float(text, 0.0, strict=True)


def _nonneg_float(text: str) -> float:
    return _float(text, 0.0, strict=False)


def _check_section(section: Any, label: str) -> dict[str, Any]:
    from vaultsh.errors import ConfigError

    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(
            f"{label}: plan: must be a mapping (e.g. price_gb_month: 0.023), not {type(section).__name__}"
        )
    out: dict[str, Any] = {}
    for key, v in section.items():
        if key in _SECTION_INT:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{label}: plan.{key}: {v!r} is not allowed (a whole number >= 1)")
        elif key in _SECTION_FLOAT:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "upload_mbps" and v == 0):
                raise ConfigError(f"{label}: plan.{key}: {v!r} is not allowed (a number >= 0)")
        else:
            allowed = ", ".join(_SECTION_FLOAT + _SECTION_INT)
            raise ConfigError(f"{label}: plan.{key}: unknown key (allowed: {allowed})")
        out[key] = v
    return out


def load_config_and_section(path: str):
    """(CollectConfig, the config's `plan:` section, checked here; the collector ignores it)."""
    from collector.config import load_config

    p = Path(path).expanduser()
    data = None
    if p.is_file():
        try:
            import yaml

            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except Exception:
            data = None  # load_config reports the problem in its own words
    section = _check_section(data["plan"], path) if isinstance(data, dict) and "plan" in data else {}
    return load_config(path), section


def run(args) -> int:
    from vaultsh.plan import Prices, make_plan

    if args.store:
        os.environ["VAULTSH_STORE"] = args.store
    cfg, section = load_config_and_section(args.config)

    def pick(name: str) -> Any:
        v = getattr(args, name, None)
        return v if v is not None else section.get(name)

    overrides = {k: pick(k) for k in _OVERRIDES}
    prices = Prices(gb_month=pick("price_gb_month"), put_1k=pick("price_put_1k"), get_1k=pick("price_get_1k"))
    mbps = pick("upload_mbps")
    plan = make_plan(
        cfg,
        overrides=overrides,
        devices=pick("devices"),
        prices=prices,
        upload_bytes_per_s=mbps * 1e6 if mbps else None,
        measure=args.measure,
        measure_batches=args.measure_batches,
        measure_upload=args.measure_upload,
    )
    if args.json:
        sys.stdout.write(plan.to_json() + "\n")
        return 0
    from rich.console import Console

    Console().print(plan)
    return 0
