"""Plan a collection run before spending on it: storage, memory, time and cost.

```python
from collector.config import load_config
from vaultsh.plan import make_plan

plan = make_plan(load_config("configs/default.yaml"))
plan.to_json()          # a JSON string (plan.to_dict() for the dict)
rich.print(plan)        # tables: hooks, storage, memory, time, cost, warnings
```

Nothing here loads weights or goes online: the model's facts come from its
config or GGUF header (`vaultsh.plan.model`), byte counts from the real
megabatch format (`vaultsh.plan.storage`). Only `measure=True` loads the model
and runs a few batches (`vaultsh.plan.measure`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vaultsh import dtypes
from vaultsh.plan.cost import CostEstimate, Prices, count_requests, estimate_cost
from vaultsh.plan.memory import MemoryEstimate, MemoryInputs, estimate_memory, parse_size
from vaultsh.plan.model import ModelShape, read_model_shape
from vaultsh.plan.storage import HookStorage, hook_storage

__all__ = [
    "Plan",
    "make_plan",
    "summary_lines",
    "Prices",
    "ModelShape",
    "HookStorage",
    "MemoryEstimate",
    "CostEstimate",
]

PLAN_VERSION = 1


@dataclass
class Plan:
    """Everything `vaultsh plan` prints. `to_dict()`/`to_json()` for scripts; `__rich__` for a console."""

    config: dict[str, Any]
    model: ModelShape
    hooks: list[dict[str, Any]]
    forward: dict[str, Any]
    storage: list[HookStorage]
    totals: dict[str, Any]
    per_worker: list[dict[str, Any]]
    memory: MemoryEstimate
    cost: CostEstimate | None = None
    time: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return self.memory.fits

    def summary(self) -> str:
        """One line for a status bar: files, bytes, memory verdict."""
        import humanize

        t, m = self.totals, self.memory
        mem = (
            "memory: no limit known"
            if m.fits is None
            else (
                "memory fits"
                if m.fits
                else f"memory DOES NOT FIT (suggested batch_size {m.suggested_batch_size})"
                if m.suggested_batch_size
                else "memory DOES NOT FIT"
            )
        )
        return (
            f"{humanize.intcomma(t['files'])} files, {humanize.naturalsize(t['bytes'], binary=True)}, "
            f"{humanize.intcomma(t['tokens'])} tokens, {len(self.hooks)} hooks; {mem}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_version": PLAN_VERSION,
            "config": self.config,
            "model": self.model.to_dict(),
            "hooks": self.hooks,
            "forward": self.forward,
            "storage": {
                "hooks": [h.to_dict() for h in self.storage],
                "totals": self.totals,
                "per_worker": self.per_worker,
            },
            "memory": self.memory.to_dict(),
            "time": self.time,
            "cost": self.cost.to_dict() if self.cost else None,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __rich__(self) -> Any:
        from vaultsh.plan.render import render_plan

        return render_plan(self)


def _resolve_dtypes(cfg: Any, shape: ModelShape, cpu: bool) -> tuple[str, str]:
    """(compute dtype, storage dtype) as the collector will use them."""
    declared = shape.config_dtype or "float32"
    compute = declared if cfg.model.dtype == "auto" else cfg.model.dtype
    if cpu and compute == "float16":
        compute = "float32"  # collector.model computes float16 in float32 on CPU
    storage = cfg.storage.dtype or cfg.model.dtype
    if storage == "auto":
        storage = compute
    return compute, storage


def _device_kind(cfg: Any) -> tuple[bool, str]:
    """(runs on CPU?, why we think so)."""
    dev = cfg.model.device
    if dev == "cpu":
        return True, "model.device is cpu"
    if dev.startswith("cuda"):
        return False, f"model.device is {dev}"
    if cfg.model.max_per_device_memory:
        return False, "device auto with max_per_device_memory: assuming GPUs"
    try:
        import torch

        if torch.cuda.is_available():
            return False, "device auto: this machine has a CUDA GPU"
    except ImportError:  # pragma: no cover
        pass
    return True, "device auto: no CUDA GPU on this machine, assuming CPU"


def _limit(cfg: Any, cpu: bool) -> tuple[int | None, str]:
    if cfg.model.max_per_device_memory:
        return parse_size(cfg.model.max_per_device_memory), f"max_per_device_memory {cfg.model.max_per_device_memory}"
    if cpu:
        import psutil

        return int(psutil.virtual_memory().total), "this machine's memory"
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory), "GPU 0's memory"
    except ImportError:  # pragma: no cover
        pass
    return None, ""


def make_plan(
    cfg: Any,
    *,
    overrides: Mapping[str, int | None] | None = None,
    devices: int | None = None,
    prices: Prices | None = None,
    upload_bytes_per_s: float | None = None,
    measure: bool = False,
    measure_batches: int = 3,
    measure_upload: bool = False,
    store: Any = None,
) -> Plan:
    """The plan of a validated `CollectConfig`; never loads weights unless `measure`.

    `overrides` supply model facts that cannot be read here (n_layers,
    d_model, d_mlp, n_heads, n_kv_heads, vocab_size, max_context, params).
    Raises ConfigError for a model it cannot read or a hook beyond the model's
    last layer (the collector's own validation).
    """
    from collector.config import ModelFacts, validate_against_model
    from collector.layers import describe

    shape = read_model_shape(cfg.model, overrides)
    facts = ModelFacts(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        max_context=shape.max_context,
        model_type=shape.model_type,
        vocab_size=shape.vocab_size,
    )
    specs = validate_against_model(cfg, facts)
    specs, widths = _sized_hooks(cfg, specs, shape.d_model)

    cpu, device_note = _device_kind(cfg)
    compute, storage_dtype = _resolve_dtypes(cfg, shape, cpu)
    B, T, D = cfg.data.batch_size, cfg.data.seq_length, shape.d_model
    bpu, k = cfg.upload.batches_per_upload, cfg.num_runs
    fmt = cfg.storage.format
    warnings: list[str] = []
    notes: list[str] = list(shape.notes)
    notes.append(device_note)

    # ---- hooks and the forward pass -------------------------------------------
    hooks = [dict(describe(s), written=s.name, width=w) for s, w in zip(specs, widths)]
    deepest = max(specs, key=lambda s: s.order)
    # model-level sites: the embedding runs no block; the final norm and module paths may need them all
    last = deepest.layer if deepest.layer is not None else -1 if deepest.site == "hook_embed" else shape.n_layers - 1
    forward = {
        "n_layers": shape.n_layers,
        "deepest_hook": deepest.name,
        "deepest_layer": last,
        "stops_at": f"{deepest.site} of layer {last}" if deepest.layer is not None else deepest.site,
        "layers_run": last + 1,
        "layers_skipped": shape.n_layers - last - 1,
    }

    # ---- storage -------------------------------------------------------------
    run_uri = cfg.storage.uri.rstrip("/") + "/" + cfg.run_name
    itemsize = dtypes.itemsize(storage_dtype)
    per_hook = [
        hook_storage(
            run_name=cfg.run_name,
            hook=s.name,
            model=cfg.model.name,
            fmt=fmt,
            dtype=storage_dtype,
            itemsize=itemsize,
            B=B,
            T=T,
            D=w,
            bpu=bpu,
            n_batches=cfg.data.n_batches,
            start_batch=cfg.data.start_batch,
            num_runs=k,
        )
        for s, w in zip(specs, widths)
    ]
    first = per_hook[0]
    per_worker = []
    for w in range(k):
        rows = [h.per_worker[w] for h in per_hook]
        per_worker.append(
            {
                "worker": w,
                "batches": rows[0].batches,
                "megabatches": rows[0].files,
                "files": sum(r.files for r in rows),
                "sequences": rows[0].sequences,
                "tokens": rows[0].sequences * T,
                "bytes": sum(r.bytes for r in rows),
                "dropped_batches": rows[0].dropped_batches,
            }
        )
    totals = {
        "tokens": first.tokens,
        "sequences": first.sequences,
        "megabatches": sum(w["megabatches"] for w in per_worker),
        "files": sum(h.files for h in per_hook),
        "bytes": sum(h.bytes for h in per_hook),
        "bytes_per_megabatch": sum(h.bytes_per_megabatch for h in per_hook),
        "bytes_per_token": sum(h.bytes for h in per_hook) / first.tokens if first.tokens else 0.0,
    }
    dropped = sum(w["dropped_batches"] for w in per_worker)
    if dropped:
        warnings.append(
            f"format pt: {dropped} batch(es) at the end of the workers' shares do not fill a megabatch and are "
            f"dropped (Activault readers need full files); make n_batches/num_runs a multiple of "
            f"batches_per_upload ({bpu}) to keep them"
        )
    for s, w in zip(specs, widths):
        if s.site == "attn.hook_pattern":
            warnings.append(
                f"{s.name}: attention patterns are {w:,} values per token ({w * itemsize * T:,} bytes "
                "per sequence), the size of the model's attention matrix"
            )
    labels = [n for n in ("categories", "label_columns") if getattr(cfg.data, n, None)]
    if labels:
        warnings.append(
            f"data.{'/'.join(labels)}: per-sequence labels.* tensors (8 bytes per sequence and label) and their "
            "vocabulary in each header are not in the byte counts (they depend on the data)"
        )
    if getattr(cfg.data, "packing", False):
        warnings.append(
            "data.packing: the source_segments provenance tensor (40 bytes per document piece) is "
            "not in the byte counts (it depends on the document lengths)"
        )
    inference = getattr(cfg, "inference", None)
    if inference is not None and getattr(inference, "max_new_tokens", None):
        if not getattr(inference, "save_activations", True):
            warnings.append(
                "inference.save_activations is false: only generated text is stored, "
                "no megabatch files (the storage figures do not apply)"
            )
        else:
            warnings.append(
                "generation mode: figures assume each stored sequence is seq_length positions; "
                "the generated text records are not counted"
            )
    if totals["megabatches"] == 0:
        warnings.append("no megabatch will be written: n_batches is too small for batches_per_upload and num_runs")

    # ---- memory --------------------------------------------------------------
    limit, limit_source = _limit(cfg, cpu)
    mem_in = MemoryInputs(
        params=shape.params,
        params_used=shape.params_through(max(last, 0)),
        compute_bytes=dtypes.itemsize(compute),
        storage_bytes=itemsize,
        B=B,
        T=T,
        D=D,
        d_mlp=shape.d_mlp or 4 * D,
        kv_dim=shape.kv_dim,
        n_hooks=len(specs),
        hook_widths=sum(widths),
        bpu=bpu,
        queued=cfg.upload.max_queued_megabatches,
        cpu=cpu,
        devices=max(1, devices or 1),
        limit=limit,
        limit_source=limit_source,
    )
    memory = estimate_memory(mem_in)
    warnings.extend(memory.warnings)

    # ---- cost ------------------------------------------------------------------
    sizes: dict[int, int] = {}
    for h in per_hook:
        for size, n in h.size_counts.items():
            sizes[size] = sizes.get(size, 0) + n
    requests = count_requests(sizes.items(), totals["megabatches"], len(specs), k)
    cost = estimate_cost(totals["bytes"], requests, prices or Prices())

    config = {
        "source": cfg.source,
        "run_name": cfg.run_name,
        "run_uri": run_uri,
        "model": cfg.model.name,
        "num_runs": k,
        "batch_size": B,
        "seq_length": T,
        "n_batches": cfg.data.n_batches,
        "start_batch": cfg.data.start_batch,
        "batches_per_upload": bpu,
        "format": fmt,
        "compute_dtype": compute,
        "storage_dtype": storage_dtype,
        "device": "cpu" if cpu else "gpu",
        "devices": mem_in.devices,
        "max_per_device_memory": cfg.model.max_per_device_memory,
        "upload_workers": cfg.upload.upload_workers,
        "max_queued_megabatches": cfg.upload.max_queued_megabatches,
        "data_key": cfg.data.data_key,
    }
    plan = Plan(
        config=config,
        model=shape,
        hooks=hooks,
        forward=forward,
        storage=per_hook,
        totals=totals,
        per_worker=per_worker,
        memory=memory,
        cost=cost,
        warnings=warnings,
        notes=notes,
    )
    if measure or upload_bytes_per_s is not None or measure_upload:
        plan.time = _time_section(cfg, specs, plan, measure, measure_batches, upload_bytes_per_s, measure_upload, store)
    return plan


def _time_section(
    cfg: Any,
    specs: list,
    plan: Plan,
    measure: bool,
    batches: int,
    upload_bps: float | None,
    measure_upload: bool,
    store: Any,
) -> dict[str, Any]:
    from vaultsh.plan.measure import measure_compute
    from vaultsh.plan.measure import measure_upload as _measure_upload

    out: dict[str, Any] = {"compute": None, "upload": None}
    if measure_upload:
        biggest = max(h.bytes_per_megabatch for h in plan.storage)
        out["upload"] = _measure_upload(cfg, biggest, store)
        upload_bps = out["upload"]["bytes_per_s"]
    elif upload_bps is not None:
        out["upload"] = {"bytes_per_s": upload_bps, "given": True}
    if measure:
        m = measure_compute(cfg, specs, batches)
        out["compute"] = m.to_dict()
        per_worker = []
        for w in plan.per_worker:
            compute_s = w["batches"] * m.seconds_per_batch
            need = w["bytes"] / compute_s if compute_s > 0 else 0.0
            upload_s = w["bytes"] / upload_bps if upload_bps else None
            per_worker.append(
                {
                    "worker": w["worker"],
                    "compute_s": compute_s,
                    "upload_bytes_per_s_needed": need,
                    "upload_s": upload_s,
                    "run_s": max(compute_s, upload_s) if upload_s is not None else compute_s,
                }
            )
        slowest = max(per_worker, key=lambda r: r["run_s"])
        out["per_worker"] = per_worker
        out["tokens_per_s"] = m.tokens_per_s
        out["run_s"] = slowest["run_s"]
        out["upload_bytes_per_s_needed"] = max(r["upload_bytes_per_s_needed"] for r in per_worker)
        out["bottleneck"] = None
        if upload_bps:
            out["bottleneck"] = "upload" if out["upload_bytes_per_s_needed"] > upload_bps else "compute"
            if out["bottleneck"] == "upload":
                plan.warnings.append(
                    f"upload is the bottleneck: a worker produces {out['upload_bytes_per_s_needed'] / 1e6:,.1f} "
                    f"MB/s but the store takes {upload_bps / 1e6:,.1f} MB/s; the forward pass will wait on the "
                    "upload queue"
                )
        if m.peak_device_bytes is not None and plan.memory.limit and m.peak_device_bytes > plan.memory.limit:
            plan.warnings.append("measured peak GPU memory exceeds the limit")
    return out


# Sites that are d_model wide on every family: sized without building the model.
_RESIDUAL_WIDE = {
    "hook_resid_pre",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_embed",
    "ln_final.hook_normalized",
    "attn.module_out",
    "mlp.module_out",
    "mlp.module_in",
    "attn.module_in",
}


def _sized_hooks(cfg: Any, specs: list, d_model: int) -> tuple[list, list[int]]:
    """(hooks, width of each): d_model for residual-wide sites; the others from the model's shapes on the
    meta device (`vaultsh hooks` uses the same), which also expands module globs and refuses sites the
    family lacks."""
    if all(s.site in _RESIDUAL_WIDE for s in specs):
        return specs, [d_model] * len(specs)
    from collector.capture import meta_model, shapes_on_meta
    from vaultsh.plan.model import read_hf_config

    sized = shapes_on_meta(meta_model(read_hf_config(cfg.model)), specs, cfg.data.seq_length)
    return [p.spec for p, _ in sized], [w for _, w in sized]


def summary_lines(cfg: Any) -> list[str]:
    """A few lines for the dashboard's run summary: the plan's one-line summary, then its warnings."""
    plan = make_plan(cfg)
    return [plan.summary(), *plan.warnings[:3]]
