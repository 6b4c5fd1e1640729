"""SAE checkpoints from safetensors only: the SAELens and the sparsify layouts.

- SAELens: a directory with `cfg.json` and `sae_weights.safetensors` holding
  `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`,
  plus `threshold [d_sae]` for JumpReLU (or an older checkpoint's
  `log_threshold`, threshold = exp of it); `cfg.json` names the `architecture`
  ("standard", "jumprelu", "topk") and, for top-k, `k` (or
  `activation_fn_kwargs.k`) and `rescale_acts_by_decoder_norm` (SAELens 6's
  default for top-k training: pre-activations times the decoder rows' norms,
  latents divided by them before decoding); `apply_b_dec_to_input` (default
  true); `normalize_activations` "none", "constant_norm_rescale" or
  "layer_norm" (both per token, undone after decoding). A checkpoint saved
  with "expected_average_only_in" is refused: its scaling factor is not in the
  checkpoint (SAELens folds it into the weights when it saves a trained SAE).
- sparsify: a directory with `cfg.json` (`k`, `d_in`, ...) and `sae.safetensors`
  holding `encoder.weight [num_latents, d_in]`, `encoder.bias`, `W_dec
  [num_latents, d_in]`, `b_dec [d_in]`; encoding is ReLU then top-k of
  `encoder(x - b_dec)`.

A path may name the directory or its `.safetensors` file. Pickle checkpoints
(`.pt`, `.pth`, `.bin`, `.ckpt`, `.pkl`, or anything starting with pickle/zip
magic bytes) are refused before a byte of them is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vaultsh.errors import UserError

if TYPE_CHECKING:
    import torch

SAELENS_FILE = "sae_weights.safetensors"
SPARSIFY_FILE = "sae.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
MAX_CFG_BYTES = 1 << 20


class CheckpointError(UserError):
    """An SAE checkpoint that cannot be used: missing, pickled, or of the wrong shape."""


@dataclass
class SAE:
    """Encoder/decoder weights as float32 torch tensors, and how to encode."""

    source: str
    layout: str  # "saelens" or "sparsify"
    architecture: str  # "standard", "jumprelu", "topk"
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None
    k: int | None = None
    subtract_b_dec: bool = True
    rescale_by_dec_norm: bool = False  # SAELens top-k: rank pre-activations x ||W_dec[i]||
    normalize: str = "none"  # SAELens's per-token input normalization: none, constant_norm_rescale, layer_norm

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def _norm_in(self, x):
        """(x as the SAE sees it, what undoes that on a reconstruction) for `normalize`."""
        if self.normalize == "constant_norm_rescale":
            c = self.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * c, lambda y: y / c
        if self.normalize == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), lambda y: y * std + mu
        return x, None

    def _sae_in(self, x):
        x = self._norm_in(x)[0]
        return x - self.b_dec if self.subtract_b_dec else x

    def pre(self, x):
        """Pre-activations [n, d_sae] of x [n, d_in] (top-k ranks these)."""
        h = self._sae_in(x) @ self.W_enc + self.b_enc
        return h * self.W_dec.norm(dim=-1) if self.rescale_by_dec_norm else h

    def encode(self, x):
        """Latent activations [n, d_sae] of x [n, d_in]."""
        import torch

        pre = self.pre(x)
        h = torch.relu(pre)
        if self.architecture == "jumprelu":
            h = h * (pre > self.threshold)
        elif self.architecture == "topk":
            assert self.k is not None  # load_sae refuses a top-k SAE without one
            vals, idx = h.topk(min(self.k, h.shape[1]), dim=1)
            h = torch.zeros_like(h).scatter_(1, idx, vals)
        return h

    def feature(self, x, f: int):
        """Activation [n] of latent `f` (cheap for standard/JumpReLU: one column)."""
        import torch

        if self.architecture == "topk":
            return self.encode(x)[:, f]
        pre = self._sae_in(x) @ self.W_enc[:, f] + self.b_enc[f]
        h = torch.relu(pre)
        if self.architecture == "jumprelu":
            assert self.threshold is not None  # load_sae refuses a JumpReLU SAE without one
            h = h * (pre > self.threshold[f])
        return h

    def decode(self, h):
        """Reconstructions [n, d_in] of latents h [n, d_sae] (in the SAE's own input space)."""
        if self.rescale_by_dec_norm:
            h = h / self.W_dec.norm(dim=-1)
        return h @ self.W_dec + self.b_dec

    def reconstruct(self, x):
        """(latents h [n, d_sae], x_hat [n, d_in] in x's own space: a per-token input normalization undone)."""
        _, undo = self._norm_in(x)
        h = self.encode(x)
        y = self.decode(h)
        return h, (undo(y) if undo is not None else y)

    def check_feature(self, f: int) -> int:
        if not 0 <= f < self.d_sae:
            raise CheckpointError(
                f"--feature {f}: out of range, {self.source} has {self.d_sae} latents (0-{self.d_sae - 1})"
            )
        return f

    def check_d_in(self, d: int, where: str) -> None:
        if d != self.d_in:
            raise CheckpointError(f"{self.source}: the SAE reads d_in={self.d_in} but {where} has d_model={d}")

    def describe(self) -> dict:
        """What the SAE is, without its weights; its two input settings under their SAELens cfg.json names."""
        out = {name: getattr(self, name) for name in ("source", "layout", "architecture", "d_in", "d_sae", "k")}
        return {
            **out,
            "normalize_activations": self.normalize,
            "rescale_acts_by_decoder_norm": self.rescale_by_dec_norm,
        }


def refuse_pickle(path: Path) -> None:
    """Raise for a pickle checkpoint, judged by name and by its first bytes only."""
    if path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: a pickle checkpoint ({path.suffix}) is refused: unpickling runs code; "
            "convert it to safetensors (SAELens or sparsify layout)"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CheckpointError(
            f"{path}: a pickle/torch.save file is refused (unpickling runs code); use a safetensors checkpoint"
        )


def _read_cfg(folder: Path) -> dict:
    p = folder / "cfg.json"
    if not p.is_file():
        return {}
    if p.stat().st_size > MAX_CFG_BYTES:
        raise CheckpointError(f"{p}: larger than {MAX_CFG_BYTES} bytes")
    try:
        cfg = json.loads(p.read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: not a JSON object")
    return cfg


def _locate(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such SAE checkpoint (a directory with cfg.json and {SAELENS_FILE} or {SPARSIFY_FILE})"
        )
    if path.is_dir():
        for name in (SAELENS_FILE, SPARSIFY_FILE):
            if (path / name).is_file():
                return path / name
        pickles = [p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            refuse_pickle(path / pickles[0])
        raise CheckpointError(f"{path}: no {SAELENS_FILE} (SAELens) or {SPARSIFY_FILE} (sparsify) in it")
    refuse_pickle(path)
    if not path.name.endswith(".safetensors"):
        raise CheckpointError(f"{path}: not a .safetensors file")
    return path


def _k(cfg: dict) -> int | None:
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
        k = cfg["activation_fn_kwargs"].get("k")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CheckpointError(f"cfg.json: k={k!r} is not a whole number >= 1")
    return k


def load_sae(path: str | Path) -> SAE:
    """An SAE from a SAELens or sparsify safetensors checkpoint (directory or file)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    file = _locate(path)
    cfg = _read_cfg(file.parent)
    try:
        t = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    t = {k: v.to(torch.float32) for k, v in t.items()}
    src = str(path)
    if "W_enc" in t:
        if "threshold" not in t and "log_threshold" in t:  # an older SAELens JumpReLU checkpoint
            t["threshold"] = torch.exp(t.pop("log_threshold"))
        need = ("W_enc", "b_enc", "W_dec", "b_dec")
        missing = [n for n in need if n not in t]
        if missing:
            raise CheckpointError(f"{file}: SAELens layout without {', '.join(missing)}")
        arch = str(cfg.get("architecture") or ("jumprelu" if "threshold" in t else "standard")).lower()
        if cfg.get("activation_fn_str") == "topk" or cfg.get("activation_fn") == "topk":
            arch = "topk"
        if arch == "gated":
            raise CheckpointError(f"{file}: the gated architecture is not supported (standard, jumprelu, topk)")
        norm = str(cfg.get("normalize_activations") or "none")
        if norm not in ("none", "constant_norm_rescale", "layer_norm"):
            raise CheckpointError(
                f"{file}: cfg.json has normalize_activations={norm!r}, whose factor is not in the checkpoint; "
                "fold it into the weights first (SAELens: sae.fold_activation_norm_scaling_factor(f), then "
                "save_inference_model; vaultsh's saelens_scaling_factor gives f for a store)"
            )
        sae = SAE(
            src,
            "saelens",
            arch,
            t["W_enc"],
            t["b_enc"],
            t["W_dec"],
            t["b_dec"],
            threshold=t.get("threshold"),
            k=_k(cfg),
            subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
            rescale_by_dec_norm=arch == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)),
            normalize=norm,
        )
        if arch == "jumprelu" and sae.threshold is None:
            raise CheckpointError(f"{file}: a JumpReLU SAE needs a 'threshold' tensor")
        if arch == "topk" and sae.k is None:
            raise CheckpointError(f"{file}: a top-k SAE needs 'k' in cfg.json")
        if arch not in ("standard", "jumprelu", "topk"):
            raise CheckpointError(f"{file}: unknown architecture {arch!r} (standard, jumprelu, topk)")
    elif "encoder.weight" in t:
        missing = [n for n in ("encoder.bias", "W_dec", "b_dec") if n not in t]
        if missing:
            raise CheckpointError(f"{file}: sparsify layout without {', '.join(missing)}")
        if "W_skip" in t:
            raise CheckpointError(f"{file}: sparsify skip connections (W_skip) are not supported")
        k = _k(cfg)
        if k is None:
            raise CheckpointError(f"{file}: a sparsify SAE needs 'k' in cfg.json")
        sae = SAE(
            src, "sparsify", "topk", t["encoder.weight"].T.contiguous(), t["encoder.bias"], t["W_dec"], t["b_dec"], k=k
        )
    else:
        raise CheckpointError(
            f"{file}: neither SAELens (W_enc, ...) nor sparsify (encoder.weight, ...) tensor names; "
            f"found {', '.join(sorted(t)[:6])}"
        )
    d_in, d_sae = sae.W_enc.shape
    for name, tensor, shape in (
        ("b_enc", sae.b_enc, (d_sae,)),
        ("W_dec", sae.W_dec, (d_sae, d_in)),
        ("b_dec", sae.b_dec, (d_in,)),
    ):
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{file}: {name} has shape {list(tensor.shape)}, expected {list(shape)}")
    if sae.threshold is not None and tuple(sae.threshold.shape) != (d_sae,):
        raise CheckpointError(f"{file}: threshold has shape {list(sae.threshold.shape)}, expected [{d_sae}]")
    return sae
