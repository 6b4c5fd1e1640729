"""Our TransformerLens sites against TransformerLens' own `run_with_cache`, where transformer-lens is installed.

TransformerLens 4 wraps the Hugging Face model itself (`TransformerBridge`,
unprocessed weights, eager attention), so both sides run the same tiny random
model; every site both name is compared value for value. Families the bridge
does not load are skipped with its reason.
"""

from __future__ import annotations

import os

import pytest

from collector.capture import ActivationCapture
from collector.layers import expand_hooks
from collector.sites import SITES
from tests.familyfixtures import FAMILIES, LAYERS, build, build_or_skip, tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
bridge = pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens is not installed")

LAYER_SITES = [s for s, site in SITES.items() if site.scope == "layer"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _as_ours(name: str, theirs, ours_shape):
    """TransformerLens' tensor in our stored layout: [batch, pos, width]."""
    if name.endswith("attn.hook_pattern"):  # [batch, head, q, k] -> [batch, q, head * k]
        b, h, q, k = theirs.shape
        return theirs.permute(0, 2, 1, 3).reshape(b, q, h * k)
    return theirs.reshape(ours_shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sites_equal_transformerlens_run_with_cache(family, tok, tmp_path):
    model = build_or_skip(family, len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    theirs = build(family, len(tok))  # the bridge rewires the model it wraps (fused projections split): a copy
    theirs.config.architectures = model.config.architectures  # set by save_pretrained; the bridge reads it
    try:
        tl = bridge.TransformerBridge.boot_transformers(str(tmp_path), hf_model=theirs, tokenizer=tok)
    except Exception as e:  # an architecture the bridge does not map
        pytest.skip(f"TransformerLens does not load {family}: {type(e).__name__}: {str(e)[:120]}")
    ids = tok(["The quick brown fox jumps over the lazy dog again and again."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        _, cache = tl.run_with_cache(ids)
    names = [f"blocks.{L}.{s}" for L in range(LAYERS) for s in LAYER_SITES] + ["hook_embed", "ln_final.hook_normalized"]
    shared = [n for n in names if n in cache]
    specs = []
    for spec in expand_hooks(shared, LAYERS):
        try:
            with ActivationCapture(model, [spec]):
                specs.append(spec)
        except Exception:  # a site we refuse for this family (e.g. resid_mid in a parallel block)
            continue
    assert len(specs) >= 8, f"only {len(specs)} sites in common: {shared}"
    with ActivationCapture(model, specs, stop_after_deepest=False) as cap:
        ours = cap.run(input_ids=ids, attention_mask=torch.ones_like(ids))
    bad = []
    for spec in specs:
        a = ours[spec.name].float()
        b = _as_ours(spec.name, cache[spec.name].float(), a.shape)
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if not err < 1e-4:
            bad.append(f"{spec.name}: {err:.3g}")
    assert not bad, f"{family}: sites that differ from TransformerLens: {bad}"
