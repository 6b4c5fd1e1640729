"""The route docs/training.md gives for loading a local model into TransformerLens for SAELens's evals.

Run by tests/test_export_saelens.py with the sae-lens interpreter (it needs
TransformerLens < 4), in a process of its own:

    python tests/saelens_tl_check.py MODEL_DIR RUN_DIR HOOK

Loads MODEL_DIR exactly as the docs do (`load_hooked_sae_transformer`, the
same lines as the docs' snippet), checks that `from_pretrained_no_processing`
itself refuses the local path (the reason for the route), runs the model over
the stored `input_ids` of every committed megabatch of RUN_DIR/HOOK and prints
the largest difference at unmasked positions between TransformerLens's
`run_with_cache` and the stored activations, as one JSON line.
"""

from __future__ import annotations

import json
import sys
import warnings


def load_hooked_sae_transformer(path: str):
    # -- the snippet of docs/training.md, verbatim --------------------------------------------
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from sae_lens import HookedSAETransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = loading.get_pretrained_model_config(path, dtype=torch.float32, device="cpu", fold_ln=False)
    model = HookedSAETransformer(cfg, tokenizer)
    model.load_and_process_state_dict(
        loading.get_pretrained_state_dict(path, cfg, hf_model, dtype=torch.float32),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )  # = from_pretrained_no_processing
    return model
    # -----------------------------------------------------------------------------------------


def main(model_dir: str, run_dir: str, hook: str) -> dict:
    import torch
    from transformer_lens import HookedTransformer

    from vaultsh.megabatch import read_megabatch
    from vaultsh.run import Run
    from vaultsh.store import LocalStore

    warnings.simplefilter("ignore")
    try:
        HookedTransformer.from_pretrained_no_processing(model_dir)
        refused = ""
    except ValueError as exc:
        refused = str(exc).splitlines()[0][:120]
    model = load_hooked_sae_transformer(model_dir).eval()
    root, run = run_dir.rstrip("/").rsplit("/", 1)
    store = LocalStore(root)
    worst, tokens = 0.0, 0
    for f in Run(store, run).committed_files(hook):
        mb = read_megabatch(store, f.key)
        with torch.no_grad():
            _, cache = model.run_with_cache(mb.input_ids, names_filter=hook)
        got, want = cache[hook][mb.mask], mb.states.float()[mb.mask]
        worst = max(worst, float(((got - want).abs() / (want.abs().max() + 1e-12)).max()))
        tokens += int(mb.mask.sum())
    return {"refused": refused, "max_rel_error": worst, "tokens": tokens}


if __name__ == "__main__":
    print("SAELENS-TL " + json.dumps(main(*sys.argv[1:4])))
