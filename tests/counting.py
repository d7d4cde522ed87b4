"""A counting adapter: how many samples go through the network, forward and backward."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from cdi.models.base import DiffusionAdapter


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts):
        ctx.counts = counts
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.counts["backward"] += grad.shape[0]
        return grad, None


@contextlib.contextmanager
def counting(adapter: DiffusionAdapter) -> Iterator[dict]:
    """Count samples through ``_predict``, backward samples through its output, encoded images."""
    counts = {"forward": 0, "backward": 0, "encode": 0}
    predict, encode = adapter._predict, adapter._encode

    def counted_predict(x_t, t, cond):
        counts["forward"] += x_t.shape[0]
        return _CountBackward.apply(predict(x_t, t, cond), counts)

    def counted_encode(pixels):
        counts["encode"] += pixels.shape[0]
        return encode(pixels)

    adapter._predict, adapter._encode = counted_predict, counted_encode
    try:
        yield counts
    finally:
        del adapter._predict, adapter._encode
