"""`sae-eval`: how good an SAE is on a hook's stored activations.

Over the first N real tokens (token mode of the reader, masked tokens dropped):
- L0: mean number of active latents per token;
- FVU: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (fraction of variance unexplained);
- dead latents: never active; dense latents: active on more than `dense` of the tokens.
Sums are float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vaultsh.errors import UserError
from vaultsh.explore.scope import one_hook
from vaultsh.explore.stream import ROWS_PER_CHUNK, Progress


@dataclass
class SaeEvalResult:
    run: str
    hook: str
    sae: dict  # SAE.describe()
    tokens: int
    l0: float
    fvu: float
    explained_variance: float = field(init=False)  # 1 - fvu
    mse: float
    dead: int
    dense: int
    dense_threshold: float
    d_sae: int | None = field(init=False)  # the SAE's latents, from `sae`
    freq_quantiles: dict = field(default_factory=dict)  # latent firing frequency quantiles

    def __post_init__(self) -> None:
        self.explained_variance = 1.0 - self.fvu
        self.d_sae = self.sae.get("d_sae")

    def to_json(self) -> dict:
        return asdict(self)


def sae_eval(
    store,
    key: str,
    hook: str | None,
    ckpt: str,
    *,
    tokens: int = 100_000,
    dense: float = 0.1,
    progress: Progress | None = None,
) -> SaeEvalResult:
    """L0, FVU, dead and dense latents of the SAE at `ckpt` over `tokens` real tokens of the hook."""
    import torch

    from vaultsh.explore.sae import load_sae
    from vaultsh.reader import ActivationReader

    if tokens < 1:
        raise UserError(f"sae-eval: --tokens {tokens}: use a whole number >= 1")
    if not 0 < dense <= 1:
        raise UserError(f"sae-eval: --dense {dense}: use a fraction in (0, 1]")
    ref = one_hook(store, key, hook)
    sae = load_sae(ckpt)
    reader = ActivationReader(ref.key, store=store, tokens=True, batch_size=ROWS_PER_CHUNK, return_ids=False)
    md = reader.metadata or {}
    if isinstance(md.get("d_in"), int):
        sae.check_d_in(md["d_in"], ref.key)
    n = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    l0_sum = sse = 0.0
    s1 = s2 = None
    try:
        for batch in reader:
            x = batch["states"].to(torch.float32)
            if n == 0:
                sae.check_d_in(x.shape[1], ref.key)
                s1 = torch.zeros(x.shape[1], dtype=torch.float64)
                s2 = torch.zeros(x.shape[1], dtype=torch.float64)
            x = x[: tokens - n]
            h, x_hat = sae.reconstruct(x)
            active = h > 0
            fired += active.sum(0, dtype=torch.float64)
            l0_sum += float(active.sum(dtype=torch.float64))
            sse += float(((x - x_hat).double() ** 2).sum())
            xd = x.double()
            s1 += xd.sum(0)
            s2 += (xd * xd).sum(0)
            n += x.shape[0]
            if progress:
                progress(n, tokens)
            if n >= tokens:
                break
    finally:
        reader.close()
    if n == 0:
        raise UserError(f"{store.child_uri(ref.key)}: no real (unmasked) tokens to evaluate on")
    assert s1 is not None and s2 is not None  # made with the first batch
    sst = float((s2 - s1 * s1 / n).sum())
    freq = fired / n
    qs = torch.quantile(freq, torch.tensor([0.0, 0.5, 0.9, 0.99, 1.0], dtype=torch.float64))
    return SaeEvalResult(
        ref.run,
        ref.hook,
        sae.describe(),
        n,
        l0_sum / n,
        sse / sst if sst > 0 else float("nan"),
        sse / (n * sae.d_in),
        int((fired == 0).sum()),
        int((freq > dense).sum()),
        dense,
        {k: float(v) for k, v in zip(("min", "0.5", "0.9", "0.99", "max"), qs.tolist())},
    )
