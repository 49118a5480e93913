"""REPAIR: renormalizing the activations of a merged model (Jordan, Sedghi, Saukh, Entezari and
Neyshabur, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023,
section 4; used by C2M3, Crisostomi et al. 2024, section 4.3, as "activation renormalization").

Averaging aligned models shrinks the variance of their hidden units ("variance collapse").
With a few batches of data, for every unit k of every layer listed in the spec's
`repair_layers` (a linear/conv layer writing a group's units, not followed by BatchNorm),
REPAIR makes the merged model's pre-activation statistics equal the interpolation of the
endpoints' (the aligned input models'):

    goal mean  mu*_k    = sum_i w_i mu_i,k
    goal std   sigma*_k = sum_i w_i sigma_i,k      (std interpolated, as in REPAIR's eq. 6)

by an affine correction folded into the layer: W_k <- W_k * sigma*_k / sigma_k and
b_k <- (b_k - mu_k) * sigma*_k / sigma_k + mu*_k, where mu_k, sigma_k are the merged layer's
current statistics. Layers are corrected in forward order, each measured after the earlier
ones were corrected, so each correction is exact on the given data. A layer without a bias
gets the scale only. Where the model has BatchNorm, its running statistics are reset and
re-estimated on the data (cumulative average, `momentum=None`, as in the authors' code)
before and after the corrections (BatchNorm then does REPAIR's work for the convolutions
that feed it). With a token mask (`attention_mask` in dict batches) only real tokens count.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]


def _default_forward(model: nn.Module, batch: Any):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _channels(y: torch.Tensor, module: nn.Module, mask: torch.Tensor | None) -> torch.Tensor:
    """(samples, channels) view of a layer's output."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return torch.movedim(y, 1, -1).reshape(-1, y.shape[1])
    if mask is not None and y.dim() == 3 and mask.shape == y.shape[:2]:
        return y[mask.bool()]
    return y.reshape(-1, y.shape[-1])


@torch.no_grad()
def layer_stats(model: nn.Module, names: Sequence[str], batches: Iterable, forward: Forward | None = None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit (mean, std) of the outputs of `names` over the data (float64, population std)."""
    forward = forward or _default_forward
    mods = dict(model.named_modules())
    acc: dict[str, list] = {n: [0, 0.0, 0.0] for n in names}
    state: dict[str, Any] = {"mask": None}
    hooks = []
    for n in names:
        if n not in mods:
            raise ValueError(f"repair: the model has no layer {n}")

        def hook(mod, inp, out, n=n):
            x = _channels(out, mod, state["mask"]).double()
            a = acc[n]
            a[0] += x.shape[0]
            a[1] = a[1] + x.sum(0)
            a[2] = a[2] + (x * x).sum(0)

        hooks.append(mods[n].register_forward_hook(hook))
    model.eval()
    try:
        for batch in batches:
            state["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, (cnt, s, ss) in acc.items():
        if cnt == 0:
            raise ValueError("repair: the data gave no samples")
        mean = s / cnt
        out[n] = (mean, (ss / cnt - mean * mean).clamp_min(0).sqrt())
    return out


@torch.no_grad()
def reset_batchnorm(model: nn.Module, batches: Iterable, forward: Forward | None = None) -> bool:
    """Re-estimates every BatchNorm's running statistics on the data; returns whether there were any."""
    forward = forward or _default_forward
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    for batch in batches:
        forward(model, batch)
    model.eval()
    return True


@torch.no_grad()
def repair(merged: nn.Module, endpoints: Sequence[nn.Module], layers: Sequence[str], batches: Sequence,
           weights: Sequence[float] | None = None, forward: Forward | None = None, eps: float = 1e-8) -> nn.Module:
    """Renormalizes `merged` in place (see the module docstring) and returns it.

    `endpoints` are the input models aligned to the merged model's units (same architecture);
    `layers` the module names to correct (`PermutationSpec.repair_layers`); `batches` a
    re-iterable sequence of inputs; `weights` the merge weights (equal by default).
    """
    if not batches:
        raise ValueError("params.data: repair needs at least one batch of inputs")
    w = torch.tensor(weights if weights is not None else [1.0] * len(endpoints), dtype=torch.float64)
    w = w / w.sum()
    goals = {}
    ends = [layer_stats(e, layers, batches, forward) for e in endpoints]
    for n in layers:
        mu = sum(wi * s[n][0] for wi, s in zip(w.tolist(), ends))
        sd = sum(wi * s[n][1] for wi, s in zip(w.tolist(), ends))
        goals[n] = (mu, sd)
    reset_batchnorm(merged, batches, forward)
    mods = dict(merged.named_modules())
    for n in layers:
        mu, sd = layer_stats(merged, [n], batches, forward)[n]
        gmu, gsd = goals[n]
        scale = gsd / (sd + eps)
        m = mods[n]
        shape = (-1,) + (1,) * (m.weight.dim() - 1)
        m.weight.mul_(scale.to(m.weight.dtype).view(shape))
        if m.bias is not None:
            m.bias.copy_(((m.bias.double() - mu) * scale + gmu).to(m.bias.dtype))
    reset_batchnorm(merged, batches, forward)
    return merged
