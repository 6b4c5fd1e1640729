"""A plan as rich tables (what `vaultsh plan` prints and the dashboard shows)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import humanize

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import JustifyMethod

    from vaultsh.plan import Plan


def size(n: float | None) -> str:
    """Bytes for a person: '1.2 GiB'."""
    return "-" if n is None else humanize.naturalsize(n, binary=True)


def count(n: int | None) -> str:
    return "-" if n is None else humanize.intcomma(n)


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    return humanize.precisedelta(s, minimum_unit="seconds", format="%0.0f")


def rate(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:,.1f} MB/s"


def render_plan(plan: Plan) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    c, m, fw = plan.config, plan.model, plan.forward
    parts: list[Any] = []

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", f"{c['run_name']} -> {c['run_uri']}")
    head.add_row(
        "model",
        f"{c['model']} ({m.model_type}, {m.n_layers} layers, d_model {m.d_model}, "
        f"{count(m.params)} parameters{'' if m.exact_params else ' (estimated)'})",
    )
    head.add_row("facts from", m.source)
    head.add_row(
        "data",
        f"{c['data_key']}: {count(c['n_batches'] - c['start_batch'])} batches of "
        f"{c['batch_size']} x {c['seq_length']} tokens, {c['num_runs']} worker(s), "
        f"{c['batches_per_upload']} batches per megabatch",
    )
    head.add_row("format", f"{c['format']}, states in {c['storage_dtype']} (compute in {c['compute_dtype']})")
    parts.append(head)

    hooks = Table(title="hooks", title_justify="left", show_edge=False)
    hooks.add_column("as written")
    hooks.add_column("site")
    hooks.add_column("layer", justify="right")
    hooks.add_column("width", justify="right")
    hooks.add_column("meaning", style="dim")
    for h in plan.hooks:
        layer = "" if h["layer"] is None else str(h["layer"])
        hooks.add_row(h["written"], h["site"], layer, f"{h.get('width', '')}", h["description"])
    parts.append(hooks)
    parts.append(
        Text(
            f"forward pass: embeddings + layers 0-{fw['deepest_layer']} of {fw['n_layers']} "
            f"(stops at {fw['stops_at']}; {fw['layers_skipped']} layers and the LM head never run)"
        )
    )

    st = Table(title="storage", title_justify="left", show_edge=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("hook", "left"),
        ("tokens", "right"),
        ("files", "right"),
        ("per megabatch", "right"),
        ("total", "right"),
    )
    for col, just in columns:
        st.add_column(col, justify=just, overflow="fold")
    for hs in plan.storage:
        st.add_row(hs.hook, count(hs.tokens), count(hs.files), size(hs.bytes_per_megabatch), size(hs.bytes))
    t = plan.totals
    st.add_section()
    st.add_row(
        "total", count(t["tokens"]), count(t["files"]), size(t["bytes_per_megabatch"]), size(t["bytes"]), style="bold"
    )
    parts.append(st)
    parts.append(
        Text(
            f"{count(t['bytes'])} bytes in {count(t['files'])} megabatch files "
            f"({t['bytes_per_token']:,.1f} bytes per token position, all hooks), "
            f"plus commit records, metadata.json and statistics.json"
        )
    )
    if len(plan.per_worker) > 1:
        pw = Table(title="per worker", title_justify="left", show_edge=False)
        for col in ("worker", "batches", "megabatches", "files", "tokens", "bytes"):
            pw.add_column(col, justify="right")
        for w in plan.per_worker:
            pw.add_row(
                str(w["worker"]),
                count(w["batches"]),
                count(w["megabatches"]),
                count(w["files"]),
                count(w["tokens"]),
                size(w["bytes"]),
            )
        parts.append(pw)

    mem = plan.memory
    mt = Table(title="memory (estimate)", title_justify="left", show_edge=False)
    mt.add_column("what")
    mt.add_column("bytes", justify="right")
    mt.add_column("", style="dim")
    mt.add_row("weights loaded", size(mem.weights_loaded), f"whole model in {c['compute_dtype']}")
    mt.add_row(
        "weights used",
        size(mem.weights_used),
        f"embeddings + layers 0-{fw['deepest_layer']} (what a truncated model would hold)",
    )
    mt.add_row("activations per batch", size(mem.activations_per_batch), f"batch_size {c['batch_size']}, on the device")
    mt.add_row(
        "upload buffers",
        size(mem.upload_buffers),
        f"{c['max_queued_megabatches']} queued + 1 filling x {size(mem.upload_buffer_per_megabatch)} (host)",
    )
    where = "per device" if c["device"] == "gpu" else "in memory (CPU)"
    verdict = "" if mem.fits is None else ("fits" if mem.fits else "DOES NOT FIT")
    limit = f"limit {size(mem.limit)} ({mem.limit_source})" if mem.limit else "no limit given"
    mt.add_row(
        f"{where}, {mem.devices} device(s)",
        size(mem.per_device),
        f"{limit}: {verdict}" if verdict else limit,
        style="bold" if mem.fits is not False else "bold red",
    )
    if mem.suggested_batch_size:
        mt.add_row("suggested batch_size", str(mem.suggested_batch_size), "largest that fits the estimate")
    parts.append(mt)

    if plan.time:
        title = "time (measured on this machine)" if plan.time.get("compute") else "time"
        tt = Table(title=title, title_justify="left", show_edge=False)
        tt.add_column("what")
        tt.add_column("value", justify="right")
        tt.add_column("", style="dim")
        comp = plan.time.get("compute")
        if comp:
            tt.add_row(
                "tokens/s per worker",
                f"{comp['tokens_per_s']:,.0f}",
                f"{comp['batches_timed']} batches on {comp['device']}, "
                f"{comp['seconds_per_batch'] * 1000:,.1f} ms each; {comp['real_token_fraction']:.1%} unmasked",
            )
            tt.add_row("run time", duration(plan.time["run_s"]), "slowest worker, workers in parallel")
            tt.add_row("upload needed", rate(plan.time["upload_bytes_per_s_needed"]), "per worker, to keep up")
        up = plan.time.get("upload")
        if up:
            tt.add_row(
                "upload available",
                rate(up["bytes_per_s"]),
                "given"
                if up.get("given")
                else f"measured: {up['objects']} x {size(up['object_bytes'])} to {up['store']}",
            )
        if plan.time.get("bottleneck"):
            tt.add_row("bottleneck", plan.time["bottleneck"], "", style="bold")
        parts.append(tt)

    cost = plan.cost
    if cost is not None:
        ct = Table(title="requests and cost", title_justify="left", show_edge=False)
        ct.add_column("what")
        ct.add_column("value", justify="right")
        ct.add_column("", style="dim")
        ct.add_row("stored", f"{cost.stored_gib:,.3f} GiB", count(cost.stored_bytes) + " bytes")
        ct.add_row(
            "PUT-class requests", count(cost.put_requests), f"{count(cost.data_put_requests)} for megabatch files"
        )
        ct.add_row("GET-class requests", count(cost.get_requests), "by the workers")
        p = cost.prices
        if cost.storage_per_month is not None:
            ct.add_row("storage per month", f"{cost.storage_per_month:,.2f}", f"at {p['gb_month']} per GB-month")
        if cost.requests_once is not None:
            ct.add_row(
                "requests (once)",
                f"{cost.requests_once:,.2f}",
                f"at {p['put_1k'] or 0} per 1000 PUT, {p['get_1k'] or 0} per 1000 GET",
            )
        if cost.storage_per_month is None and cost.requests_once is None:
            ct.add_row("cost", "-", "no prices given (--price-gb-month, --price-put-1k, --price-get-1k)")
        parts.append(ct)

    for warning in plan.warnings:
        parts.append(Text(f"warning: {warning}", style="bold yellow"))
    for n in plan.notes:
        parts.append(Text(f"note: {n}", style="dim"))
    return Group(*parts)
