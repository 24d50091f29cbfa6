"""How well a flow teacher's NFM pairs fit the noise the student is sampled from.

An NFM student learns the map from the teacher's latents z = f(x~) of its training images, x~ the
perturbed image (`nfm.teacher_pairs`), back to the images, and is then sampled from N(0, I). What it
cannot fix is the gap between the two noise laws. With q the law of z over the training pairs and p the
data law of x~, the change of variables gives

    KL(q || N(0, I)) = E_x~[-log p_teacher(x~)] - H(x~),

the teacher's NLL of the perturbed training images minus their entropy, which does not depend on the
teacher. Between teachers of the same data, perturbation and eta, the lower NLL on the training pairs is
the smaller gap. A second, assumption-light view: the KL from the Gaussian fitted to the latents (mean mu,
covariance S, D dimensions) to N(0, I),

    KL(N(mu, S) || N(0, I)) = (tr S + |mu|^2 - D - log det S) / 2,

a lower bound on KL(q || N(0, I)) that sees only the first two moments. Both are reported per dimension.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from nfm.teacher_pairs import TeacherHandle, perturbed
from shared.paths import standard_normal_logprob


def gaussian_fit_kl(z: Tensor) -> float:
    """KL(N(mu, S) || N(0, I)) / D in nats per dimension for latents z (N, D), N > D, fitted in float64."""
    if z.ndim != 2 or z.shape[0] <= z.shape[1]:
        raise ValueError(f"the Gaussian fit needs latents (N, D) with N > D, got shape {tuple(z.shape)}")
    z = z.double()
    mu, cov = z.mean(0), torch.cov(z.T)
    sign, logdet = torch.linalg.slogdet(cov)
    if sign <= 0:
        raise ValueError("the latents' covariance is singular: the teacher collapses some direction")
    d = z.shape[1]
    return float(0.5 * (cov.trace() + mu @ mu - d - logdet) / d)


@torch.no_grad()
def pairing_fit(teacher: TeacherHandle, data: Tensor, draws: int = 4, seed: int = 0, batch_size: int = 256
                ) -> dict[str, Any]:
    """Fit of the teacher's pairs (x_i, f(x~_i(d))) for images `data` (N, *shape) and draws d < `draws`.

    Returns `nll_nats_per_dim` (mean -log p_teacher(x~) / D), `gaussian_kl_per_dim` (`gaussian_fit_kl` of
    the latents), `z_rms`, and the counts. The perturbation is the coupling's own (same addresses, same
    `seed`), so the figures describe exactly the pairs a student with this seed trains on.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    device = next(teacher.flow.parameters()).device
    nll, latents = [], []
    index_all = torch.arange(len(data)).repeat_interleave(draws)
    draw_all = torch.arange(draws).repeat(len(data))
    for start in range(0, len(index_all), batch_size):
        index, draw = index_all[start:start + batch_size], draw_all[start:start + batch_size]
        x = perturbed(data, index, draw, teacher, seed).to(device).float()
        z, logdet = teacher.flow(x)
        logp = standard_normal_logprob(z.double()) + logdet.double()
        nll.append(-logp.cpu() / x[0].numel())
        latents.append(z.flatten(1).double().cpu())
    z = torch.cat(latents)
    nll_all = torch.cat(nll)
    return {"nll_nats_per_dim": float(nll_all.mean()),
            "nll_standard_error": float(nll_all.std() / math.sqrt(len(nll_all))),
            "gaussian_kl_per_dim": gaussian_fit_kl(z), "z_rms": float(z.pow(2).mean().sqrt()),
            "images": len(data), "draws": draws, "eta": teacher.eta, "perturbation": teacher.noise_kind}
