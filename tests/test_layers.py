"""Hook-name grammar and activation capture (collector/layers.py) on a tiny random Llama."""

from __future__ import annotations

import os

import pytest

from collector.layers import (
    SITES,
    ActivationCapture,
    HookSpec,
    check_hook_syntax,
    describe,
    expand_hooks,
    find_decoder_layers,
    submodule_for,
)
from tests.modelfixtures import TINY_D_MODEL, TINY_LAYERS, make_tiny_llama_dir
from vaultsh.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def names(specs):
    return [s.name for s in specs]


# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "text,site,layer",
    [
        ("residuals_3", "resid_pre", 3),
        ("blocks.3.hook_resid_pre", "resid_pre", 3),
        ("blocks.3.hook_resid_post", "resid_post", 3),
        ("mlp_3", "mlp_out", 3),
        ("blocks.3.hook_mlp_out", "mlp_out", 3),
        ("blocks.3.hook_mlp_post", "mlp_out", 3),
        ("models.layers.3.mlp.post", "mlp_out", 3),
        ("model.layers.3.mlp.post", "mlp_out", 3),
        ("attention_3", "attn_out", 3),
        ("blocks.3.hook_attn_out", "attn_out", 3),
        ("blocks.3.hook_attn_post", "attn_out", 3),
        ("models.layers.3.self_attn.post", "attn_out", 3),
        ("models.layers.3.mlp.pre", "mlp_in", 3),
        ("model.layers.3.mlp.pre", "mlp_in", 3),
        ("models.layers.3.self_attn.pre", "attn_in", 3),
        ("model.layers.3.self_attn.pre", "attn_in", 3),
    ],
)
def test_every_spelling_resolves_and_keeps_its_name(text, site, layer):
    assert expand_hooks([text], 4) == [HookSpec(text, site, layer)]


def test_all_expands_to_residuals():
    assert names(expand_hooks(["all"], 4)) == ["residuals_0", "residuals_1", "residuals_2", "residuals_3"]
    assert {s.site for s in expand_hooks(["all"], 4)} == {"resid_pre"}


@pytest.mark.parametrize("kind,site", [("residuals", "resid_pre"), ("mlp", "mlp_out"), ("attention", "attn_out")])
def test_kind_all_and_ranges(kind, site):
    assert expand_hooks([f"{kind}_all"], 3) == [HookSpec(f"{kind}_{i}", site, i) for i in range(3)]
    assert expand_hooks([f"{kind}_1-2"], 4) == [HookSpec(f"{kind}_{i}", site, i) for i in (1, 2)]
    assert expand_hooks([f"{kind}_2-2"], 4) == [HookSpec(f"{kind}_2", site, 2)]


def test_mixed_lists_keep_order_and_drop_duplicates():
    specs = expand_hooks(
        ["residuals_0-1", "mlp_3", "residuals_1", "blocks.0.hook_resid_pre", "residuals_all", "attention_2", "mlp_all"],
        4,
    )
    assert names(specs) == [
        "residuals_0", "residuals_1", "mlp_3", "residuals_2", "residuals_3", "attention_2",
        "mlp_0", "mlp_1", "mlp_2",
    ]


def test_duplicates_across_spellings_keep_the_first_spelling():
    specs = expand_hooks(["blocks.2.hook_resid_pre", "all", "models.layers.1.mlp.post", "mlp_1"], 3)
    assert names(specs) == ["blocks.2.hook_resid_pre", "residuals_0", "residuals_1", "models.layers.1.mlp.post"]


def test_syntax_check_without_model():
    reqs = check_hook_syntax(["all", "residuals_0-31", "mlp_5", "blocks.7.hook_resid_post"])
    assert [r.text for r in reqs] == ["all", "residuals_0-31", "mlp_5", "blocks.7.hook_resid_post"]
    with pytest.raises(ConfigError, match=r"'residual_5' is not a known hook name; did you mean 'residuals_5'"):
        check_hook_syntax(["residual_5"])
    with pytest.raises(ConfigError, match=r"'blocks\.36\.hook_resid_pst' .*did you mean 'blocks\.36\.hook_resid_post'"):
        check_hook_syntax(["blocks.36.hook_resid_pst"])
    with pytest.raises(ConfigError, match=r"'residuals_9-3' is an empty range"):
        check_hook_syntax(["residuals_9-3"])
    with pytest.raises(ConfigError, match=r"no hooks given"):
        check_hook_syntax([])
    with pytest.raises(ConfigError, match=r"^activation_layers: 'layer5' is not a known hook name \(accepted: "):
        check_hook_syntax(["layer5"], {"layer5": "activation_layers"})


