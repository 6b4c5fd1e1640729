"""The GPU path measured (issue 22): one prepared script for one GPU machine.

    benchmarks/gpu_check.sh OUT_DIR            # ~1B random Llama, bf16, 32 x 1024, on CUDA
    benchmarks/gpu_check.sh OUT_DIR --smoke    # tiny Llama, same code, CPU or GPU, seconds

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.txt with:

1. the set-up: a Llama built from a config with random weights (no hub),
   saved with the real SmolLM2 tokenizer, hooks at 4 layers spread over the
   first half, local text (pydoc topics cut into documents);
2. `bare`: tokens/s of the bare forward of layers 0..deepest (no LM head,
   whole model resident) on the same batches; `collect`: `vaultsh collect
   CONFIG --headless` on the same model and data into a local store, tokens/s
   in steady state (first batches skipped), the ratio, and the GPU's busy
   fraction (time inside the forward / wall time, on the GPU clock);
3. `d2h`: bytes/s of the worker's device-to-host copies against a bare
   `copy_` into pinned memory of the same size, and the share of copy time
   that overlaps a forward (on CUDA the worker copies on a side stream);
4. `reader`: ActivationReader to the device, GB/s of the store's files,
   against reading the same files into pinned buffers plus a copy to the device;
5. `memory`: peak GPU memory of the worker against the bare forward's.

All timing is on one clock (benchmarks/gpu_probe.py): CUDA events on a GPU,
perf_counter on CPU. The collection runs in this process through
`vaultsh.cli.main`, with the probe wrapped around the worker's forward and
copy calls (nothing in collector/ is changed for it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "tests" / "data" / "smollm2-tokenizer"
RUN = "gpu-check"
NEEDED = ["torch", "transformers", "safetensors", "numpy", "yaml", "rich", "humanize", "psutil", "pydantic"]


@dataclass(frozen=True)
class Size:
    n_layers: int
    d_model: int
    d_ffn: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    bare_batches: int
    collect_batches: int
    batches_per_upload: int
    rounds: int  # alternating rounds for the copy and reader baselines
    dtype: str = "bfloat16"


# About 1.07B parameters with SmolLM2's 49,152-token vocabulary (Llama-3.2-1B's shape otherwise).
FULL = Size(
    n_layers=16,
    d_model=2048,
    d_ffn=8192,
    heads=32,
    kv_heads=8,
    batch=32,
    seq=1024,
    bare_batches=12,
    collect_batches=24,
    batches_per_upload=4,
    rounds=2,
)
SMOKE = Size(
    n_layers=8,
    d_model=64,
    d_ffn=128,
    heads=4,
    kv_heads=2,
    batch=4,
    seq=64,
    bare_batches=6,
    collect_batches=8,
    batches_per_upload=2,
    rounds=2,
)


def hook_layers(n_layers: int, k: int = 4) -> list[int]:
    """`k` layers spread evenly over the first half of the model, the last at its middle."""
    half = max(1, n_layers // 2)
    return sorted({max(0, (i + 1) * half // k - 1) for i in range(k)})


# -- set-up -------------------------------------------------------------------


def build_model_dir(dest: Path, size: Size, device: str) -> int:
    """A random Llama of `size` plus the real tokenizer, saved to `dest`; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size.d_model,
        intermediate_size=size.d_ffn,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max(2048, size.seq),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, size.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    del model
    _free(device)
    return n_params


def write_text(dest: Path, n_docs: int, chars: int) -> Path:
    """`n_docs` paragraphs of `chars` characters of pydoc topics text (cycled), one document each."""
    import pydoc_data.topics

    words = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).split()
    docs, i = [], 0
    for _ in range(n_docs):
        doc, n = [], 0
        while n < chars:
            w = words[i % len(words)]
            doc.append(w)
            n += len(w) + 1
            i += 1
        docs.append(" ".join(doc))
    dest.write_text("\n\n".join(docs) + "\n")
    return dest


