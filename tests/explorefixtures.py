"""A store with planted answers for the explore commands (grep, top, sae-eval, view --heat, norms).

Token ids are real text (the standard library's pydoc topics) through the real
SmolLM2 tokenizer; states are random except for planted rows:
- the phrase " zebra crossing" in two sequences (real tokens) and once with its
  second word masked (grep must not find that one);
- the largest value of dimension 3 at DIM_AT;
- a row along SAE feature 7's encoder column at SAE_AT;
- a position-0 sink (dimension 11 = 300: huge norm, one massive dimension) at SINK_AT.
Provenance is planted too: metadata.json names SOURCES; each sequence of an
unpacked file is document `DOC_BASE * file + sequence` of source `sequence % 2`
from its first token; the rows of PACKED_FILE hold two documents each (the
second from position PACK_SPLIT on), recorded in `source_segments`.
SAE checkpoints are written with the documented tensor names (SAELens, sparsify).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .modelfixtures import TOKENIZER_DIR

RUN, HOOK = "planted", "blocks.2.hook_resid_post"
N_FILES, N, T, D = 4, 8, 64, 16
D_SAE, FEATURE, K_SPARSIFY = 32, 7, 4
PHRASE = " zebra crossing"
QUERY = "bra cross"  # spans the boundary between the phrase's tokens
PHRASE_AT = [(1, 2, 30), (3, 0, 5)]  # (file, sequence, first position)
MASKED_PHRASE_AT = (2, 5, 12)
DIM, DIM_AT = 3, (2, 3, 10)
SAE_AT = (1, 4, 20)
SINK_DIM, SINK_AT = 11, (0, 0, 0)
SOURCES = ["notes", "my_jsonl"]
DOC_BASE, PACKED_FILE, PACK_SPLIT, PACK_OFFSET = 100, 1, 25, 7


def planted_source(f: int, s: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(`source` row [3], `source_segments` rows [k, 5] or None) written for sequence s of file f."""
    if f != PACKED_FILE:
        return np.array([s % 2, DOC_BASE * f + s, 0]), None
    seg = np.array([[s, 0, 0, 1000 + s, PACK_OFFSET], [s, PACK_SPLIT, 1, 2000 + s, 0]])
    return seg[0, 2:], seg


def source_of_token(f: int, s: int, p: int) -> dict:
    """What a token's provenance must say, worked out from the planted layout (not from the files)."""
    row, seg = planted_source(f, s)
    src, doc, off, start = int(row[0]), int(row[1]), int(row[2]), 0
    if seg is not None:
        piece = seg[seg[:, 1] <= p][-1]
        start, src, doc, off = (int(v) for v in piece[1:])
    return {"source": SOURCES[src], "source_index": src, "document_index": doc, "token_offset": off + p - start}


def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


def sae_weights(seed: int = 1) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        "W_enc": (g.standard_normal((D, D_SAE)) / np.sqrt(D)).astype(np.float32),
        "b_enc": (g.standard_normal(D_SAE) * 0.1).astype(np.float32),
        "W_dec": (g.standard_normal((D_SAE, D)) / np.sqrt(D_SAE)).astype(np.float32),
        "b_dec": (g.standard_normal(D) * 0.1).astype(np.float32),
        "threshold": np.abs(g.standard_normal(D_SAE) * 0.2).astype(np.float32),
    }


def write_saelens(dest: Path, arch: str = "jumprelu") -> Path:
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    w = sae_weights()
    if arch != "jumprelu":
        w.pop("threshold")
    save_file(w, str(dest / "sae_weights.safetensors"))
    cfg = {
        "architecture": arch,
        "d_in": D,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": True,
        "hook_name": HOOK,
        "dtype": "float32",
    }
    if arch == "topk":
        cfg["k"] = K_SPARSIFY
    (dest / "cfg.json").write_text(json.dumps(cfg))
    return dest


