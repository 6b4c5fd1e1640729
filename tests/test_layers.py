"""Hook-name grammar (collector/layers.py) and activation capture (collector/capture.py) on a tiny random Llama.

What each site means on every family is tested in test_hook_families.py.
"""

from __future__ import annotations

import os

import pytest

from collector.capture import (
    ActivationCapture,
    SelfCheckError,
    expand_module_globs,
    find_decoder_layers,
    resolve_probes,
)
from collector.layers import HookSpec, check_hook_syntax, describe, expand_hooks
from collector.sites import RAW_SITES, SITES
from tests.modelfixtures import TINY_D_MODEL, TINY_LAYERS, make_tiny_llama_dir
from vaultsh.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def names(specs):
    return [s.name for s in specs]


# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "text,site,layer",
    [
        ("residuals_3", "hook_resid_pre", 3),
        ("blocks.3.hook_resid_pre", "hook_resid_pre", 3),
        ("blocks.3.hook_resid_mid", "hook_resid_mid", 3),
        ("blocks.3.hook_mlp_in", "hook_mlp_in", 3),
        ("blocks.3.hook_resid_post", "hook_resid_post", 3),
        ("mlp_3", "hook_mlp_out", 3),
        ("blocks.3.hook_mlp_out", "hook_mlp_out", 3),
        ("blocks.3.attn.hook_z", "attn.hook_z", 3),
        ("blocks.3.attn.hook_pattern", "attn.hook_pattern", 3),
        ("blocks.3.mlp.hook_pre_linear", "mlp.hook_pre_linear", 3),
        ("blocks.3.ln2.hook_normalized", "ln2.hook_normalized", 3),
        ("blocks.3.hook_mlp_post", "mlp.module_out", 3),
        ("models.layers.3.mlp.post", "mlp.module_out", 3),
        ("model.layers.3.mlp.post", "mlp.module_out", 3),
        ("attention_3", "hook_attn_out", 3),
        ("blocks.3.hook_attn_out", "hook_attn_out", 3),
        ("blocks.3.hook_attn_post", "attn.module_out", 3),
        ("models.layers.3.self_attn.post", "attn.module_out", 3),
        ("models.layers.3.mlp.pre", "mlp.module_in", 3),
        ("model.layers.3.mlp.pre", "mlp.module_in", 3),
        ("models.layers.3.self_attn.pre", "attn.module_in", 3),
        ("model.layers.3.self_attn.pre", "attn.module_in", 3),
    ],
)
def test_every_spelling_resolves_and_keeps_its_name(text, site, layer):
    assert expand_hooks([text], 4) == [HookSpec(text, site, layer)]


def test_all_expands_to_residuals():
    assert names(expand_hooks(["all"], 4)) == ["residuals_0", "residuals_1", "residuals_2", "residuals_3"]
    assert {s.site for s in expand_hooks(["all"], 4)} == {"hook_resid_pre"}


@pytest.mark.parametrize(
    "kind,site", [("residuals", "hook_resid_pre"), ("mlp", "hook_mlp_out"), ("attention", "hook_attn_out")]
)
def test_kind_all_and_ranges(kind, site):
    assert expand_hooks([f"{kind}_all"], 3) == [HookSpec(f"{kind}_{i}", site, i) for i in range(3)]
    assert expand_hooks([f"{kind}_1-2"], 4) == [HookSpec(f"{kind}_{i}", site, i) for i in (1, 2)]
    assert expand_hooks([f"{kind}_2-2"], 4) == [HookSpec(f"{kind}_2", site, 2)]


def test_layer_ranges_and_globs_in_transformerlens_names():
    assert names(expand_hooks(["blocks.1-2.attn.hook_z"], 4)) == ["blocks.1.attn.hook_z", "blocks.2.attn.hook_z"]
    specs = expand_hooks(["blocks.*.hook_resid_post"], 3)
    assert specs == [HookSpec(f"blocks.{i}.hook_resid_post", "hook_resid_post", i) for i in range(3)]
    assert names(expand_hooks(["models.layers.0-1.mlp.post"], 3)) == [
        "models.layers.0.mlp.post",
        "models.layers.1.mlp.post",
    ]
    assert expand_hooks(["hook_embed", "ln_final.hook_normalized"], 3) == [
        HookSpec("hook_embed", "hook_embed", None),
        HookSpec("ln_final.hook_normalized", "ln_final.hook_normalized", None),
    ]
    with pytest.raises(ConfigError, match=r"empty range"):
        expand_hooks(["blocks.3-1.hook_resid_pre"], 4)


