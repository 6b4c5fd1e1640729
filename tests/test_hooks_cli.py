"""`vaultsh hooks`: every hook point with its shape, from the meta device, equal to what a real capture gives."""

from __future__ import annotations

import json
import os

import pytest

from collector.capture import ActivationCapture
from collector.layers import expand_hooks
from tests.familyfixtures import build, config_for, tokenizer
from tests.modelfixtures import TINY_LAYERS, make_tiny_llama_dir
from vaultsh.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


def hooks_json(capsys, *argv):
    rc = main(["hooks", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_every_listed_shape_is_what_a_real_capture_stores(tiny_dir, capsys):
    from transformers import AutoModelForCausalLM

    got = hooks_json(capsys, tiny_dir, "--seq-length", "9")
    assert got["family"] == "llama" and got["block"] == "sequential" and got["n_layers"] == TINY_LAYERS
    names = [r["name"] for r in got["hooks"]]
    assert len(names) == 2 + 16 * TINY_LAYERS and not got["refused"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.randint(0, 100, (2, 9))
    with ActivationCapture(model, expand_hooks(names, TINY_LAYERS), stop_after_deepest=False) as cap:
        out = cap.run(input_ids=ids, attention_mask=torch.ones_like(ids))
    for r in got["hooks"]:
        assert out[r["name"]].shape == (2, 9, r["width"]), r["name"]
        assert r["bytes_per_token"] == r["width"] * 4  # the model's float32
    z = next(r for r in got["hooks"] if r["name"] == "blocks.2.attn.hook_z")
    assert (
        z["axes"] == ["head", "d_head"] and z["shape"] == [4, 16] and z["module"] == "model.layers.2.self_attn.o_proj"
    )


def test_filter_modules_and_dtype(tiny_dir, capsys):
    got = hooks_json(capsys, tiny_dir, "--filter", "module:model.layers.1.mlp.*", "--modules", "--dtype", "bfloat16")
    assert [r["name"] for r in got["hooks"]] == [
        f"module:model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj", "act_fn")
    ]
    assert [r["bytes_per_token"] for r in got["hooks"]] == [256, 256, 128, 256]
    rc = main(["hooks", str(tiny_dir), "--filter", "blocks.0.attn.*"])
    out = capsys.readouterr().out
    assert rc == 0 and "blocks.0.attn.hook_q" in out and "head 4 x d_head 16" in out and "hook_resid" not in out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = tokenizer()

    def save(family):
        d = tmp_path_factory.mktemp(family)
        config_for(family, len(tok)).save_pretrained(d)
        return d

    return save


def test_a_parallel_family_refuses_resid_mid_with_the_reason(saved, capsys):
    got = hooks_json(capsys, saved("gpt_neox"), "--filter", "blocks.0.*")
    assert got["block"] == "parallel"
    assert set(got["refused"]) == {"blocks.0.hook_resid_mid", "blocks.0.mlp.hook_pre_linear"}
    assert "its blocks are parallel" in got["refused"]["blocks.0.hook_resid_mid"]
    assert "not gated" in got["refused"]["blocks.0.mlp.hook_pre_linear"]
    assert {r["name"] for r in got["hooks"]} >= {"blocks.0.hook_mlp_in", "blocks.0.attn.hook_q"}


def test_an_unknown_family_lists_modules_only(tmp_path, capsys):
    from transformers import OPTConfig

    OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100, word_embed_proj_dim=32
    ).save_pretrained(tmp_path)
    got = hooks_json(capsys, tmp_path, "--modules", "--filter", "*layers.0.fc*")
    assert got["family"] is None
    assert [r["name"] for r in got["hooks"]] == [
        "module:model.decoder.layers.0.fc1",
        "module:model.decoder.layers.0.fc2",
    ]
    got = hooks_json(capsys, tmp_path, "--filter", "blocks.0.hook_resid_post")
    assert got["hooks"] == [] and "vaultsh does not know the block layout" in got["refused"]["blocks.0.hook_resid_post"]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["hooks", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaultsh: error: model") and "\n" not in err


def test_meta_shapes_equal_real_shapes_on_other_families():
    """The meta-device pass that sizes hooks agrees with a real forward on fused and parallel layouts too."""
    from collector.capture import meta_model, shapes_on_meta

    names = [
        "blocks.1.attn.hook_q",
        "blocks.1.attn.hook_k",
        "blocks.1.mlp.hook_post",
        "blocks.1.attn.hook_pattern",
        "blocks.1.mlp.hook_pre",
    ]
    for family in ("falcon_new", "phi3", "gpt2"):
        model = build(family, 300)
        sized = shapes_on_meta(meta_model(model.config), expand_hooks(names, 3), 7)
        ids = torch.randint(0, 300, (1, 7))
        with ActivationCapture(model, expand_hooks(names, 3)) as cap:
            out = cap.run(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert {p.spec.name: w for p, w in sized} == {k: v.shape[-1] for k, v in out.items()}, family