def write_sparsify(dest: Path) -> Path:
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    w = sae_weights(2)
    save_file(
        {
            "encoder.weight": np.ascontiguousarray(w["W_enc"].T),
            "encoder.bias": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        },
        str(dest / "sae.safetensors"),
    )
    (dest / "cfg.json").write_text(
        json.dumps(
            {
                "k": K_SPARSIFY,
                "d_in": D,
                "num_latents": D_SAE,
                "expansion_factor": 2,
                "normalize_decoder": True,
                "multi_topk": False,
            }
        )
    )
    return dest


def np_encode(w: dict, x: np.ndarray, arch: str, k: int | None = None) -> np.ndarray:
    """The reference encoder, in numpy."""
    h = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    if arch == "jumprelu":
        h = h * (h > w["threshold"])
    if arch == "topk":
        idx = np.argsort(-h, axis=1)[:, k:]
        np.put_along_axis(h, idx, 0.0, axis=1)
    return h


def build(store, commit: bool = True, run_name: str = RUN, created: list[str] | None = None) -> dict:
    """Write the planted run into `store` (as `run_name`); returns every array written (for brute-force checks).
    `created`: each file's commit time (ISO), so a test can choose which megabatch was committed last."""
    import hashlib
    from pydoc_data.topics import topics

    import torch

    from vaultsh.megabatch import write_megabatch
    from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for

    tok = tokenizer()
    text = " ".join(topics[k] for k in sorted(topics))
    ids_all = np.array(tok.encode(text).ids, dtype=np.int64)
    need = N_FILES * N * T
    ids = ids_all[:need].reshape(N_FILES, N, T).copy()
    phrase = tok.encode(PHRASE).ids
    g = np.random.default_rng(0)
    states = g.standard_normal((N_FILES, N, T, D)).astype(np.float32)
    mask = g.random((N_FILES, N, T)) > 0.1
    mask[:, :, 0] = False  # BOS-like
    for f, s, p in PHRASE_AT + [MASKED_PHRASE_AT]:
        ids[f, s, p : p + len(phrase)] = phrase
        mask[f, s, p : p + len(phrase)] = True
    f, s, p = MASKED_PHRASE_AT
    mask[f, s, p + 1 : p + len(phrase)] = False
    states[DIM_AT][DIM] = 50.0
    mask[DIM_AT] = True
    w = sae_weights()
    u = w["W_enc"][:, FEATURE]
    states[SAE_AT] = 30.0 * u / np.linalg.norm(u)
    mask[SAE_AT] = True
    states[SINK_AT] = 0.0
    states[SINK_AT][SINK_DIM] = 300.0
    mask[SINK_AT] = True

    run = Run(store, run_name)
    run.write_cfg({"tokenizer": {"source": str(TOKENIZER_DIR)}, "run_name": run_name})
    meta = metadata_for(batch_size=N, sequence_length=T, d_in=D, hook=HOOK)
    meta["sources"] = list(SOURCES)
    run.write_metadata(HOOK, meta)
    keys = []
    for i in range(N_FILES):
        key = run.megabatch_key(HOOK, 0, i)
        rows = [planted_source(i, n) for n in range(N)]
        source = torch.from_numpy(np.stack([r for r, _ in rows]).astype(np.int64))
        segments = torch.from_numpy(np.concatenate([g for _, g in rows]).astype(np.int64)) if i == PACKED_FILE else None
        size = write_megabatch(
            store,
            key,
            torch.from_numpy(states[i]),
            torch.from_numpy(ids[i]),
            torch.from_numpy(mask[i]),
            metadata={"hook": HOOK, "megabatch": i},
            source=source,
            source_segments=segments,
        )
        if commit:
            sha = hashlib.sha256(store.get_bytes(key)).hexdigest()
            run.commit(
                CommitRecord(
                    worker=0,
                    index=i,
                    batch_start=i,
                    batch_end=i + 1,
                    files={HOOK: FileRecord(HOOK, key, size, sha, N, N * T, 0, i)},
                    tokens=N * T,
                    **({"created": created[i]} if created else {}),
                )
            )
        keys.append(key)
    return {"keys": keys, "states": states, "ids": ids, "mask": mask, "phrase": phrase, "sae": w}
