"""The dataset card (README.md) written next to the shards.

Its YAML front matter names the Parquet files as the `train` split, so
`datasets.load_dataset(OUT_DIR)` works as well as
`load_dataset("parquet", data_files="OUT_DIR/*.parquet")`. Strings that come
from the run (model, hook, paths) are written as JSON strings, which YAML
reads verbatim, and escaped in the Markdown body.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from vaultsh.dtypes import BY_CODE, raw_numpy
from vaultsh.export.manifest import MANIFEST, SPLIT, Manifest
from vaultsh.export.rows import BF16_CAST
from vaultsh.terminal import inert


def _md(text: Any) -> str:
    """Untrusted text made inert in Markdown (no HTML, links or tables)."""
    s = inert(text)
    for ch in "\\`*_{}[]<>()#|!":
        s = s.replace(ch, "\\" + ch)
    return s


def _code(text: Any) -> str:
    """Untrusted text for a Markdown code span: printable, no backticks."""
    s = inert(text)
    return s.replace("`", "'").replace("|", "\\|")


def _np_name(st_dtype: str) -> str:
    return raw_numpy(st_dtype).name if st_dtype.startswith("F8") else BY_CODE[st_dtype].name


def render_card(manifest: Manifest, vaultsh_version: str) -> str:
    plan = manifest.plan
    src, shape, opts = plan.source, plan.shape, plan.options
    mode = opts["mode"]
    done = [s for s in plan.shards if s["name"] in manifest.finished]
    rows_done = sum(manifest.finished[s["name"]]["rows"] for s in done)
    bytes_done = sum(manifest.finished[s["name"]]["bytes"] for s in done)
    counted = [f["tokens"] for f in plan.files if f.get("tokens") is not None]
    tokens = f"{sum(counted):,} unmasked tokens"
    if len(counted) < len(plan.files):  # not known up front: counted as files are written
        tokens += f" in the {len(counted)} megabatches exported so far"
    positions = sum(f["sequences"] for f in plan.files) * shape["seq_len"]
    t, d = shape["seq_len"], shape["d_model"]
    complete = len(done) == len(plan.shards)
    front = "\n".join(
        [
            "---",
            "configs:",
            "- config_name: default",
            "  data_files:",
            f"  - split: {SPLIT}",
            f"    path: {json.dumps(SPLIT + '-*.parquet')}",
            "tags:",
            "- activations",
            "- interpretability",
            "- vaultsh",
            "pretty_name: " + json.dumps(f"{src['hook']} activations of {src.get('model') or 'a model'}"),
            "---",
        ]
    )
    states_shape = f"[{t}, {d}]" if mode == "sequences" else f"[{d}]"
    dtype_note = plan.dtype
    if plan.dtype == "bfloat16":
        dtype_note = "bfloat16 stored as raw uint16 bits"
    elif shape["stored_dtype"] == "BF16":
        dtype_note = f"{plan.dtype} (widened exactly from the run's bfloat16)"
    cols = [f"| `states` | {states_shape} | {dtype_note} | activations at the hook |"]
    if mode == "tokens":
        cols += [
            "| `input_ids` | scalar | " + _np_name(shape["ids_dtype"]) + " | the token |",
            "| `position` | scalar | int32 | position of the token in its sequence |",
        ]
    else:
        cols += [
            f"| `input_ids` | [{t}] | " + _np_name(shape["ids_dtype"]) + " | tokens of the sequence |",
            f"| `mask` | [{t}] | bool | true for real content (false: padding, special tokens, default system prompt) |",
        ]
    cols += [
        "| `megabatch` | scalar | int32 | index of the source megabatch (list below) |",
        "| `sequence` | scalar | int32 | sequence index inside that megabatch |",
    ]
    for name in plan.labels:
        dt, rest = plan.label_types[name]
        cols.append(
            f"| `label_{_code(name)}` | {list(rest) if rest else 'scalar'} | {_np_name(dt)} | per-sequence label `{_code(name)}` |"
        )
    row_word = "sequence" if mode == "sequences" else "unmasked token"
    lines = [
        front,
        "",
        f"# Activations: {_md(src.get('model') or 'unknown model')}, hook {_md(src['hook'])}",
        "",
        f"Activations collected by vaultsh from run `{_code(posixpath.basename(src['run']))}`, hook `{_code(src['hook'])}`"
        + (f" ({_md(src['site'])}, layer {_md(src['layer'])})" if src.get("site") else "")
        + ", exported to Parquet.",
        "",
        "## Contents",
        "",
        f"- model: {_md(src.get('model') or 'unknown')}"
        + (f" (tokenizer: {_md(src['tokenizer'])})" if src.get("tokenizer") else ""),
        f"- hook: {_md(src['hook'])}; d_model {d}, sequence length {t}",
        f"- one row per {row_word}" + (" (masked positions dropped)" if mode == "tokens" else ""),
        f"- rows: {rows_done:,} in {len(done)} of {len(plan.shards)} shards ({bytes_done:,} bytes)"
        + ("" if complete else f"; the full export has {plan.total_rows:,} rows"),
        f"- source: {len(plan.files)} committed megabatches, {sum(f['sequences'] for f in plan.files):,} sequences, "
        f"{positions:,} positions, {tokens}",
        "- order: "
        + (
            f"globally shuffled across shards (seed {opts['seed']})"
            if opts["shuffle"]
            else "as collected (megabatch by megabatch, in commit order)"
        ),
        "",
        "## Columns",
        "",
        "| column | shape | dtype | meaning |",
        "|---|---|---|---|",
        *cols,
        "",
        "## Loading",
        "",
        "```python",
        "import datasets",
        f'ds = datasets.load_dataset("parquet", data_files="OUT_DIR/*.parquet", split="{SPLIT}")',
        'ds = ds.with_format("torch")  # or "numpy"',
        "```",
    ]
    if plan.dtype == "bfloat16":
        lines += [
            "",
            "`states` holds the raw bits of bfloat16 values in uint16. Cast back with:",
            "",
            "```python",
            "import numpy as np",
            "x = np.asarray(row['states'], dtype=np.uint16)",
            f"f32 = {BF16_CAST}",
            "```",
        ]
    lines += [
        "",
        "## How it was made",
        "",
        f"- source: `{_code(src['uri'])}`",
        f"- exported by vaultsh {_md(vaultsh_version)}; started {_md(manifest.created)}, last updated {_md(manifest.updated)}",
        f"- command: `{_code(manifest.command)}`" if manifest.command else "- command: (library call)",
        f"- options: {_md(_flags(opts))}; states stored as {_md(plan.dtype)}, compression {_md(opts['compression'])} (other columns zstd)",
        f"- only megabatches committed when the export started are included ({len(plan.files)}); "
        "files a worker was still writing were ignored",
        f"- `{MANIFEST}` records the plan and the finished shards; running the same command again resumes",
        "",
        "## Source megabatches",
        "",
        "| # | file | sequences | rows |",
        "|---|---|---|---|",
    ]
    shown = plan.files[:200]
    lines += [f"| {i} | {_md(f['name'])} | {f['sequences']} | {f['rows']} |" for i, f in enumerate(shown)]
    if len(plan.files) > len(shown):
        lines.append(f"| ... | {len(plan.files) - len(shown)} more in `{MANIFEST}` | | |")
    return "\n".join(lines) + "\n"


def _flags(opts: dict) -> str:
    out = [f"--{opts['mode']}", f"--dtype {opts['dtype']}", f"--batches-per-shard {opts['batches_per_shard']}"]
    if opts.get("label_columns") is not None:
        out.append("--label-columns " + " ".join(opts["label_columns"]))
    if opts.get("shuffle"):
        out.append(f"--shuffle --seed {opts['seed']}")
    return " ".join(out)