def test_out_of_range_names_layer_count_and_closest():
    with pytest.raises(ConfigError) as ei:
        expand_hooks(["residuals_40"], 30, "upload_config.hooks")
    assert str(ei.value) == (
        "upload_config.hooks: 'residuals_40' names layer 40 but the model has 30 layers (0-29); "
        "closest valid: residuals_29"
    )
    with pytest.raises(ConfigError, match=r"'blocks\.4\.hook_mlp_out' names layer 4 .* 4 layers \(0-3\); closest valid: blocks\.3\.hook_mlp_out"):
        expand_hooks(["blocks.4.hook_mlp_out"], 4)
    with pytest.raises(ConfigError, match=r"'mlp_2-9' names layers up to 9 .*closest valid: mlp_2-3"):
        expand_hooks(["mlp_2-9"], 4)


def test_describe():
    d = describe(HookSpec("residuals_2", "resid_pre", 2))
    assert d["site"] == "resid_pre" and d["layer"] == 2 and "hidden_states[2]" in d["description"]
    assert set(SITES) == {"resid_pre", "resid_post", "attn_in", "attn_out", "mlp_in", "mlp_out"}
    for site in SITES:
        assert describe(HookSpec("x", site, 1))["description"]


# --------------------------------------------------------------------------- capture on a tiny Llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    d = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return model, {"input_ids": ids, "attention_mask": mask}, ref


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_find_layers_and_submodules(tiny):
    model, _, _ = tiny
    layers = find_decoder_layers(model)
    assert layers is model.model.layers and len(layers) == TINY_LAYERS
    assert submodule_for(layers[1], "mlp_out") is layers[1].mlp
    assert submodule_for(layers[1], "mlp_in") is layers[1].mlp
    assert submodule_for(layers[1], "attn_in") is layers[1].self_attn
    assert submodule_for(layers[1], "resid_post") is layers[1]
    with pytest.raises(ConfigError, match="cannot find the decoder layers"):
        import torch

        find_decoder_layers(torch.nn.Linear(2, 2))


def test_resid_pre_and_post_equal_hidden_states(tiny):
    import torch

    model, inputs, ref = tiny
    specs = expand_hooks(["residuals_all", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                          "blocks.2.hook_resid_post"], TINY_LAYERS)
    with ActivationCapture(model, specs, stop_after_deepest=False) as cap:
        out = cap.run(**inputs)
    for L in range(TINY_LAYERS):
        assert out[f"residuals_{L}"].shape == (2, 9, TINY_D_MODEL)
        torch.testing.assert_close(out[f"residuals_{L}"], ref.hidden_states[L], rtol=0, atol=0)
    for L in range(TINY_LAYERS - 1):
        torch.testing.assert_close(out[f"blocks.{L}.hook_resid_post"], ref.hidden_states[L + 1], rtol=0, atol=0)


def test_last_layer_resid_post_is_before_the_final_norm(tiny):
    import torch

    model, inputs, ref = tiny
    last = TINY_LAYERS - 1
    with ActivationCapture(model, [HookSpec("post", "resid_post", last)]) as cap:
        out = cap.run(**inputs)
    assert not torch.allclose(out["post"], ref.hidden_states[-1])  # HF's last entry is final-normed
    torch.testing.assert_close(model.model.norm(out["post"]), ref.hidden_states[-1])


def test_module_outputs_and_inputs_match_manual_hooks(tiny):
    import torch

    model, inputs, _ = tiny
    L = 2
    layer = model.model.layers[L]
    seen = {}
    manual = [
        layer.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp_out", o)),
        layer.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn_out", o[0])),
        layer.input_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("attn_in", o)),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp_in", o)),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in manual:
            h.remove()
    specs = expand_hooks([f"mlp_{L}", f"attention_{L}", f"models.layers.{L}.self_attn.pre",
                          f"models.layers.{L}.mlp.pre"], TINY_LAYERS)
    with ActivationCapture(model, specs) as cap:
        out = cap.run(**inputs)
    torch.testing.assert_close(out[f"mlp_{L}"], seen["mlp_out"], rtol=0, atol=0)
    torch.testing.assert_close(out[f"attention_{L}"], seen["attn_out"], rtol=0, atol=0)
    # pre-hooks: HF passes hidden_states to self_attn as a keyword argument
    assert out[f"models.layers.{L}.self_attn.pre"].shape == (2, 9, TINY_D_MODEL)
    torch.testing.assert_close(out[f"models.layers.{L}.self_attn.pre"], seen["attn_in"], rtol=0, atol=0)
    assert out[f"models.layers.{L}.mlp.pre"].shape == (2, 9, TINY_D_MODEL)
    torch.testing.assert_close(out[f"models.layers.{L}.mlp.pre"], seen["mlp_in"], rtol=0, atol=0)
    assert not out[f"mlp_{L}"].requires_grad