def write_config(
    dest: Path, model_dir: Path, text: Path, store: Path, size: Size, device: str, hooks: list[str]
) -> Path:
    """The collector's YAML (Activault schema) for this check."""
    import yaml

    cfg = {
        "run_name": RUN,
        "num_runs": 1,
        "transformer_config": {"model_name": str(model_dir), "dtype": size.dtype, "device": device},
        "data_config": {
            "data_key": str(text),
            "n_batches": size.collect_batches,
            "seq_length": size.seq,
            "batch_size": size.batch,
            "seed": 0,
        },
        "upload_config": {"batches_per_upload": size.batches_per_upload, "hooks": hooks},
        "storage": {"uri": str(store), "format": "safetensors"},
    }
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


# -- measurements -------------------------------------------------------------


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _steady_skip(n: int) -> int:
    """Forwards left out at the start of a collection (warm-up, first megabatch in flight)."""
    return min(max(2, n // 5), n - 3)


def _layers_called(layers, fn) -> int:
    """How many of `layers` run during `fn()`."""
    called: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: called.add(i)) for i, m in enumerate(layers)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return len(called)


def bare_forward(cfg_path: Path, size: Size, deepest: int) -> dict:
    """Tokens/s, busy fraction and peak memory of the bare forward of layers 0..deepest (no LM head)."""
    import torch

    from benchmarks.gpu_probe import Clock, PeakMemory, union_ms
    from collector.config import load_config
    from collector.data import BatchStream
    from collector.model import load_model_and_tokenizer

    cfg = load_config(str(cfg_path))
    model, tok, device = load_model_and_tokenizer(cfg.model)
    batches = []
    for b in BatchStream(cfg.data, tok):
        batches.append((b.input_ids.to(device), b.attention_mask.to(device)))
        if len(batches) == size.bare_batches:
            break
    base = model.model
    every_layer = base.layers
    base.layers = torch.nn.ModuleList(every_layer[: deepest + 1])  # every layer's weights stay resident
    try:
        with torch.inference_mode():
            # a partial, not a lambda: nothing keeps `base` alive past the `del` below
            first = functools.partial(base, input_ids=batches[0][0], attention_mask=batches[0][1], use_cache=False)
            layers_run = _layers_called(every_layer, first)
            del first
            if layers_run != deepest + 1:
                raise RuntimeError(f"the bare forward ran {layers_run} layers, not 0..{deepest}")
            for ids, am in batches[:2]:  # warm-up
                base(input_ids=ids, attention_mask=am, use_cache=False)
            clock = Clock(device)
            marks = []
            with PeakMemory(device) as mem:
                for ids, am in batches:
                    s = clock.mark()
                    base(input_ids=ids, attention_mask=am, use_cache=False)
                    marks.append((s, clock.mark()))
            clock.sync()
    finally:
        base.layers = every_layer
    iv = [(clock.ms(s), clock.ms(e)) for s, e in marks]
    wall = iv[-1][1] - iv[0][0]
    out = {
        "device": str(device),
        "batches": len(iv),
        "layers_run": layers_run,
        "tokens_per_s": len(iv) * size.batch * size.seq / wall * 1e3,
        "busy_fraction": union_ms(iv) / wall,
        "peak_memory_bytes": mem.peak,
        "memory_kind": mem.kind,
    }
    del model, batches, base, every_layer
    _free(device)
    return out


def collect(cfg_path: Path, size: Size, device: str) -> tuple[dict, dict]:
    """Run `vaultsh collect CONFIG --headless` here under the probe; (collect figures, copy figures)."""
    from benchmarks.gpu_probe import PeakMemory, install, overlap_ms, union_ms
    from vaultsh.cli import main as vaultsh_main

    with PeakMemory(device) as mem, install(device) as probe:
        t0 = time.perf_counter()
        rc = vaultsh_main(["collect", str(cfg_path), "--headless"])
        wall_s = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"vaultsh collect exited with status {rc}")
    probe.check()
    fw, cp = probe.forward_ms(), probe.copy_ms()
    n, skip = len(fw), _steady_skip(len(fw))
    window = fw[-1][0] - fw[skip][0]
    copy_ms = sum(e - s for s, e in cp)
    figures = {
        "forwards": n,
        "rows_per_forward": sorted({r for _, _, r in probe.forwards}),
        "steady_from_forward": skip,
        "tokens_per_s": (n - 1 - skip) * size.batch * size.seq / window * 1e3,
        "tokens_per_s_whole_command": n * size.batch * size.seq / wall_s,
        "wall_s": wall_s,
        "busy_fraction": union_ms(fw[skip : n - 1]) / window,
        "peak_memory_bytes": mem.peak,
        "memory_kind": mem.kind,
    }
    copies = {
        "copies": len(cp),
        "bytes": probe.copy_bytes,
        "bytes_per_s": probe.copy_bytes / copy_ms * 1e3,
        "copy_ms": copy_ms,
        "overlap_fraction": overlap_ms(cp, fw) / copy_ms if copy_ms > 0 else 0.0,
    }
    return figures, copies


