"""Every hook site on tiny random models of many families: each against the model's own numbers.

For each family: residual sites against `output_hidden_states`; the residual
identity of the block layout; weight identities (the down projection of
`mlp.hook_post` is the MLP's output, the output projection of `attn.hook_z`
is the attention's output); gated/plain MLP activations; the attention
pattern against `hook_v` and `hook_z`; q/k against what the model feeds its
rotary embedding; norms; embeddings; the final norm.
"""

from __future__ import annotations

import inspect
import os

import pytest

from collector.capture import ActivationCapture, resolve_probes, self_check
from collector.layers import expand_hooks
from collector.sites import SITES, layout_for
from tests.familyfixtures import FAMILIES, HEADS, LAYERS, build_or_skip, module_of, tokenizer
from vaultsh.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

TEXT = [
    "The quick brown fox jumps over the lazy dog, and then it runs away into the woods.",
    "Activations are stored in megabatches.",
]
LAYER_SITES = [s for s, site in SITES.items() if site.scope == "layer"]
RAW = ["mlp.module_out", "attn.module_out", "mlp.module_in", "attn.module_in"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _inputs(tok):
    enc = tok(TEXT, return_tensors="pt", padding=True, padding_side="left")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _available(model, names):
    """The names whose sites the family has (the others are refused with a reason)."""
    ok, refused = [], {}
    for spec in expand_hooks(names, LAYERS):
        try:
            resolve_probes(model, [spec])
            ok.append(spec.name)
        except ConfigError as e:
            refused[spec.name] = str(e)
    return ok, refused


def _capture(model, names, inputs):
    specs = expand_hooks(names, LAYERS)
    with ActivationCapture(model, specs, stop_after_deepest=False) as cap:
        out = cap.run(**inputs)
    return out, {p.spec.name: p for p in cap.probes}


def _close(a, b, what, tol=1e-4):
    a, b = a.float(), b.float()
    err = float((a - b).norm() / b.norm().clamp_min(1e-12))
    assert err < tol, f"{what}: relative error {err:.3g}"


class _RotaryInputs:
    """Records the q and k each attention call hands to the modeling file's apply_rotary_pos_emb."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        mod = module_of(model.get_decoder() if hasattr(model, "get_decoder") else model)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        target = (
            fn.forward if isinstance(fn, torch.nn.Module) else inspect.unwrap(fn) if fn else None
        )  # kernel wrappers
        if target is None or list(inspect.signature(target).parameters)[:2] != ["q", "k"]:
            return  # no rotary, or one of another shape (GPT-J rotates one tensor at a time)

        def spy(q, k, *args, **kwargs):
            self.calls.append((q.detach().clone(), k.detach().clone()))
            return fn(q, k, *args, **kwargs)

        monkeypatch.setattr(mod, "apply_rotary_pos_emb", spy)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_site_means_what_it_says(family, tok, monkeypatch):
    model = build_or_skip(family, len(tok))
    layout = layout_for(model.config)
    assert layout is not None
    inputs = _inputs(tok)
    mask = inputs["attention_mask"].bool()
    spy = _RotaryInputs(model, monkeypatch)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
    rotary = list(spy.calls)
    checked_rotary = False
    names = [f"blocks.*.{s}" for s in LAYER_SITES]
    names += ["hook_embed", "ln_final.hook_normalized"]
    names += [f"models.layers.*.{m}" for m in ("mlp.post", "self_attn.post", "mlp.pre", "self_attn.pre")]
    ok, refused = _available(model, names)
    out, probes = _capture(model, ok, inputs)

    # -- what each family refuses, and why
    for _name, why in refused.items():
        assert "is not available for" in why, why
    refused_sites = {n.split(".", 2)[2] for n in refused if n.startswith("blocks.")}
    expect_refused = set()
    if layout.parallel:
        expect_refused.add("hook_resid_mid")
    if layout.mlp_kind == "moe":
        expect_refused |= {"mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"}
    if layout.mlp_kind == "plain":
        expect_refused.add("mlp.hook_pre_linear")
    if layout.ln1 is None:
        expect_refused |= {"ln1.hook_normalized", "ln2.hook_normalized"}
    assert refused_sites == expect_refused

    hs = ref.hidden_states
    torch.set_grad_enabled(False)  # the module applications below
    for L in range(LAYERS):
        g = {s: out.get(f"blocks.{L}.{s}") for s in LAYER_SITES}
        raw = {m: out[f"models.layers.{L}.{m}"] for m in ("mlp.post", "self_attn.post", "mlp.pre", "self_attn.pre")}
        layer = model.get_submodule(probes[f"blocks.{L}.hook_resid_pre"].module_path)
        # residual stream against HF's hidden states (the last block's resid_post is before the final norm)
        torch.testing.assert_close(g["hook_resid_pre"], hs[L], rtol=0, atol=0)
        if L < LAYERS - 1:
            torch.testing.assert_close(g["hook_resid_post"], hs[L + 1], rtol=0, atol=0)
        # the residual identity of the block layout
        if layout.parallel:
            _close(g["hook_resid_pre"] + g["hook_attn_out"] + g["hook_mlp_out"], g["hook_resid_post"], "parallel sum")
            torch.testing.assert_close(g["hook_mlp_in"], g["hook_resid_pre"], rtol=0, atol=0)
        else:
            _close(g["hook_resid_pre"] + g["hook_attn_out"], g["hook_resid_mid"], "resid_mid")
            _close(g["hook_resid_mid"] + g["hook_mlp_out"], g["hook_resid_post"], "resid_post")
            torch.testing.assert_close(g["hook_mlp_in"], g["hook_resid_mid"], rtol=0, atol=0)
        # TransformerLens' attn_out/mlp_out differ from the raw module outputs exactly where the family
        # normalizes or scales a sublayer's output
        post = bool(layout.attn_post_norm or layout.residual_multiplier)
        assert torch.equal(g["hook_attn_out"], raw["self_attn.post"]) != post
        assert torch.equal(g["hook_mlp_out"], raw["mlp.post"]) != bool(
            layout.mlp_post_norm or layout.residual_multiplier
        )
        # weight identities: the output projection of z is the attention's output, the down projection of
        # mlp.hook_post is the MLP's output
        o_proj = getattr(
            model.get_submodule(probes[f"blocks.{L}.hook_attn_out"].module_path.rsplit(".", 1)[0] + "." + layout.attn),
            layout.o,
        )
        _close(o_proj(g["attn.hook_z"]), raw["self_attn.post"], "o_proj(z)", 1e-5)
        if layout.mlp_kind != "moe":
            mlp = getattr(layer, layout.mlp)
            _close(getattr(mlp, layout.mlp_down)(g["mlp.hook_post"]), raw["mlp.post"], "down(mlp.hook_post)", 1e-5)
            act = next(getattr(mlp, a) for a in ("act_fn", "act", "activation_fn") if hasattr(mlp, a))
            if layout.mlp_kind == "plain":
                _close(act(g["mlp.hook_pre"]), g["mlp.hook_post"], "act(pre)", 1e-5)
            else:
                _close(act(g["mlp.hook_pre"]) * g["mlp.hook_pre_linear"], g["mlp.hook_post"], "act(gate)*up", 1e-5)
        # norms: ln1 feeds attention, ln2 feeds the MLP
        if layout.ln1 is not None:
            torch.testing.assert_close(g["ln1.hook_normalized"], raw["self_attn.pre"], rtol=0, atol=0)
            torch.testing.assert_close(g["ln2.hook_normalized"], raw["mlp.pre"], rtol=0, atol=0)
        else:  # OLMo-2 feeds the raw stream to each sublayer
            torch.testing.assert_close(raw["self_attn.pre"], g["hook_resid_pre"], rtol=0, atol=0)
            torch.testing.assert_close(raw["mlp.pre"], g["hook_resid_mid"], rtol=0, atol=0)
        # attention: per-head shapes, the pattern is causal and normalized, pattern @ v = z
        B, T = inputs["input_ids"].shape
        H, KV = layout.n_heads, layout.n_kv_heads
        assert H == HEADS
        z = g["attn.hook_z"].view(B, T, H, -1)
        d_head = z.shape[-1]
        q, k, v = (g[f"attn.hook_{x}"].view(B, T, -1, d_head) for x in "qkv")
        assert q.shape[2] == H and k.shape[2] == KV and v.shape[2] == KV
        pattern = g["attn.hook_pattern"].view(B, T, H, T)
        rows = pattern.sum(-1)
        torch.testing.assert_close(rows[mask], torch.ones_like(rows[mask]), rtol=0, atol=1e-5)
        future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # [query, key]
        assert torch.all((pattern * future[None, :, None, :])[mask] == 0), "a real token attends ahead"
        vv = v.repeat_interleave(H // KV, dim=2)
        zz = torch.einsum("bqhk,bkhd->bqhd", pattern, vv)
        _close(zz[mask], z[mask], "pattern @ v", 1e-4)
        # q and k are what the model hands its rotary embedding (families with rotary and no q/k norm)
        if rotary and not hasattr(getattr(layer, layout.attn), "q_norm") and L < len(rotary):
            rq, rk = rotary[L]
            n = rq.shape[-1]
            heads_first = rq.shape[1] != T  # [B, H, T, d] (most) or [B, T, H, d] (GPT-J)
            _close((q.transpose(1, 2) if heads_first else q)[..., :n], rq, "q before rotary", 1e-5)
            _close((k.transpose(1, 2) if heads_first else k)[..., :n], rk, "k before rotary", 1e-5)
            checked_rotary = True
        if family == "gpt2":  # no rotary: the pattern is softmax(q k / sqrt(d_head)) under the causal mask
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d_head**0.5
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            keep = causal & mask[:, None, None, :]
            probs = scores.masked_fill(~keep, float("-inf")).softmax(-1).permute(0, 2, 1, 3)
            _close(probs[mask], pattern[mask], "gpt2 pattern from q, k", 1e-4)

    no_rotary_check = {"gpt2", "gptj", "qwen3", "gemma3", "olmo2"}  # no rotary, another rotary helper, q/k norms
    assert checked_rotary == (family not in no_rotary_check)

    # model-level sites
    torch.testing.assert_close(out["ln_final.hook_normalized"], hs[-1], rtol=0, atol=0)
    if family == "gpt2":
        wpe = model.transformer.wpe(torch.arange(inputs["input_ids"].shape[1]))
        _close(out["hook_embed"] + wpe, hs[0], "embed + pos_embed")
    else:
        _close(out["hook_embed"], hs[0], "hook_embed = resid_pre of block 0", 1e-6)

    # the worker's self-check passes on the real table
    report = self_check(model, expand_hooks(["blocks.*.hook_resid_post", "hook_embed"], LAYERS), inputs)
    assert report["max_rel_error"] < 1e-5 and report["layers"] == list(range(LAYERS))