def test_module_paths_parse():
    assert expand_hooks(["module:model.layers.3.mlp.down_proj"], 4) == [
        HookSpec("module:model.layers.3.mlp.down_proj", "module_out", None, "model.layers.3.mlp.down_proj")
    ]
    assert expand_hooks(["module:model.layers.3.mlp.down_proj:input"], 4)[0].site == "module_in"
    assert expand_hooks(["module:model.layers.*.mlp"], 4)[0].module == "model.layers.*.mlp"
    for bad in ("module:", "module:model..x", "module:model.layers.3:inputs", "module:__import__('os')"):
        with pytest.raises(ConfigError, match="is not a module path"):
            expand_hooks([bad], 4)


def test_mixed_lists_keep_order_and_drop_duplicates():
    specs = expand_hooks(
        ["residuals_0-1", "mlp_3", "residuals_1", "blocks.0.hook_resid_pre", "residuals_all", "attention_2", "mlp_all"],
        4,
    )
    assert names(specs) == [
        "residuals_0",
        "residuals_1",
        "mlp_3",
        "residuals_2",
        "residuals_3",
        "attention_2",
        "mlp_0",
        "mlp_1",
        "mlp_2",
    ]


def test_duplicates_across_spellings_keep_the_first_spelling():
    specs = expand_hooks(
        [
            "blocks.2.hook_resid_pre",
            "all",
            "models.layers.1.mlp.post",
            "blocks.1.hook_mlp_post",
            "mlp_1",
            "blocks.1.hook_mlp_out",
        ],
        3,
    )
    # the raw MLP output (Activault) and TransformerLens' hook_mlp_out are different sites, each kept once
    assert names(specs) == [
        "blocks.2.hook_resid_pre",
        "residuals_0",
        "residuals_1",
        "models.layers.1.mlp.post",
        "mlp_1",
    ]


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


@pytest.mark.parametrize(
    "hook, message",
    [
        (
            "blocks.4.hook_mlp_out",
            r"'blocks\.4\.hook_mlp_out' names layer 4 .* 4 layers \(0-3\); closest valid: blocks\.3\.hook_mlp_out",
        ),
        ("mlp_2-9", r"'mlp_2-9' names layers up to 9 .*closest valid: mlp_2-3"),
        (
            "blocks.2-9.attn.hook_z",
            r"'blocks\.2-9\.attn\.hook_z' names layers up to 9 .*closest valid: blocks\.2-3\.attn\.hook_z",
        ),
    ],
)
def test_out_of_range_in_a_4_layer_model_names_the_closest_valid(hook, message):
    with pytest.raises(ConfigError, match=message):
        expand_hooks([hook], 4)


def test_describe():
    d = describe(HookSpec("residuals_2", "hook_resid_pre", 2))
    assert d["site"] == "hook_resid_pre" and d["layer"] == 2 and "hidden_states[2]" in d["description"]
    assert d["vocabulary"] == "transformerlens"
    raw = describe(HookSpec("models.layers.1.mlp.post", "mlp.module_out", 1))
    assert raw["vocabulary"] == "module" and "raw output" in raw["description"]
    for site in list(SITES) + list(RAW_SITES):
        assert describe(HookSpec("x", site, 1, "a.b"))["description"]


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
    probes = resolve_probes(
        model,
        expand_hooks(
            [
                "mlp_1",
                "models.layers.1.mlp.pre",
                "models.layers.1.self_attn.pre",
                "blocks.1.hook_resid_post",
                "blocks.1.mlp.hook_post",
            ],
            TINY_LAYERS,
        ),
    )
    assert [(p.module, p.direction) for p in probes] == [
        (layers[1].mlp, "out"),
        (layers[1].mlp, "in"),
        (layers[1].self_attn, "in"),
        (layers[1], "out"),
        (layers[1].mlp.down_proj, "in"),
    ]
    assert probes[4].module_path == "model.layers.1.mlp.down_proj" and probes[0].family == "llama"
    with pytest.raises(ConfigError, match="cannot find the decoder layers"):
        import torch

        find_decoder_layers(torch.nn.Linear(2, 2))