def d2h_baseline(size: Size, device: str) -> dict:
    """Bytes/s of a bare `copy_` of one hook's batch from the device into pinned host memory."""
    import torch

    from benchmarks.gpu_probe import Clock

    cuda = str(device).startswith("cuda")
    shape, dtype = (size.batch, size.seq, size.d_model), getattr(torch, size.dtype)
    src = torch.randn(shape, device=device).to(dtype)
    dst = torch.empty(shape, dtype=dtype, pin_memory=cuda)
    dst.copy_(src, non_blocking=cuda)  # warm-up
    clock = Clock(device)
    reps = 4 * size.rounds
    s = clock.mark()
    for _ in range(reps):
        dst.copy_(src, non_blocking=cuda)
    e = clock.mark()
    clock.sync()
    nbytes = reps * dst.numel() * dst.element_size()
    return {"bytes": nbytes, "bytes_per_s": nbytes / (clock.ms(e) - clock.ms(s)) * 1e3, "pinned": cuda}


def _raw_read_to_device(paths: list[Path], device: str) -> int:
    """Read each file into one of two pinned buffers and copy it to the device; returns bytes."""
    import torch

    cuda = str(device).startswith("cuda")
    cap = max(p.stat().st_size for p in paths)
    bufs = [torch.empty(cap, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    dest = torch.empty(cap, dtype=torch.uint8, device=device)
    done = [None, None]
    total = 0
    for i, p in enumerate(paths):
        buf = bufs[i % 2]
        if done[i % 2] is not None:
            done[i % 2].synchronize()
        view = memoryview(buf.numpy())
        with open(p, "rb", buffering=0) as f:
            n = 0
            while k := f.readinto(view[n:]):
                n += k
        dest[:n].copy_(buf[:n], non_blocking=cuda)
        if cuda:
            done[i % 2] = torch.cuda.Event()
            done[i % 2].record()
        total += n
    if cuda:
        torch.cuda.synchronize()
    return total


def _reader_to_device(store, hooks: list[str], device: str) -> tuple[int, int]:
    """Stream every hook through ActivationReader to `device`; (megabatches, states bytes)."""
    import torch

    from vaultsh.reader import ActivationReader

    reader = ActivationReader([f"{RUN}/{h}" for h in hooks], store=store, device=device)
    n = nbytes = 0
    for mb in reader:
        n += 1
        nbytes += mb["states"].numel() * mb["states"].element_size()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return n, nbytes


def reader_check(store_root: Path, hooks: list[str], size: Size, device: str) -> dict:
    """GB/s of the store's files: ActivationReader to `device` against raw read + pinned copy."""
    from vaultsh.run import Run
    from vaultsh.store.local import LocalStore

    store = LocalStore(store_root)
    files = [f for h in hooks for f in Run(store, RUN).committed_files(h)]
    paths = [store_root / f.key for f in files]
    file_bytes = sum(p.stat().st_size for p in paths)
    best_raw = best_ours = math.inf
    for _ in range(size.rounds):  # alternate, keep the best of each (page cache warm after the first)
        t0 = time.perf_counter()
        if _raw_read_to_device(paths, device) != file_bytes:
            raise RuntimeError("short read in the raw baseline")
        best_raw = min(best_raw, time.perf_counter() - t0)
        t0 = time.perf_counter()
        n, states = _reader_to_device(store, hooks, device)
        best_ours = min(best_ours, time.perf_counter() - t0)
    raw, ours = file_bytes / best_raw / 1e9, file_bytes / best_ours / 1e9
    return {
        "files": len(files),
        "megabatches": n,
        "file_bytes": file_bytes,
        "states_bytes": states,
        "raw_gb_per_s": raw,
        "reader_gb_per_s": ours,
        "ratio": ours / raw,
    }


# -- the whole check ----------------------------------------------------------

DEFINITIONS = {
    "clock": "CUDA events on the GPU timeline on a GPU; time.perf_counter on CPU",
    "tokens_per_s": "batch x seq positions per second (padding included, as the bare forward counts them)",
    "bare.tokens_per_s": "LlamaModel with layers 0..deepest only (whole model resident), no LM head, "
    "pre-tokenised batches on the device, first start to last end",
    "collect.tokens_per_s": "vaultsh collect --headless in this process: forwards steady_from_forward..last, "
    "start to start, so every per-batch cost of the worker counts",
    "collect.busy_fraction": "time inside the worker's forward calls / wall time, over the same window",
    "collect.states_gb_per_s": "activation bytes the store must take at the steady tokens/s",
    "d2h.worker.bytes_per_s": "bytes of the worker's DeviceCopier copies / their summed duration on the copy stream",
    "d2h.worker.overlap_fraction": "share of copy time during which a forward was running",
    "d2h.bare_pinned": "copy_ of one hook's [batch, seq, d_model] tensor into pinned memory (plain memory on CPU)",
    "reader": "store file bytes per second: ActivationReader(device) over every hook vs reading each file into "
    "two alternating pinned buffers and copying it to the device; best of `rounds`, alternated",
    "memory": "cuda: torch.cuda.max_memory_allocated over each phase; cpu: process RSS sampled every 5 ms",
}


def _timed(report: dict, name: str, fn):
    """Run `fn`, record its seconds under report["phase_s"][name]; returns its result."""
    t0 = time.perf_counter()
    result = fn()
    report["phase_s"][name] = round(time.perf_counter() - t0, 2)
    return result


def _save(out: Path, report: dict) -> None:
    """Write the JSON so far (a run killed at its time limit still leaves the phases it finished)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


def _prepare(work: Path, size: Size, device: str, hooks: list[str]) -> tuple[Path, int]:
    """Model dir, text and config under `work`; (config path, parameter count)."""
    n_params = build_model_dir(work / "model", size, device)
    n_docs = (max(size.bare_batches, size.collect_batches) + 2) * size.batch
    text = write_text(work / "text.txt", n_docs, size.seq * 6)  # ~4 chars/token: every row full
    return write_config(work / "config.yaml", work / "model", text, work / "store", size, device, hooks), n_params


def run_check(out: Path, size: Size, device: str, work: Path) -> dict:
    """Every measurement in order, the JSON rewritten after each; returns the report."""
    import torch

    layers = hook_layers(size.n_layers)
    hooks = [f"blocks.{i}.hook_resid_post" for i in layers]
    itemsize = torch.empty((), dtype=getattr(torch, size.dtype)).element_size()
    report = {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "complete": False,
        "phase_s": {},
        "definitions": DEFINITIONS,
    }
    cfg, n_params = _timed(report, "setup", lambda: _prepare(work, size, device, hooks))
    report["setup"] = {
        **asdict(size),
        "params": n_params,
        "hooks": hooks,
        "hook_layers": layers,
        "itemsize": itemsize,
        "expected_copy_bytes": size.collect_batches * size.batch * size.seq * size.d_model * len(hooks) * itemsize,
    }
    _save(out, report)
    bare = report["bare"] = _timed(report, "bare", lambda: bare_forward(cfg, size, max(layers)))
    _save(out, report)
    coll, copies = _timed(report, "collect", lambda: collect(cfg, size, device))
    report["collect"] = {
        **coll,
        "ratio": coll["tokens_per_s"] / bare["tokens_per_s"],
        "states_gb_per_s": coll["tokens_per_s"] * size.d_model * len(hooks) * itemsize / 1e9,
    }
    _save(out, report)
    d2h = _timed(report, "d2h", lambda: d2h_baseline(size, device))
    report["d2h"] = {
        "worker": copies,
        "bare_pinned": d2h,
        "ratio": copies["bytes_per_s"] / d2h["bytes_per_s"],
        "side_stream": device.startswith("cuda"),
        "overlaps_forward": copies["overlap_fraction"] > 0.5,
    }
    _save(out, report)
    report["reader"] = _timed(report, "reader", lambda: reader_check(work / "store", hooks, size, device))
    report["memory"] = {
        "kind": bare["memory_kind"],
        "bare_peak_bytes": bare["peak_memory_bytes"],
        "worker_peak_bytes": coll["peak_memory_bytes"],
        "ratio": coll["peak_memory_bytes"] / bare["peak_memory_bytes"],
    }
    report["complete"] = True
    _save(out, report)
    (out / "gpu_check.txt").write_text(text_report(report))
    return report


def text_report(r: dict) -> str:
    """The short human-readable summary of a report."""
    s, c, d, rd, m = r["setup"], r["collect"], r["d2h"], r["reader"], r["memory"]
    lines = [
        f"vaultsh gpu_check on {r['gpu'] or r['device']} (torch {r['torch']})",
        f"model: random Llama, {s['params'] / 1e9:.3f}B params, {s['n_layers']} layers, d_model {s['d_model']}, "
        f"{s['dtype']}; batch {s['batch']} x {s['seq']}; hooks {', '.join(s['hooks'])}",
        f"1-2 bare forward (layers 0..{max(s['hook_layers'])}): {r['bare']['tokens_per_s']:,.0f} tokens/s, "
        f"busy {r['bare']['busy_fraction']:.1%}",
        f"    vaultsh collect --headless: {c['tokens_per_s']:,.0f} tokens/s steady "
        f"({c['tokens_per_s_whole_command']:,.0f} over the whole command, model load included) "
        f"= {c['ratio']:.3f}x; busy {c['busy_fraction']:.1%}; store takes {c['states_gb_per_s'] * 1e3:,.0f} MB/s",
        f"3   worker D2H copies: {d['worker']['bytes_per_s'] / 1e9:.2f} GB/s vs bare "
        f"{'pinned ' if d['bare_pinned']['pinned'] else ''}copy_ {d['bare_pinned']['bytes_per_s'] / 1e9:.2f} GB/s "
        f"= {d['ratio']:.3f}x; {d['worker']['overlap_fraction']:.1%} of copy time overlaps a forward "
        f"(side stream: {d['side_stream']}, overlaps: {d['overlaps_forward']})",
        f"4   reader to {r['device']}: {rd['reader_gb_per_s']:.2f} GB/s vs raw read + copy "
        f"{rd['raw_gb_per_s']:.2f} GB/s = {rd['ratio']:.3f}x ({rd['files']} files, {rd['file_bytes'] / 1e9:.2f} GB)",
        f"5   peak memory ({m['kind']}): worker {m['worker_peak_bytes'] / 1e9:.2f} GB vs bare "
        f"{m['bare_peak_bytes'] / 1e9:.2f} GB = {m['ratio']:.2f}x",
    ]
    return "\n".join(lines) + "\n"


def missing_modules() -> list[str]:
    """Modules this check needs that this Python cannot import."""
    import importlib.util

    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.txt")
    p.add_argument("--smoke", action="store_true", help="tiny Llama, small batches: seconds, CPU or GPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the model, text and store go (default: a temporary folder, removed after)",
    )
    args = p.parse_args(argv)
    missing = missing_modules()
    if missing:
        print(
            f"gpu_check: missing Python packages: {', '.join(missing)}; carry them as wheels in .whl/ "
            "(README.md, Performance, 'The GPU check')",
            file=sys.stderr,
        )
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and not device.startswith("cuda"):
        print("gpu_check: no GPU here; the full check needs one (use --smoke for the tiny CPU run)", file=sys.stderr)
        return 2
    size = SMOKE if args.smoke else FULL
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        report = run_check(args.out, size, device, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="vaultsh-gpu-check-") as tmp:
            report = run_check(args.out, size, device, Path(tmp))
    print(text_report(report), end="")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
