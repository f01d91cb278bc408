"""The single independent reference: NumPy float64 dense algebra."""

from __future__ import annotations

import numpy as np


def dense_kernel(pattern, values) -> np.ndarray:
    """``W`` built entry by entry from ``pattern.indices`` (no sparselayers code)."""
    w = np.zeros(pattern.shape, np.float64)
    for (i, j), v in zip(pattern.indices.tolist(), np.asarray(values, np.float64)):
        w[i, j] = v
    return w


def forward(x, pattern, values, bias=None) -> np.ndarray:
    """``x @ W + b`` in float64 over the last axis of ``x``."""
    y = np.asarray(x, np.float64) @ dense_kernel(pattern, values)
    return y if bias is None else y + np.asarray(bias, np.float64)


def gradients(x, pattern, values, upstream):
    """Gradients of ``sum(upstream * (x @ W + b))`` for 2-D ``x``.

    Returns ``(d_x, d_values, d_bias)``: ``d_values[k]`` is the dense kernel
    gradient ``x.T @ upstream`` read at ``pattern.indices[k]``.
    """
    x = np.asarray(x, np.float64)
    upstream = np.asarray(upstream, np.float64)
    d_kernel = x.T @ upstream
    d_values = np.array([d_kernel[i, j] for i, j in pattern.indices.tolist()], np.float64)
    return upstream @ dense_kernel(pattern, values).T, d_values, upstream.sum(axis=0)


_ACTIVATIONS = {
    None: lambda h: h,
    "linear": lambda h: h,
    "relu": lambda h: np.maximum(h, 0.0),
    "sigmoid": lambda h: 1.0 / (1.0 + np.exp(-h)),
    "tanh": np.tanh,
}


def chain(x, layers) -> np.ndarray:
    """Layers applied in turn, each ``(pattern, values, bias, activation)`` with activation None, "linear", "relu", "sigmoid" or "tanh"."""
    h = np.asarray(x, np.float64)
    for pattern, values, bias, activation in layers:
        h = _ACTIVATIONS[activation](forward(h, pattern, values, bias))
    return h


def conv(x, kernel, strides, padding, dilation, bias=None) -> np.ndarray:
    """Keras' ``channels_last`` convolution in float64, tap by tap (no sparselayers code).

    ``kernel`` has Keras' layout ``(*kernel_size, in_channels, filters)``;
    ``padding`` is ``"valid"``, ``"same"`` (TensorFlow's split: the extra
    pad after) or ``"causal"`` (1-D, all before).
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    sizes = kernel.shape[:-2]
    pads = []
    for n, k, s, d in zip(x.shape[1:-1], sizes, strides, dilation):
        reach = d * (k - 1)
        if padding == "valid":
            pads.append((0, 0))
        elif padding == "causal":
            pads.append((reach, 0))
        else:
            total = max((-(-n // s) - 1) * s + reach + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    outs = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(x.shape[1:-1], sizes, strides, dilation)]
    y = np.zeros((x.shape[0], *[max(o, 0) for o in outs], kernel.shape[-1]))
    for tap in np.ndindex(*sizes):
        window = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dilation, outs, strides)
        )
        y += np.einsum("...c,cf->...f", x[(slice(None), *window)], kernel[tap])
    return y if bias is None else y + np.asarray(bias, np.float64)
