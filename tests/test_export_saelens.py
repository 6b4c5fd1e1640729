"""`vaultsh export RUN OUT --format saelens`: SAELens's cached-activations layout, equal to the store.

A run collected by the real worker from the tiny random Llama with the real
tokenizer (chat-templated pydoc text: added tokens and the default system
prompt are masked) is exported with the CLI; `datasets.load_from_disk` must
give exactly SAELens's features and the megabatches' values. With sae-lens
installed (in this interpreter, `$VAULTSH_SAELENS_PYTHON`, or `.venv-saelens`:
it needs TransformerLens < 4, see .ci/run and docs/training.md), SAELens itself loads the
export through its cached-activations path in a child process, estimates the
scaling factor, and trains a tiny SAE.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collector.config import load_config  # noqa: E402
from collector.worker import run_worker  # noqa: E402
from vaultsh.cli import main  # noqa: E402
from vaultsh.errors import FormatError, UserError  # noqa: E402
from vaultsh.events import EventSink  # noqa: E402
from vaultsh.export.saelens import MANIFEST, export_saelens, saelens_scaling_factor  # noqa: E402
from vaultsh.megabatch import read_megabatch, write_megabatch  # noqa: E402
from vaultsh.run import CommitRecord, FileRecord, Run, metadata_for  # noqa: E402
from vaultsh.store import LocalStore  # noqa: E402

from .modelfixtures import TINY_D_MODEL  # noqa: E402
from .saelensfixtures import run_with_saelens  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
SEQ = 32
RUN = "sl.chat"


@pytest.fixture(scope="module")
def collected(tiny_dir, tmp_path_factory):
    """(root, run name): 8 batches of 4 chat-templated sequences, 2 per megabatch upload, two hooks."""
    root = tmp_path_factory.mktemp("saelens-vault")
    cfg = load_config(
        {
            "run_name": RUN,
            "num_runs": 1,
            "transformer_config": {"model_name": str(tiny_dir), "dtype": "float32"},
            "data_config": {
                "data_key": "pydoc-chat",
                "n_batches": 8,
                "seq_length": SEQ,
                "batch_size": 4,
                "seed": 3,
                "clean_added_tokens": True,
                "clean_default_system_prompt": True,
            },
            "upload_config": {"batches_per_upload": 2, "hooks": HOOKS},
            "storage": {"uri": str(root)},
        }
    )
    assert run_worker(cfg, 0, sink=EventSink(0))["status"] == "complete"
    return root, RUN


def stored(root: Path, run: str, hook: str):
    """Every committed megabatch of the hook, concatenated in commit order: states, input_ids, mask."""
    store = LocalStore(root)
    mbs = [read_megabatch(store, f.key) for f in Run(store, run).committed_files(hook)]
    return (
        torch.cat([m.states for m in mbs]).float().numpy(),
        torch.cat([m.input_ids for m in mbs]).numpy(),
        torch.cat([m.mask for m in mbs]).numpy(),
    )


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["export", *map(str, argv), "-q"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def exported(collected, tmp_path_factory):
    root, run = collected
    out = tmp_path_factory.mktemp("saelens-out") / "out"
    rc = main(
        [
            "export",
            str(root / run),
            str(out),
            "--format",
            "saelens",
            "--hooks",
            ",".join(HOOKS),
            "--batches-per-shard",
            "2",
            "-q",
        ]
    )
    assert rc == 0
    return out


def test_layout_is_exactly_saelens_features(exported):
    import datasets
    from datasets import Array2D, Features, List, Value

    ds = datasets.load_from_disk(str(exported / "activations"))
    want = Features(
        {
            HOOKS[0]: Array2D(shape=(SEQ, TINY_D_MODEL), dtype="float32"),
            HOOKS[1]: Array2D(shape=(SEQ, TINY_D_MODEL), dtype="float32"),
            "token_ids": List(Value("int32"), length=SEQ),
        }
    )
    assert ds.features == want
    assert ds.column_names == HOOKS + ["token_ids"]
    assert ds.data.schema == want.arrow_schema  # loaded as written: no cast on load
    state = json.loads((exported / "activations" / "state.json").read_text())
    assert [f["filename"] for f in state["_data_files"]] == sorted(
        p.name for p in (exported / "activations").glob("*.arrow")
    )
    assert len(state["_data_files"]) == 2  # 4 megabatches, 2 per shard
    tokens = datasets.load_from_disk(str(exported / "tokens"))
    assert tokens.features == Features({"input_ids": List(Value("int32"), length=SEQ)})


def test_values_equal_the_store_for_every_hook(collected, exported):
    import datasets

    root, run = collected
    ds = datasets.load_from_disk(str(exported / "activations")).with_format("numpy")[:]
    tokens = datasets.load_from_disk(str(exported / "tokens")).with_format("numpy")[:]
    for hook in HOOKS:
        states, ids, _ = stored(root, run, hook)
        assert states.shape == (32, SEQ, TINY_D_MODEL)
        np.testing.assert_array_equal(ds[hook], states)
        np.testing.assert_array_equal(ds["token_ids"], ids.astype(np.int32))
    np.testing.assert_array_equal(tokens["input_ids"], ds["token_ids"])


def test_exclude_ids_and_the_masked_count_match_the_stored_mask(collected, exported):
    root, run = collected
    _, ids, mask = stored(root, run, HOOKS[0])
    m = json.loads((exported / MANIFEST).read_text())
    masked_ids, real_ids = set(ids[~mask].tolist()), set(ids[mask].tolist())
    assert m["exclude_token_ids"] == sorted(masked_ids - real_ids)
    assert m["masked_positions"]["total"] == int((~mask).sum()) > 0
    # masked positions SAELens cannot skip by id: those whose id also occurs unmasked
    kept = int(np.isin(ids[~mask], sorted(real_ids)).sum())
    assert m["masked_positions"]["kept_unexcludable"] == kept
    # skipping the listed ids never drops a real token and drops every other masked one
    skipped = np.isin(ids, m["exclude_token_ids"])
    assert not (skipped & mask).any() and int((skipped & ~mask).sum()) == int((~mask).sum()) - kept


def test_cli_warns_once_about_masked_positions(collected, tmp_path, capsys):
    root, run = collected
    rc, out, err = cli(capsys, root / run, tmp_path / "o", "--format", "saelens", "--hooks", HOOKS[0])
    assert rc == 0 and "exclude_special_tokens=[" in out
    assert err.count("masked position(s)") == 1 and "kept" in err


def test_run_hook_uri_without_hooks_exports_that_hook(collected, tmp_path):
    import datasets

    root, run = collected
    assert main(["export", str(root / run / HOOKS[1]), str(tmp_path / "o"), "--format", "saelens", "-q"]) == 0
    ds = datasets.load_from_disk(str(tmp_path / "o" / "activations"))
    assert ds.column_names == [HOOKS[1], "token_ids"]
    np.testing.assert_array_equal(ds.with_format("numpy")[:][HOOKS[1]], stored(root, run, HOOKS[1])[0])


def test_half_written_out_is_refused_by_datasets_and_resumed_by_a_rerun(collected, exported, tmp_path, capsys):
    import datasets

    root, run = collected
    out = tmp_path / "o"
    args = [root / run, out, "--format", "saelens", "--hooks", ",".join(HOOKS), "--batches-per-shard", "1"]
    rc, text, _ = cli(capsys, *args, "--max-shards", "1")
    assert rc == 0 and "shards left" in text
    with pytest.raises(FileNotFoundError):  # no state.json yet: not a dataset
        datasets.load_from_disk(str(out / "activations"))
    (out / "activations" / "data-00000-of-00004.arrow").write_bytes(b"cut short")  # a shard a crash cut short
    rc, text, _ = cli(capsys, *args)
    assert rc == 0 and text.startswith("resumed: wrote 4 shard(s)")
    a = datasets.load_from_disk(str(out / "activations")).with_format("numpy")[:]
    b = datasets.load_from_disk(str(exported / "activations")).with_format("numpy")[:]
    for col in HOOKS + ["token_ids"]:
        np.testing.assert_array_equal(a[col], b[col])
    rc, text, _ = cli(capsys, *args)  # complete: nothing to do
    assert rc == 0 and text.startswith("resumed: wrote 0 shard(s)")


def test_other_export_or_foreign_out_is_refused(collected, exported, tmp_path):
    root, run = collected
    with pytest.raises(UserError, match="holds another SAELens export"):
        export_saelens(str(root / run), str(exported), [HOOKS[0]], batches_per_shard=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no vaultsh SAELens export"):
        export_saelens(str(root / run), str(foreign), HOOKS)
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens"], "--tokens is not allowed with --format saelens"),
        (["--shuffle"], "--shuffle is not allowed with --format saelens"),
        (["--dtype", "bfloat16"], "Arrow has no bfloat16"),
        (["--hooks", "blocks.1.hook_resid_post,blocks.1.hook_resid_post"], "a hook is named twice"),
        (["--hooks", "blocks.9.hook_resid_post"], "blocks.9.hook_resid_post"),
    ],
)
def test_bad_options_are_one_line_errors(collected, tmp_path, capsys, argv, message):
    root, run = collected
    argv = argv if "--hooks" in argv else argv + ["--hooks", HOOKS[0]]
    rc, _, err = cli(capsys, root / run, tmp_path / "o", "--format", "saelens", *argv)
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "activations").exists() or not any((tmp_path / "o" / "activations").iterdir())


def test_s3_out_is_refused_and_s3_source_exports_equal(collected, s3_env, s3_store, tmp_path):
    import datasets

    root, run = collected
    for p in sorted((root / run).rglob("*")):
        if p.is_file():
            s3_store.put_bytes(p.relative_to(root).as_posix(), p.read_bytes())
    with pytest.raises(UserError, match="writes a local directory"):
        export_saelens(f"{s3_store.uri}/{run}", f"{s3_store.uri}/out", HOOKS)
    res = export_saelens(f"{s3_store.uri}/{run}", str(tmp_path / "o"), HOOKS, batches_per_shard=3)
    assert res.complete and res.sequences_written == 32 and res.shards_total == 2
    ds = datasets.load_from_disk(str(tmp_path / "o" / "activations")).with_format("numpy")[:]
    for hook in HOOKS:
        np.testing.assert_array_equal(ds[hook], stored(root, run, hook)[0])


# -- hooks that do not line up ---------------------------------------------------
def write_two_hook_run(store, run="r", hooks=("a", "b"), n_files=3, bad_ids_at=None, missing_at=None):
    """A committed two-hook run of random megabatches; optionally one token differs, or one file is missing."""
    r = Run(store, run)
    g = torch.Generator().manual_seed(0)
    for h in hooks:
        r.write_metadata(
            h, metadata_for(batch_size=2, sequence_length=5, d_in=4, hook=h, site="resid_pre", layer=0, model="m")
        )
    for i in range(n_files):
        ids = torch.randint(0, 1000, (2, 5), generator=g)
        mask = torch.ones(2, 5, dtype=torch.bool)
        recs = {}
        for h in hooks:
            if missing_at == (h, i):
                continue
            mine = ids.clone()
            if bad_ids_at == (h, i):
                mine[1, 3] += 1
            key = r.megabatch_key(h, 0, i)
            size = write_megabatch(store, key, torch.randn(2, 5, 4, generator=g), mine, mask)
            recs[h] = FileRecord(h, key, size, None, 2, 10, 0, i)
        r.commit(CommitRecord(0, i, i, i + 1, recs, tokens=10))


@pytest.mark.parametrize(
    "flaw,match",
    [
        (
            dict(bad_ids_at=("b", 1)),  # a token differs
            r"b/w0000--0000001\.safetensors and .*a/w0000--0000001\.safetensors do not hold the same tokens "
            r"\(sequence 1, position 3",
        ),
        (
            dict(missing_at=("b", 2)),  # a megabatch one hook lacks
            r"a/w0000--0000002\.safetensors has no committed counterpart in .*/b \(worker 0, megabatch 2\)",
        ),
    ],
    ids=["different-tokens", "missing-megabatch"],
)
def test_unaligned_hooks_are_refused_naming_file_and_position(tmp_path, flaw, match):
    write_two_hook_run(LocalStore(tmp_path / "v"), **flaw)
    with pytest.raises(FormatError, match=match):
        export_saelens(str(tmp_path / "v" / "r"), str(tmp_path / "o"), ["a", "b"])
    assert not list((tmp_path / "o" / "activations").glob("*.arrow"))


# -- the scaling factor ------------------------------------------------------------
def test_scaling_factor_is_sqrt_d_over_numpy_mean_norm_of_stored_tokens(collected):
    root, run = collected
    for hook in HOOKS:
        states, _, mask = stored(root, run, hook)
        x = states.astype(np.float64)[mask]
        want = math.sqrt(TINY_D_MODEL) / np.linalg.norm(x, axis=1).mean()
        assert saelens_scaling_factor(str(root / run), hook) == pytest.approx(want, rel=1e-9)


def test_scaling_factor_without_statistics_is_a_clear_error(tmp_path):
    store = LocalStore(tmp_path / "v")
    write_two_hook_run(store)
    with pytest.raises(UserError, match=r"no statistics for hook 'a' \(run `vaultsh finalize"):
        saelens_scaling_factor(str(tmp_path / "v" / "r"), "a")


# -- SAELens itself ------------------------------------------------------------------
@pytest.fixture(scope="module")
def saelens_run(collected, exported, tmp_path_factory):
    root, run = collected
    m = json.loads((exported / MANIFEST).read_text())
    factor = saelens_scaling_factor(str(root / run), HOOKS[0])
    mask_path = tmp_path_factory.mktemp("saelens-mask") / "mask.npy"
    np.save(mask_path, stored(root, run, HOOKS[0])[2])
    exclude = json.dumps(m["exclude_token_ids"])
    args = (exported, HOOKS[0], TINY_D_MODEL, SEQ, exclude, repr(factor), 60, mask_path)
    return run_with_saelens("saelens_check.py", *args, marker="SAELENS-RESULT"), m


def test_saelens_cached_path_reads_the_stored_values(collected, saelens_run):
    res, m = saelens_run
    root, run = collected
    states, ids, mask = stored(root, run, HOOKS[0])
    assert res["columns"] == sorted(HOOKS + ["token_ids"])
    np.testing.assert_array_equal(
        np.array(res["first_raw_batch"], dtype=np.float32), states[:2].reshape(-1, TINY_D_MODEL)
    )
    # its special-token filter with our exclude ids keeps the real tokens plus the masked ones no id can skip
    keep = ~np.isin(ids, m["exclude_token_ids"])
    assert res["filtered_tokens"] == int(keep.sum()) == int(mask.sum()) + m["masked_positions"]["kept_unexcludable"]
    np.testing.assert_allclose(res["filtered_sum"], states.astype(np.float64)[keep].sum(0), rtol=1e-6, atol=1e-6)


def test_scaling_factor_equals_saelens_estimate_on_the_same_tokens(collected, saelens_run):
    res, m = saelens_run
    root, run = collected
    states, ids, mask = stored(root, run, HOOKS[0])
    assert res["raw_tokens"] == mask.size  # one ordered pass over every stored position
    # SAELens's ActivationScaler over the stored unmasked tokens (what statistics.json covers) ...
    assert res["scaling_factor_on_mask"] == pytest.approx(saelens_scaling_factor(str(root / run), HOOKS[0]), rel=1e-6)
    # ... and over what its filter keeps, against numpy over the same tokens
    keep = ~np.isin(ids, m["exclude_token_ids"])
    ours = math.sqrt(TINY_D_MODEL) / np.linalg.norm(states.astype(np.float64)[keep], axis=1).mean()
    assert res["scaling_factor"] == pytest.approx(ours, rel=1e-6)


def test_a_tiny_sae_trains_from_the_export_and_its_loss_goes_down(saelens_run):
    res, _ = saelens_run
    losses = res["losses"]
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_a_tiny_sae_trains_from_the_reader_adapter_without_an_export(collected):
    """SAELens's SAETrainer pulls `next()` from `reader.as_data_provider()`: endless, bare [64, d_in] tensors."""
    root, run = collected
    res = run_with_saelens(
        "saelens_check.py", "--adapter", root / run, HOOKS[0], TINY_D_MODEL, 60, marker="SAELENS-RESULT"
    )
    losses = res["losses"]
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert res["epochs"] >= 1  # 60 x 64 tokens is more than one pass over the tiny run: the provider kept going


def test_the_docs_transformerlens_route_reproduces_the_stored_activations(tiny_dir, collected):
    """docs/training.md: `from_pretrained_no_processing` refuses a local path; the documented route loads the
    same model into a HookedSAETransformer (for SAELens's evals) whose activations equal the store's."""
    root, run = collected
    res = run_with_saelens("saelens_tl_check.py", tiny_dir, root / run, HOOKS[0], marker="SAELENS-TL")
    assert "not found" in res["refused"]  # the reason the docs give a route at all
    assert res["tokens"] == int(stored(root, run, HOOKS[0])[2].sum()) > 0
    assert res["max_rel_error"] < 1e-4
    snippet = (ROOT / "docs" / "training.md").read_text()
    for line in (
        'cfg = loading.get_pretrained_model_config(path, dtype=torch.float32, device="cpu", fold_ln=False)',
        "model = HookedSAETransformer(cfg, tokenizer)",
    ):
        assert line in snippet  # the docs show the route this test runs
