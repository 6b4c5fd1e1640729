"""Write real SAELens checkpoints with sae-lens itself, and SAELens's own outputs on fixed inputs.

Run by tests/test_explore.py with an interpreter that has sae-lens (see
.ci/run: `.venv-saelens`), in a process of its own:

    python tests/saelens_ckpts.py OUT D_IN D_SAE K

Encodes OUT/x.npy (inputs [n, D_IN], written by the caller; random ones when
there is none), and writes per case OUT/<case>/ (what SAELens's
`save_model` / `save_inference_model` wrote: cfg.json and
sae_weights.safetensors) with OUT/<case>.acts.npy (`sae.encode(x)`) and
OUT/<case>.recon.npy (`sae.decode(sae.encode(x))`). Weights are randomised
away from SAELens's initialisation (biases, thresholds, decoder norms != 1) so
that every term of the encoder matters. Prints the cases as one JSON line.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def main(out: Path, d_in: int, d_sae: int, k: int) -> list[str]:
    import numpy as np
    import torch
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    if (out / "x.npy").exists():
        x = torch.from_numpy(np.load(out / "x.npy")).float()
    else:
        x = torch.randn(300, d_in) * 2 + 0.3
        np.save(out / "x.npy", x.numpy())

    def perturb(sae):
        with torch.no_grad():
            for name, p in sae.named_parameters():
                if name == "threshold":
                    p.copy_(torch.rand_like(p) * 0.8)
                elif name == "log_threshold":
                    p.copy_(torch.log(torch.rand_like(p) * 0.8 + 0.05))
                elif name.startswith("b_"):
                    p.copy_(torch.randn_like(p) * 0.3)
                else:
                    p.copy_(torch.randn_like(p) * (0.5 + torch.rand(p.shape[0], 1)) / p.shape[-1] ** 0.5)
        return sae

    cases = {
        "standard": (StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae)), "save_model"),
        "standard-no-bdec-constnorm": (
            StandardSAE(
                StandardSAEConfig(
                    d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, normalize_activations="constant_norm_rescale"
                )
            ),
            "save_model",
        ),
        "jumprelu": (JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)), "save_model"),
        "jumprelu-trained": (
            JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae)),
            "save_inference_model",
        ),
        "topk": (TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)), "save_model"),
        "topk-rescaled": (
            TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=True)),
            "save_model",
        ),
        "topk-trained": (TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)), "save_inference_model"),
        "layernorm": (
            StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, normalize_activations="layer_norm")),
            "save_model",
        ),
    }
    for name, (sae, save) in cases.items():
        perturb(sae).eval()
        getattr(sae, save)(out / name)
        with torch.no_grad():
            acts = sae.encode(x)
            recon = sae.decode(acts)
        np.save(out / f"{name}.acts.npy", acts.numpy())
        np.save(out / f"{name}.recon.npy", recon.numpy())
    # a checkpoint whose activation scaling factor lives outside it: must be refused
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, normalize_activations="expected_average_only_in"))
    sae.save_model(out / "expected-average")
    return list(cases)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    names = main(out, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    print("SAELENS-CKPTS " + json.dumps(names))