@pytest.mark.parametrize("hooks,deepest", [(["residuals_1"], 1), (["mlp_0", "residuals_2"], 2),
                                           (["blocks.1.hook_resid_post", "attention_0"], 1)])
def test_stop_after_deepest_skips_later_layers_and_lm_head(tiny, hooks, deepest):
    model, inputs, ref = tiny
    calls = {}
    watch = {f"layer{i}": model.model.layers[i] for i in range(TINY_LAYERS)}
    watch.update(norm=model.model.norm, lm_head=model.lm_head)
    handles = [m.register_forward_hook(lambda mod, a, o, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
               for k, m in watch.items()]
    try:
        specs = expand_hooks(hooks, TINY_LAYERS)
        with ActivationCapture(model, specs) as cap:
            out = cap.run(**inputs)
            assert cap.stopped
            out2 = cap.run(**inputs)  # reusable across batches
    finally:
        for h in handles:
            h.remove()
    assert set(out) == set(out2) == set(hooks)
    assert calls.get("lm_head", 0) == 0 and calls.get("norm", 0) == 0
    for i in range(deepest + 1, TINY_LAYERS):
        assert calls.get(f"layer{i}", 0) == 0, f"layer {i} ran"
    for i in range(deepest):
        assert calls.get(f"layer{i}", 0) == 2


def test_without_stop_the_whole_model_runs(tiny):
    model, inputs, _ = tiny
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with ActivationCapture(model, expand_hooks(["residuals_0"], TINY_LAYERS), stop_after_deepest=False) as cap:
            cap.run(**inputs)
            assert not cap.stopped
    finally:
        h.remove()
    assert calls == [1]


def test_hooks_removed_on_exit_even_after_errors(tiny):
    model, inputs, _ = tiny
    before = _hook_counts(model)
    with ActivationCapture(model, expand_hooks(["all", "mlp_all", "models.layers.1.self_attn.pre"], TINY_LAYERS)):
        assert _hook_counts(model) == before + 2 * TINY_LAYERS + 1
    assert _hook_counts(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(model, [HookSpec("residuals_0", "resid_pre", 0)]):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before
    with pytest.raises(ConfigError, match=r"names layer 9 but the model has 4 layers"):
        ActivationCapture(model, [HookSpec("residuals_0", "resid_pre", 0), HookSpec("x", "resid_pre", 9)]).attach()
    assert _hook_counts(model) == before
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        ActivationCapture(model, [HookSpec("residuals_0", "resid_pre", 0)]).run(**inputs)


def test_capture_works_when_hidden_states_passed_positionally():
    """GPT-2 style blocks receive hidden_states positionally; pre-hooks must read args too."""
    import torch

    class Attn(torch.nn.Module):
        def forward(self, hidden_states, mask=None):
            return (hidden_states * 2, None)

    class MLP(torch.nn.Module):
        def forward(self, x):
            return x + 1

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Attn(), MLP()

        def forward(self, h):
            h = h + self.attn(h)[0]
            return (h + self.mlp(h),)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.Module()
            self.transformer.h = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, use_cache=False):
            for b in self.transformer.h:
                x = b(x)[0]
            return x

    net = Net()
    x = torch.ones(1, 2, 3)
    specs = expand_hooks(["models.layers.1.self_attn.pre", "mlp_0", "blocks.0.hook_resid_post", "residuals_1"], 2)
    with ActivationCapture(net, specs) as cap:
        out = cap.run(x=x)
    h0 = x + 2 * x
    torch.testing.assert_close(out["mlp_0"], h0 + 1)
    torch.testing.assert_close(out["blocks.0.hook_resid_post"], h0 + h0 + 1)
    torch.testing.assert_close(out["residuals_1"], out["blocks.0.hook_resid_post"])
    torch.testing.assert_close(out["models.layers.1.self_attn.pre"], out["residuals_1"])
