"""Run SAELens itself on a `vaultsh export --format saelens` directory; print what it saw as JSON.

Run by tests/test_export_saelens.py with an interpreter that has sae-lens
(which needs TransformerLens < 4: see docs/export.md), in a process of its own:

    python tests/saelens_check.py OUT HOOK D_IN CONTEXT EXCLUDE_IDS_JSON SCALING_FACTOR STEPS MASK_NPY

1. `ActivationsStore.from_config` with `use_cached_activations=True`,
   `cached_activations_path=OUT/activations` and
   `override_dataset=load_from_disk(OUT/tokens)`: SAELens's own cached path;
2. one pass over the cache in order (SAELens's special-token filter applied),
   and SAELens's `ActivationScaler` estimate over exactly those tokens, and
   over the raw pass restricted to the stored mask (MASK_NPY, [rows, T] bool):
   the tokens vaultsh's statistics cover;
3. a tiny standard SAE trained by SAELens's `SAETrainer` for STEPS steps on
   that store, with `activation_scaler.scaling_factor` set to ours; the loss
   of every step.
"""

from __future__ import annotations

import json
import sys
import warnings


def fit_recording_losses(trainer) -> list[float]:
    """Run `trainer.fit()`; the loss of every training step."""
    losses: list[float] = []
    step = trainer._train_step

    def recording_step(sae, sae_in):
        res = step(sae, sae_in)
        losses.append(float(res.loss.detach()))
        return res

    trainer._train_step = recording_step
    trainer.fit()
    return losses


def runner_config(hook: str, d_in: int, steps: int, **data):
    """The SAELens config both checks train with: a standard SAE of 2 x d_in latents, `steps` steps of 64
    tokens on the CPU, nothing logged or saved; `data` holds the options of where the activations come from."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig

    return LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=d_in, d_sae=2 * d_in, l1_coefficient=1e-3, normalize_activations="expected_average_only_in"
        ),
        hook_name=hook,
        train_batch_size_tokens=64,
        training_tokens=64 * steps,
        lr=3e-3,
        device="cpu",
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        save_final_checkpoint=False,
        checkpoint_path=None,
        output_path=None,
        verbose=False,
        **data,
    )


def main(argv: list[str]) -> dict:
    import numpy as np
    import torch
    from datasets import load_from_disk
    from sae_lens import StandardTrainingSAE
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    out, hook, d_in, context, exclude, factor, steps, mask_path = argv
    d_in, context, steps, factor = int(d_in), int(context), int(steps), float(factor)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    batch_prompts = 2
    cfg = runner_config(
        hook,
        d_in,
        steps,
        context_size=context,
        use_cached_activations=True,
        cached_activations_path=f"{out}/activations",
        is_dataset_tokenized=True,
        streaming=False,
        store_batch_size_prompts=batch_prompts,
        n_batches_in_buffer=2,
        exclude_special_tokens=json.loads(exclude),
    )
    tokens = load_from_disk(f"{out}/tokens")

    # 1-2: one ordered pass over the cache, filtered as SAELens filters it
    store = ActivationsStore.from_config(None, cfg, override_dataset=tokens)
    first_raw, _ = store.get_raw_llm_batch()
    store.current_row_idx = 0
    batches = []
    while True:
        try:
            batches.append(store.get_filtered_llm_batch(raise_on_epoch_end=True))
        except StopIteration:
            break
    acts = torch.cat(batches).double()
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(d_in, iter(batches), len(batches))
    store.current_row_idx = 0
    raw = []
    while True:
        try:
            raw.append(store.get_raw_llm_batch(raise_on_epoch_end=True)[0])
        except StopIteration:
            break
    mask = torch.from_numpy(np.load(mask_path).reshape(-1))
    masked = torch.cat(raw)[: len(mask)][mask[: sum(len(r) for r in raw)]]
    on_mask = ActivationScaler()
    on_mask.estimate_scaling_factor(d_in, iter(masked.split(64)), len(masked.split(64)))

    # 3: train from a fresh store through SAELens's trainer
    store = ActivationsStore.from_config(None, cfg, override_dataset=tokens)
    sae = StandardTrainingSAE(cfg.sae)
    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=store)
    trainer.activation_scaler.scaling_factor = factor
    losses = fit_recording_losses(trainer)
    return {
        "columns": sorted(store.cached_activation_dataset.column_names),
        "first_raw_batch": first_raw[: context * batch_prompts].tolist(),
        "filtered_tokens": int(acts.shape[0]),
        "filtered_sum": acts.sum(0).tolist(),
        "scaling_factor": float(scaler.scaling_factor),
        "scaling_factor_on_mask": float(on_mask.scaling_factor),
        "raw_tokens": int(sum(len(r) for r in raw)),
        "losses": losses,
    }


def adapter(argv: list[str]) -> dict:
    """SAELens's SAETrainer fed by `ActivationReader.as_data_provider()` straight from the store (no export).

    python tests/saelens_check.py --adapter RUN_DIR HOOK D_IN STEPS
    """
    import torch
    from sae_lens import StandardTrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    from vaultsh.export.saelens import saelens_scaling_factor
    from vaultsh.reader import ActivationReader

    run, hook, d_in, steps = argv
    d_in, steps = int(d_in), int(steps)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = runner_config(hook, d_in, steps, context_size=8)
    reader = ActivationReader(
        f"{run}/{hook}", tokens=True, batch_size=64, drop_last=True, shuffle=True, shuffle_buffer=2
    )
    trainer = SAETrainer(
        cfg=cfg.to_sae_trainer_config(), sae=StandardTrainingSAE(cfg.sae), data_provider=reader.as_data_provider()
    )
    trainer.activation_scaler.scaling_factor = saelens_scaling_factor(run, hook)
    losses = fit_recording_losses(trainer)
    return {"losses": losses, "epochs": reader.epoch, "tokens_per_pass": reader.stats.tokens}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--adapter"]:
        print("SAELENS-RESULT " + json.dumps(adapter(sys.argv[2:])))
    else:
        print("SAELENS-RESULT " + json.dumps(main(sys.argv[1:])))
