"""llama.cpp's rule for which device holds each layer under ``--tensor-split`` (pure).

The pinned ``llama-model.cpp`` (``load_tensors``) offloads the last ``offloaded`` of the model's
``n_layer + 1`` layers (the blocks, then the output layer) and gives layer ``il`` to the first
device whose cumulative share of the split exceeds ``il``'s position among them. The placement
rule proposes splits with it (:mod:`tightwad.pool.placement`); the dashboard draws the layers a
running coordinator holds with it (:mod:`tightwad.server.dashboard`).
"""

from __future__ import annotations

from collections.abc import Sequence


def layer_devices(split: Sequence[float], n_layer: int,
                  offloaded: int | None = None) -> list[int | None]:
    """The device index of each layer ``0..n_layer`` (``n_layer``: the output layer); None for
    a layer left on the coordinator's CPU. ``offloaded`` defaults to every layer (``-ngl 999``).
    A split without a positive share offloads nothing."""
    total = float(sum(split))
    if total <= 0 or not split:
        return [None] * (n_layer + 1)
    cumulative, acc = [], 0.0
    for share in split:
        acc += float(share)
        cumulative.append(acc / total)
    active = n_layer + 1 if offloaded is None else min(max(offloaded, 0), n_layer + 1)
    start = n_layer + 1 - active
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < start:
            out.append(None)
            continue
        x = (il - start) / active
        out.append(next((i for i, c in enumerate(cumulative) if c > x), len(split) - 1))
    return out
