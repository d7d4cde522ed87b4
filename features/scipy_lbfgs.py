"""scipy's L-BFGS-B run on each image alone: the CDI reference's optimiser, without its batch coupling.

The CDI reference (sprintml/copyrighted_data_identification, commit dcd6225)
optimises Noise Optimisation's perturbation with
``scipy.optimize.minimize(method="L-BFGS-B", options={"maxiter": 5})``: a
limited-memory BFGS with a line search (Moré-Thuente, scipy's defaults:
10 correction pairs, at most 20 line-search evaluations per iteration), in
float64 on the flattened tensor. It runs it once over the whole flattened
batch on the mean of the per-image norms, so an image's result depends on
its batch mates (REFERENCE.md section 8). ``per_image_scipy_lbfgs`` runs the
same optimiser on each image's own objective, one image after the other:
the same algorithm and settings, and values independent of the batch. Every
objective evaluation is one network call on one image, so this is slower
than ``features.noise_optimization.per_sample_lbfgs``, which batches the
images; it exists to compare with numbers published with the reference.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

#: ``closure(i, x_i) -> (loss, grad)``: image i's objective (a scalar) and its gradient, at x_i of shape (1, ...).
ImageClosure = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def per_image_scipy_lbfgs(
    closure: ImageClosure,
    x: torch.Tensor,
    *,
    max_iter: int = 5,
    initial: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Minimise each image's objective from ``x[i]`` with scipy's L-BFGS-B (``maxiter=max_iter``).

    Parameters
    ----------
    closure : callable
        ``closure(i, x_i)`` with ``x_i`` of shape (1, ...): image i's loss (a
        scalar tensor) and its gradient like ``x_i``.
    x : torch.Tensor
        (B, ...) starting points.
    max_iter : int
        scipy's ``maxiter``; every other option is scipy's default.
    initial : (loss, grad) or None
        (B,) losses and (B, ...) gradients at ``x`` when already known (a
        shared network call): scipy's first evaluation of each image is
        answered from them.

    Returns
    -------
    x : torch.Tensor
        (B, ...) the final points.
    evaluations : list of int
        ``closure`` calls per image (the answered first evaluation not counted).
    """
    from scipy.optimize import minimize

    out = torch.empty_like(x)
    evaluations = []
    for i in range(x.shape[0]):
        shape = (1, *x.shape[1:])
        start = x[i].detach().double().cpu().numpy().ravel()
        calls = [0]

        def fun(flat: np.ndarray, i: int = i, shape: tuple = shape, start: np.ndarray = start,
                calls: list = calls) -> tuple[float, np.ndarray]:
            if initial is not None and np.array_equal(flat, start) and calls[0] == 0:
                loss, grad = initial[0][i], initial[1][i]
            else:
                calls[0] += 1
                point = torch.from_numpy(flat).to(device=x.device, dtype=torch.float32).view(shape)
                loss, grad = closure(i, point)
            return float(loss), grad.detach().double().cpu().numpy().ravel()

        result = minimize(fun, start, jac=True, method="L-BFGS-B", options={"maxiter": int(max_iter)})
        out[i] = torch.from_numpy(result.x).to(device=x.device, dtype=x.dtype).view(x.shape[1:])
        evaluations.append(calls[0])
    return out, evaluations