def test_resid_pre_and_post_equal_hidden_states(tiny):
    import torch

    model, inputs, ref = tiny
    specs = expand_hooks(
        ["residuals_all", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
        TINY_LAYERS,
    )
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
    with ActivationCapture(model, [HookSpec("post", "hook_resid_post", last)]) as cap:
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
    specs = expand_hooks(
        [f"mlp_{L}", f"attention_{L}", f"models.layers.{L}.self_attn.pre", f"models.layers.{L}.mlp.pre"], TINY_LAYERS
    )
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


@pytest.mark.parametrize(
    "hooks,deepest",
    [(["residuals_1"], 1), (["mlp_0", "residuals_2"], 2), (["blocks.1.hook_resid_post", "attention_0"], 1)],
)
def test_stop_after_deepest_skips_later_layers_and_lm_head(tiny, hooks, deepest):
    model, inputs, ref = tiny
    calls = {}
    watch = {f"layer{i}": model.model.layers[i] for i in range(TINY_LAYERS)}
    watch.update(norm=model.model.norm, lm_head=model.lm_head)
    handles = [
        m.register_forward_hook(lambda mod, a, o, k=k: calls.__setitem__(k, calls.get(k, 0) + 1))
        for k, m in watch.items()
    ]
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
        with ActivationCapture(model, [HookSpec("residuals_0", "hook_resid_pre", 0)]):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before
    with pytest.raises(ConfigError, match=r"names layer 9 but the model has 4 layers"):
        ActivationCapture(
            model, [HookSpec("residuals_0", "hook_resid_pre", 0), HookSpec("x", "hook_resid_pre", 9)]
        ).attach()
    assert _hook_counts(model) == before
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        ActivationCapture(model, [HookSpec("residuals_0", "hook_resid_pre", 0)]).run(**inputs)


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
    specs = expand_hooks(
        [
            "models.layers.1.self_attn.pre",
            "models.layers.0.mlp.post",
            "module:transformer.h.0",
            "module:transformer.h.1:input",
        ],
        2,
    )
    with ActivationCapture(net, specs) as cap:
        out = cap.run(x=x)
    h0 = x + 2 * x
    torch.testing.assert_close(out["models.layers.0.mlp.post"], h0 + 1)
    torch.testing.assert_close(out["module:transformer.h.0"], h0 + h0 + 1)
    torch.testing.assert_close(out["module:transformer.h.1:input"], out["module:transformer.h.0"])
    torch.testing.assert_close(out["models.layers.1.self_attn.pre"], out["module:transformer.h.1:input"])
    # a TransformerLens name needs a known block layout: this architecture has none
    with pytest.raises(ConfigError, match=r"'mlp_0' is a TransformerLens name, .*use module: paths"):
        ActivationCapture(net, expand_hooks(["mlp_0"], 2)).attach()


def test_module_globs_expand_against_the_model_and_unknown_paths_name_the_closest(tiny):
    import torch

    model, inputs, _ = tiny
    specs = expand_module_globs(model, expand_hooks(["module:model.layers.*.mlp.down_proj:input"], TINY_LAYERS))
    assert names(specs) == [f"module:model.layers.{i}.mlp.down_proj:input" for i in range(TINY_LAYERS)]
    with ActivationCapture(model, specs + expand_hooks(["blocks.2.mlp.hook_post"], TINY_LAYERS)) as cap:
        out = cap.run(**inputs)
    torch.testing.assert_close(
        out["module:model.layers.2.mlp.down_proj:input"], out["blocks.2.mlp.hook_post"], rtol=0, atol=0
    )
    with pytest.raises(
        ConfigError,
        match=r"'module:model.layers.\*.mlp.dwn_proj' matches no module .*closest: "
        r"model.layers.0.mlp.down_proj",
    ):
        expand_module_globs(model, expand_hooks(["module:model.layers.*.mlp.dwn_proj"], TINY_LAYERS))
    with pytest.raises(ConfigError, match=r"names no module of LlamaForCausalLM; closest: model.layers.1.mlp.up_proj"):
        ActivationCapture(model, expand_hooks(["module:model.layers.1.mlp.upproj"], TINY_LAYERS)).attach()


def test_a_wrong_table_entry_stops_the_self_check(tiny, monkeypatch):
    """The self-check is what stands between a wrong table and wrong data: feed it a wrong entry."""
    import dataclasses

    import collector.capture as capture

    model, inputs, _ = tiny
    specs = expand_hooks(["blocks.1.hook_mlp_out"], TINY_LAYERS)
    report = capture.self_check(model, specs, inputs)
    assert report["family"] == "llama" and report["layers"] == [1] and report["max_rel_error"] < 1e-6
    real = capture.model_layout
    # Llama's hook_mlp_out is the MLP's output; claim it is the post-attention norm's output instead
    monkeypatch.setattr(
        capture, "model_layout", lambda m: dataclasses.replace(real(m), mlp_post_norm="post_attention_layernorm")
    )
    with pytest.raises(
        SelfCheckError,
        match=r"hook self-check failed on llama layer 1: hook_resid_mid \+ "
        r"hook_mlp_out = hook_resid_post is off by a relative error of",
    ):
        capture.self_check(model, specs, inputs)
