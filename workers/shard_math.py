"""One shard's math: its partial output Z_s, its slice's gradient from dZ, and the
change of Z_s when one of its parameters is nudged. numpy only.

theta is the shard's contiguous slice of the unit-major flat vector (see
workers.models); the classes below only take views of it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from workers.models import ModelSpec
from workers.plan import Slice


# Of each row of X per column block: 2,048 float32 columns, 2 MiB for 256 rows. Measured
# here for the fused step of two 500,000-column shards running together: 45-48 ms with
# 2,048 columns, 54 ms with 4,096; blocks of 512 columns took 58 ms (numpy's per-call cost).
BLOCK_BYTES = 8 * 1024


class LinearShardMath:
    """Z_s = X_s W_s (+ b on the last shard); X_s holds the shard's d feature columns."""

    def __init__(self, spec: ModelSpec, units: Slice, has_tail: bool) -> None:
        self.K = spec.n_outputs
        self.d = units.size
        self.l2 = spec.l2
        self.n_body = self.d * self.K
        self.n_params = self.n_body + (self.K if has_tail else 0)

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return theta[: self.n_body].reshape(self.d, self.K), theta[self.n_body:]

    def column_blocks(self, X: np.ndarray) -> list[slice]:
        """The feature columns in blocks of BLOCK_BYTES of every row of X.

        forward() and backward() sum over these blocks in this order whichever call runs
        them, so the fused step below gives bitwise what they give.
        """
        step = max(1, BLOCK_BYTES // X.itemsize)
        return [slice(a, min(a + step, self.d)) for a in range(0, self.d, step)]

    def forward(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, None]:
        W, b = self.split(theta)
        Z = np.zeros((X.shape[0], self.K), np.result_type(X, W))     # (B, K)
        for cols in self.column_blocks(X):
            Z += X[:, cols] @ W[cols]
        if b.size:
            Z += b
        return Z, None

    def backward(self, theta: np.ndarray, X: np.ndarray, dZ: np.ndarray, cache: None,
                 out: np.ndarray) -> np.ndarray:
        W, _ = self.split(theta)
        gW, gb = self.split(out)
        for cols in self.column_blocks(X):
            self._block_gradient(W, X, dZ, gW, cols)
        if gb.size:
            dZ.sum(axis=0, out=gb)
        return out

    def _block_gradient(self, W: np.ndarray, X: np.ndarray, dZ: np.ndarray, gW: np.ndarray, cols: slice) -> None:
        np.matmul(X[:, cols].T, dZ, out=gW[cols])                     # (d_block, K)
        if self.l2:
            gW[cols] += self.l2 * W[cols]

    def backward_update_forward(self, theta: np.ndarray, X: np.ndarray, dZ: np.ndarray, out: np.ndarray,
                                update: Callable[[slice], None]) -> np.ndarray:
        """backward(), an update of theta and the next forward() on the same X, in one pass.

        Each block of columns is read from memory once: its gradient, then update(flat
        slice of theta) on it, then its share of the next output, while it is in cache.
        The step is memory-bound, so this takes about half the time of the three calls.
        Returns the next forward's Z (B, K); out holds the gradient.
        """
        W, b = self.split(theta)
        gW, gb = self.split(out)
        Z = np.zeros((X.shape[0], self.K), np.result_type(X, W))
        for cols in self.column_blocks(X):
            self._block_gradient(W, X, dZ, gW, cols)
            update(slice(cols.start * self.K, cols.stop * self.K))
            Z += X[:, cols] @ W[cols]
        if gb.size:
            dZ.sum(axis=0, out=gb)
            update(slice(self.n_body, self.n_params))
            Z += b
        return Z

    def penalty(self, theta: np.ndarray) -> float:
        if not self.l2:
            return 0.0
        W, _ = self.split(theta)
        return 0.5 * self.l2 * float(np.vdot(W, W))

    def is_weight(self, i: int) -> bool:
        return i < self.n_body

    def output_delta(self, theta: np.ndarray, X: np.ndarray, cache: None, i: int,
                     delta: float) -> np.ndarray:
        """Z_s(theta + delta e_i) - Z_s(theta), shape (B, K), in O(B K)."""
        out = np.zeros((X.shape[0], self.K), X.dtype)
        if i < self.n_body:
            d, k = divmod(i, self.K)
            out[:, k] = delta * X[:, d]
        else:
            out[:, i - self.n_body] = delta
        return out


class MLPShardMath:
    """Z_s = act(X W1_s + b1_s) W2_s (+ b2 on the last shard) for the shard's h hidden units.

    Layout of theta: h rows of [W1[:, j] (D), b1[j], W2[j, :] (K)], then b2 (K) if last.
    """

    def __init__(self, spec: ModelSpec, units: Slice, has_tail: bool) -> None:
        self.D, self.K = spec.n_features, spec.n_outputs
        self.h = units.size
        self.u = spec.unit_size
        self.l2 = spec.l2
        self.tanh = spec.activation == "tanh"
        self.n_body = self.h * self.u
        self.n_params = self.n_body + (self.K if has_tail else 0)

    def split(self, theta: np.ndarray):
        D = self.D
        U = theta[: self.n_body].reshape(self.h, self.u)  # (h, D+1+K)
        return U[:, :D], U[:, D], U[:, D + 1:], theta[self.n_body:]  # W1ᵀ (h,D), b1 (h), W2 (h,K), b2

    def _act(self, A: np.ndarray) -> np.ndarray:
        return np.tanh(A) if self.tanh else np.maximum(A, 0)

    def forward(self, theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, tuple]:
        W1t, b1, W2, b2 = self.split(theta)
        A = X @ W1t.T                                      # (B, h) pre-activations
        # b1 is a strided view (one element per row of the layout), which numpy would gather
        # again for each of the B rows: one contiguous copy first, bitwise the same sum
        # (W2's shard, 256 x 625: the add 116 -> 30 us, the forward 3.43 -> 3.34 ms).
        A += np.ascontiguousarray(b1)
        Hh = self._act(A)                                  # (B, h)
        Z = Hh @ W2                                        # (B, K)
        if b2.size:
            Z += b2
        return Z, (A, Hh)

    def backward(self, theta: np.ndarray, X: np.ndarray, dZ: np.ndarray, cache: tuple,
                 out: np.ndarray) -> np.ndarray:
        A, Hh = cache
        W1t, _, W2, _ = self.split(theta)
        gW1t, gb1, gW2, gb2 = self.split(out)
        np.matmul(Hh.T, dZ, out=gW2)                       # (h, K), straight into the slice's layout
        dA = dZ @ W2.T                                     # (B, h)
        if self.tanh:
            dA *= 1.0 - Hh * Hh
        else:
            dA *= A > 0
        np.matmul(dA.T, X, out=gW1t)                       # (h, D), no (h, D) temporary to copy
        gb1[...] = dA.sum(axis=0)
        if gb2.size:
            dZ.sum(axis=0, out=gb2)
        if self.l2:
            gW1t += self.l2 * W1t
            gW2 += self.l2 * W2
        return out

    def penalty(self, theta: np.ndarray) -> float:
        if not self.l2:
            return 0.0
        W1t, _, W2, _ = self.split(theta)
        return 0.5 * self.l2 * float(np.sum(W1t * W1t) + np.sum(W2 * W2))

    def is_weight(self, i: int) -> bool:
        return i < self.n_body and i % self.u != self.D

    def output_delta(self, theta: np.ndarray, X: np.ndarray, cache: tuple, i: int,
                     delta: float) -> np.ndarray:
        """Z_s(theta + delta e_i) - Z_s(theta), shape (B, K), in O(B K)."""
        A, Hh = cache
        out = np.zeros((X.shape[0], self.K), X.dtype)
        if i >= self.n_body:                               # output bias b2[k]
            out[:, i - self.n_body] = delta
            return out
        j, r = divmod(i, self.u)
        if r > self.D:                                     # W2[j, k]: Z[:, k] moves by delta * H[:, j]
            out[:, r - self.D - 1] = delta * Hh[:, j]
            return out
        shift = delta * X[:, r] if r < self.D else delta  # W1[r, j] or b1[j] moves A[:, j]
        _, _, W2, _ = self.split(theta)
        np.outer(self._act(A[:, j] + shift) - Hh[:, j], W2[j], out=out)
        return out


def shard_math(spec: ModelSpec, units: Slice, has_tail: bool) -> LinearShardMath | MLPShardMath:
    """The math object for one shard of the model."""
    cls = MLPShardMath if spec.is_mlp else LinearShardMath
    return cls(spec, units, has_tail)
