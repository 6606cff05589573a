"""A shard as a plain object: its slice of theta, its block of the data, and the
calls of one synchronized step. The Ray actor (workers.actor) is a thin wrapper.
numpy only."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from workers.data import TEACHER, init_theta, synthetic_inputs
from workers.losses import loss_value
from workers.models import ModelSpec
from workers.npz import read_columns
from workers.optimizers import Optimizer, OptimizerConfig
from workers.plan import ShardPlan, Slice
from workers.shard_math import shard_math


@dataclass(frozen=True)
class DataSpec:
    """Where a job's inputs come from: generated from a seed, or an .npz file."""

    kind: str            # "synthetic", "npz", or "dataset" (an upload, turned into its npz file)
    rows: int = 0        # synthetic only
    path: str = ""       # npz: the file; dataset: the data set id
    seed: int = 0        # synthetic only
    dataset_id: str = ""  # set when an npz file is an uploaded data set


class Shard:
    """Shard `index` of a job: owns plan.params(index) of the flat vector."""

    def __init__(self, spec: ModelSpec, plan: ShardPlan, index: int, dtype: str, seed: int,
                 optimizer: OptimizerConfig = OptimizerConfig()) -> None:
        self.spec, self.index = spec, index
        self.dtype = np.dtype(dtype)
        self.units: Slice = plan.units[index]
        self.has_tail = plan.is_last(index)
        self.math = shard_math(spec, self.units, self.has_tail)
        self.theta = self._kept("theta", init_theta(spec, self.units, self.has_tail, seed, self.dtype))  # (P_s,)
        self.grad = self._kept("grad", np.empty_like(self.theta))                                         # (P_s,)
        self.X: np.ndarray | None = None     # (rows, d) column block, or (rows, D) for the MLP
        self._pending: tuple | None = None   # (token, theta, Xb, cache) of the last forward
        self._batch: np.ndarray | None = None  # a step's gathered batch, its memory reused step after step
        self.optimizer = Optimizer(optimizer)  # its state covers this slice only
        self.step = 0                          # optimizer steps applied to this slice
        self._undo: list[np.ndarray] = []      # copies a fused step takes of theta and the optimizer state
        self._grad_sqnorm: float | None = None  # |grad|^2 as backward() wrote it, until it is applied

    def _kept(self, name: str, a: np.ndarray) -> np.ndarray:
        """The array kept as self.<name> for the shard's life (theta and grad are only ever
        written in place); the Ray actor puts them where its coordinator can read them."""
        return a

    # --- set-up -------------------------------------------------------------------
    def load(self, data: DataSpec) -> int:
        """Generate or read this shard's inputs; returns their bytes."""
        columns = Slice(0, self.spec.n_features) if self.spec.is_mlp else self.units
        if data.kind == "synthetic":
            self.X = synthetic_inputs(data.seed, data.rows, columns, self.dtype)
        elif data.kind == "npz":
            with np.errstate(over="ignore"):
                self.X = read_columns(data.path, "X", columns.begin, columns.end, self.dtype)
            bad = ~np.isfinite(self.X)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise ValueError(f"X in {data.path} has {int(bad.sum())} values that are not finite in "
                                 f"{self.dtype} in columns [{columns.begin}, {columns.end}), first at row {r}, "
                                 f"column {columns.begin + c}")
        else:
            raise ValueError(f"unknown data kind {data.kind!r}")
        return int(self.X.nbytes)

    def teacher_output(self, seed: int) -> np.ndarray:
        """Partial output (rows, K) of the teacher model that labels synthetic data, float64."""
        theta = init_theta(self.spec, self.units, self.has_tail, seed, np.float64, purpose=TEACHER)
        return self.math.forward(theta, self._X_float64())[0]

    # --- one synchronized step ------------------------------------------------------
    def forward(self, token: int, rows: np.ndarray | None = None, theta: np.ndarray | None = None,
                float64: bool = False, keep: bool = True, step_batch: bool = False
                ) -> tuple[np.ndarray, float, float]:
        """Partial output Z_s (B, K) on the batch, the slice's L2 penalty, and seconds.

        Remembers what backward needs under `token`, unless keep is False. step_batch: the
        rows are a training step's batch, gathered into memory kept for the next step's
        (other calls, such as a client's gradient on all rows, gather afresh).
        """
        t0 = time.perf_counter()
        X = self._X_float64() if float64 else self.X
        if rows is None:
            Xb = X
        elif step_batch and keep and X is self.X:
            self._pending = None           # its rows may be in the buffer about to be overwritten
            Xb = self._gather_into_buffer(rows)
        else:
            Xb = X[rows]
        th = self.theta if theta is None else theta
        if float64:
            th = th.astype(np.float64)
        Z, cache = self.math.forward(th, Xb)
        self._pending = (token, th, Xb, cache) if keep else None
        return Z, self.math.penalty(th), time.perf_counter() - t0

    def backward(self, token: int, dZ: np.ndarray, want_grad: bool = False
                 ) -> tuple[float, np.ndarray | None, float]:
        """Gradient of the slice from dZ (B, K), kept for apply() (a step's backward).

        Returns (squared norm of the slice's gradient, the gradient if asked, seconds).
        A gradient asked for (a client's) is written into fresh memory: the kept one stays
        what the last step applied, for get_grad().
        """
        t0 = time.perf_counter()
        _, th, Xb, cache = self._take(token)
        grad = np.empty_like(th) if want_grad or th.dtype != self.grad.dtype else self.grad
        self._grad_sqnorm = None
        self.math.backward(th, Xb, dZ, cache, out=grad)
        self._pending = None       # the batch's copies and activations can go now
        sqnorm = float(np.vdot(grad, grad))
        if grad is self.grad:
            self._grad_sqnorm = sqnorm
        return sqnorm, (grad if want_grad else None), time.perf_counter() - t0

    def apply(self, step: int, lr: float, scale: float = 1.0, next_token: int | None = None,
              next_rows: np.ndarray | None = None) -> tuple[float, tuple | None]:
        """Optimizer step number `step` from the kept gradient times `scale`.

        Returns (seconds, the forward of the next step on next_rows if next_token is given).
        A repeated call for a step already applied does nothing, so a retried call is harmless.
        """
        seconds = self._apply(step, lr, scale)
        return seconds, self._prefetch(next_token, next_rows)

    def _apply(self, step: int, lr: float, scale: float = 1.0) -> float:
        t0 = time.perf_counter()
        if step <= self.step:
            return 0.0
        if step != self.step + 1:
            raise RuntimeError(f"shard {self.index} is at step {self.step}, asked to apply step {step}")
        sqnorm, self._grad_sqnorm = self._grad_sqnorm, None
        if not self._grad_finite(sqnorm):
            raise ValueError(f"shard {self.index}: the gradient of step {step} is not finite; nothing was applied")
        if scale != 1.0:
            self.grad *= scale
        self.optimizer.update(self.theta, self.grad, lr)
        self.step = step
        self._pending = None
        return time.perf_counter() - t0

    def backward_apply(self, token: int, dZ: np.ndarray, step: int, lr: float, next_token: int | None = None,
                       next_rows: np.ndarray | None = None) -> tuple[float, None, float, tuple | None]:
        """backward() and apply() in one call, and (with next_token) the next step's forward too:
        one round trip per step when no global clipping is needed."""
        if self._fusable(token, step, next_token, next_rows):
            return self._fused_step(dZ, step, lr, next_token)
        sqnorm, _, seconds = self.backward(token, dZ)
        seconds += self._apply(step, lr)
        return sqnorm, None, seconds, self._prefetch(next_token, next_rows)

    def _fusable(self, token: int, step: int, next_token: int | None, next_rows: np.ndarray | None) -> bool:
        """The math can fuse backward, update and the next forward; the pending forward and the
        next one both read every row (the same X, read once), the pending one at this shard's
        own parameters in its own dtype (not a client's theta, not float64)."""
        return (next_token is not None and next_rows is None and hasattr(self.math, "backward_update_forward")
                and step == self.step + 1 and self._pending is not None and self._pending[0] == token
                and self._pending[1] is self.theta and self._pending[2] is self.X)

    def _fused_step(self, dZ: np.ndarray, step: int, lr: float, next_token: int) -> tuple[float, None, float, tuple]:
        """What the unfused calls return, bitwise, from one pass over the shard's columns.

        The gradient is checked once the pass is done; if it is not finite, theta and the
        optimizer state go back to copies taken before it, so nothing is applied, as in apply().
        """
        t0 = time.perf_counter()
        self._pending = None
        opt = self.optimizer
        saved, before = [], (opt.t, opt.m is None)
        try:
            saved = self._save_state()
            before = opt.begin(self.theta)
            self._grad_sqnorm = None
            Z = self.math.backward_update_forward(self.theta, self.X, dZ, self.grad,
                                                  lambda block: opt.update_block(self.theta, self.grad, lr, block))
            sqnorm = float(np.vdot(self.grad, self.grad))
            if not self._grad_finite(sqnorm):
                raise ValueError(f"shard {self.index}: the gradient of step {step} is not finite; nothing was applied")
        except BaseException:
            opt.rollback(before)
            self._restore_state(saved)
            raise
        self.step = step
        self._pending = (next_token, self.theta, self.X, None)
        return sqnorm, None, time.perf_counter() - t0, (Z, self.math.penalty(self.theta), 0.0)

    def _grad_finite(self, sqnorm: float | None) -> bool:
        """self.grad holds no NaN and no infinity. Its squared norm, when known and finite,
        proves it without another pass over the slice (0.1 ms of a 6 ms MLP step here): a NaN
        or an infinity makes the sum NaN or infinite. An infinite sum may also be finite
        values whose squares overflow, so then each element is checked."""
        if sqnorm is not None and math.isfinite(sqnorm):
            return True
        return bool(np.all(np.isfinite(self.grad)))

    def _save_state(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(live array, a copy of it) for theta and the optimizer state; the copies' memory is kept between steps."""
        live = [a for a in (self.theta, self.optimizer.m, self.optimizer.v) if a is not None]
        if [c.shape for c in self._undo] != [a.shape for a in live]:
            self._undo = [np.empty_like(a) for a in live]
        for a, copy in zip(live, self._undo):
            np.copyto(copy, a)
        return list(zip(live, self._undo))

    @staticmethod
    def _restore_state(saved: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for live, copy in saved:
            np.copyto(live, copy)

    def _prefetch(self, next_token: int | None, next_rows: np.ndarray | None) -> tuple | None:
        """The next step's forward at the parameters just updated (what forward() would return)."""
        return None if next_token is None else self.forward(next_token, next_rows, step_batch=True)

    def check(self, token: int, Z: np.ndarray, dZ: np.ndarray, y: np.ndarray, indices: np.ndarray,
              h: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Analytic and central-difference derivatives at local `indices`, float64.

        Z is the full output (B, K) of the forward that `token` names. The nudged loss
        is evaluated locally: Z' = Z + (Z_s(theta + h e_i) - Z_s(theta)).
        """
        t0 = time.perf_counter()
        _, th, Xb, cache = self._take(token)
        self._pending = None
        analytic = self.math.backward(th, Xb, dZ, cache, out=np.empty_like(th))[indices]
        numeric = np.empty(len(indices))
        l2, kind = self.spec.l2, self.spec.loss
        for n, i in enumerate(indices):
            L = []
            for delta in (h, -h):
                Lz = loss_value(kind, Z + self.math.output_delta(th, Xb, cache, int(i), delta), y)
                if l2 and self.math.is_weight(int(i)):
                    Lz += 0.5 * l2 * ((th[i] + delta) ** 2 - th[i] ** 2)
                L.append(Lz)
            numeric[n] = (L[0] - L[1]) / (2 * h)
        return analytic, numeric, time.perf_counter() - t0

    # --- parameters ---------------------------------------------------------------
    def get_params(self) -> np.ndarray:
        return self.theta.copy()

    def get_grad(self) -> np.ndarray:
        """The slice's gradient kept by the last step's backward (scaled if it was clipped):
        what that step applied. The coordinator knows which step that was, and whether any."""
        return self.grad.copy()

    def get_step(self) -> int:
        return self.step

    def state(self) -> dict:
        """Everything a restarted shard needs to continue exactly: parameters, step, optimizer state."""
        o = self.optimizer
        return {"theta": self.theta.copy(), "step": self.step, "opt_t": o.t,
                "m": None if o.m is None else o.m.copy(), "v": None if o.v is None else o.v.copy()}

    def restore(self, state: dict) -> None:
        """Go back to a state() taken earlier (of this shard's slice)."""
        self.set_params(np.asarray(state["theta"], self.dtype))
        self.step = int(state["step"])
        o = self.optimizer
        o.t = int(state["opt_t"])
        o.m = None if state["m"] is None else np.array(state["m"], self.dtype)
        o.v = None if state["v"] is None else np.array(state["v"], self.dtype)

    def set_params(self, theta: np.ndarray) -> None:
        if theta.shape != self.theta.shape or theta.dtype != self.theta.dtype:
            raise ValueError(f"shard {self.index} takes {self.theta.shape} {self.theta.dtype}, "
                             f"got {theta.shape} {theta.dtype}")
        self.theta[...] = theta
        self._pending = None

    def _gather_into_buffer(self, rows: np.ndarray) -> np.ndarray:
        """X[rows] written into memory kept from the last step's batch.

        A minibatch of a wide model is large (256 rows of 100,000 float32 columns: 100 MB),
        and a fresh one each step faults its pages in again: np.take into a kept buffer
        gathered such a batch in 7 ms against 14 ms for X[rows] (bench/RESULTS.md). Only a
        step's kept forward uses it: the next one replaces the pending forward anyway, and
        evaluations and client calls between steps gather their own rows, so the buffer
        stays the size of the step's batch.
        """
        X, rows = self.X, np.asarray(rows)
        if rows.dtype.kind not in "iu" or rows.ndim != 1:
            raise TypeError(f"shard {self.index}: rows must be a 1-D array of integers, got {rows.dtype} "
                            f"{rows.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(X)):
            raise IndexError(f"shard {self.index}: rows must be in [0, {len(X)})")
        if self._batch is None or len(self._batch) < len(rows) or self._batch.dtype != X.dtype:
            self._batch = np.empty((len(rows),) + X.shape[1:], X.dtype)
        # mode="clip" writes straight into `out` (the default buffers it); the rows are checked above
        return np.take(X, rows, axis=0, out=self._batch[: len(rows)], mode="clip")

    def _take(self, token: int) -> tuple:
        if self._pending is None or self._pending[0] != token:
            raise RuntimeError(f"shard {self.index}: no forward for call {token}; run forward first")
        return self._pending

    def _X_float64(self) -> np.ndarray:
        return self.X if self.X.dtype == np.float64 else self.X.astype(np.float64)
