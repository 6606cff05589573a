"""The fused step of the dense models (backward, update and the next forward in one pass
over the shard's columns) gives bitwise what the separate calls give, and puts everything
back when a gradient block is not finite; every path of a step refuses a gradient that is
not finite and applies a finite one whose squared norm overflows. Plain numpy shards: no
Ray, no gRPC."""
from __future__ import annotations

import numpy as np
import pytest

import workers.shard_math as shard_math
from workers.models import ModelSpec
from workers.optimizers import OptimizerConfig
from workers.shard import DataSpec, Shard

ROWS = 24
OPTIMIZERS = [OptimizerConfig("sgd", weight_decay=0.01), OptimizerConfig("momentum", nesterov=True),
              OptimizerConfig("adam"), OptimizerConfig("adamw", weight_decay=0.1)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 3 float64 / 6 float32 columns, so a shard of 50 columns has many blocks and a ragged last."""
    monkeypatch.setattr(shard_math, "BLOCK_BYTES", 24)


def shard_pair(kind: str, K: int, dtype: str, optimizer: OptimizerConfig, l2: float = 0.0):
    spec = ModelSpec(kind, 100, K, l2=l2)
    plan = spec.plan(2)
    pair = []
    for _ in range(2):
        s = Shard(spec, plan, 1, dtype, seed=3, optimizer=optimizer)   # the last shard: it has the bias
        s.load(DataSpec("synthetic", rows=ROWS, seed=5))
        pair.append(s)
    return pair


def batches(steps: int, minibatch: bool):
    rng = np.random.default_rng(0)
    return [rng.choice(ROWS, 8, replace=False) if minibatch else None for _ in range(steps + 1)]


def dZ_of(Z: np.ndarray, k: int) -> np.ndarray:
    return (np.tanh(Z) + 0.1 * k).astype(Z.dtype)        # any function of Z: the same for both shards


@pytest.mark.parametrize("kind,K", [("logistic", 1), ("softmax", 4), ("linear", 2)])
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.kind)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("minibatch", [False, True])
def test_fused_step_is_bitwise_the_separate_calls(kind, K, optimizer, dtype, minibatch, monkeypatch):
    fused, plain = shard_pair(kind, K, dtype, optimizer, l2=0.05)
    calls = []
    original = type(fused.math).backward_update_forward
    monkeypatch.setattr(type(fused.math), "backward_update_forward",
                        lambda self, *a: calls.append(1) or original(self, *a))
    rows = batches(5, minibatch)
    Zf, pf, _ = fused.forward(1, rows[0])
    for k in range(5):
        # fused: one call; plain: backward, apply, forward
        Zp, pp, _ = plain.forward(100 + k, rows[k])
        np.testing.assert_array_equal(Zf, Zp)
        assert pf == pp
        dZ = dZ_of(Zf, k)
        sq_f, _, _, (Zf, pf, _) = fused.backward_apply(1 + k, dZ, k + 1, 0.1, next_token=2 + k, next_rows=rows[k + 1])
        sq_p, _, _ = plain.backward(100 + k, dZ)
        plain.apply(k + 1, 0.1)
        assert sq_f == sq_p
        np.testing.assert_array_equal(fused.theta, plain.theta)
        np.testing.assert_array_equal(fused.get_grad(), plain.get_grad())     # what GetGradient serves
        for a, b in ((fused.optimizer.m, plain.optimizer.m), (fused.optimizer.v, plain.optimizer.v)):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
        assert fused.step == plain.step == k + 1 and fused.optimizer.t == plain.optimizer.t
    # fused only when both forwards read every row (the same X); minibatches take the separate calls
    assert len(calls) == (0 if minibatch else 5)
    # the forward the fused call left behind serves an ordinary backward
    fused.backward(6, dZ_of(Zf, 9))


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.kind)
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_a_gradient_block_that_is_not_finite_puts_every_block_back(optimizer):
    shard, _ = shard_pair("softmax", 3, "float32", optimizer)
    Z, _, _ = shard.forward(1)
    shard.backward_apply(1, dZ_of(Z, 0), 1, 0.1, next_token=2)      # one good step: optimizer state exists
    shard.X = shard.X.copy()
    shard.X[:, 40] = 3e38                 # finite, but its gradient overflows float32; late in the slice
    Z, _, _ = shard.forward(3)
    dZ = np.full_like(Z, 10.0)
    before = (shard.theta.copy(), shard.optimizer.m, shard.optimizer.v, shard.optimizer.t, shard.step)
    before = tuple(a.copy() if isinstance(a, np.ndarray) else a for a in before)
    with pytest.raises(ValueError, match="not finite; nothing was applied"):
        shard.backward_apply(3, dZ, 2, 0.1, next_token=4)
    after = (shard.theta, shard.optimizer.m, shard.optimizer.v, shard.optimizer.t, shard.step)
    for a, b in zip(before, after):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_a_first_step_that_fails_leaves_no_optimizer_state():
    shard, _ = shard_pair("logistic", 1, "float32", OptimizerConfig("adam"))
    shard.X = shard.X.copy()
    shard.X[:, 30] = 3e38
    Z, _, _ = shard.forward(1)
    theta = shard.theta.copy()
    with pytest.raises(ValueError, match="not finite"):
        shard.backward_apply(1, np.full_like(Z, 10.0), 1, 0.1, next_token=2)
    np.testing.assert_array_equal(shard.theta, theta)
    assert shard.optimizer.m is None and shard.optimizer.v is None and shard.optimizer.t == 0 and shard.step == 0


def test_column_blocks_cover_the_slice_in_order():
    spec = ModelSpec("logistic", 100, 1)
    math = shard_math.shard_math(spec, spec.plan(2).units[0], False)
    X = np.zeros((2, math.d), np.float32)
    blocks = math.column_blocks(X)
    assert blocks[0].start == 0 and blocks[-1].stop == math.d
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    assert {b.stop - b.start for b in blocks[:-1]} == {6}


def step_by(path: str, shard: Shard, token: int, dZ: np.ndarray, lr: float) -> float:
    """Step 1 on the forward `token` the way the coordinator takes `path`; the squared norm reported."""
    if path == "with next forward":      # the dense models fuse it into one pass; the MLP runs the calls in turn
        return shard.backward_apply(token, dZ, 1, lr, next_token=token + 1)[0]
    if path == "backward_apply":         # one call, no next forward
        return shard.backward_apply(token, dZ, 1, lr)[0]
    sqnorm = shard.backward(token, dZ)[0]  # global clipping: the norm goes out, then apply()
    shard.apply(1, lr)
    return sqnorm


@pytest.mark.parametrize("path", ["with next forward", "backward_apply", "backward then apply"])
def test_a_finite_gradient_whose_squared_norm_overflows_is_applied(path):
    """The shards prove a gradient finite from its squared norm; an infinite norm of finite
    values must still be applied, as a check of every element finds."""
    shard, reference = shard_pair("softmax", 3, "float32", OptimizerConfig("sgd"))
    for s in (shard, reference):
        s.X = s.X.copy()
        s.X[:, 40] = 1e19                # gradient ~1e19: finite in float32, its square is not
    Z, _, _ = shard.forward(1)
    reference.forward(1)
    dZ = np.full_like(Z, 0.5)
    grad = reference.backward(1, dZ, want_grad=True)[1]
    assert np.all(np.isfinite(grad)) and not np.isfinite(np.vdot(grad, grad))
    theta = shard.theta.copy()
    with np.errstate(over="ignore"):
        sqnorm = step_by(path, shard, 1, dZ, 1e-20)
    assert sqnorm == np.inf and shard.step == 1
    np.testing.assert_array_equal(shard.theta, theta - np.float32(1e-20) * grad)
    assert not np.array_equal(shard.theta, theta)


@pytest.mark.parametrize("path", ["with next forward", "backward_apply", "backward then apply"])
@pytest.mark.parametrize("kind", ["softmax", "mlp"])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_gradient_with_a_nan_is_refused_on_every_path(path, kind):
    if kind == "mlp":
        spec = ModelSpec("mlp", 12, 3, 8)
        shard = Shard(spec, spec.plan(2), 1, "float32", seed=3)
        shard.load(DataSpec("synthetic", rows=ROWS, seed=5))
    else:
        shard, _ = shard_pair(kind, 3, "float32", OptimizerConfig("sgd"))
    shard.X = shard.X.copy()
    shard.X[2, 5] = np.nan
    Z, _, _ = shard.forward(1)
    theta = shard.theta.copy()
    with pytest.raises(ValueError, match="not finite; nothing was applied"):
        step_by(path, shard, 1, np.full_like(Z, 0.5), 0.1)
    np.testing.assert_array_equal(shard.theta, theta)
    assert shard.step == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_clients_gradient_does_not_vouch_for_the_kept_one():
    """A step's backward keeps a gradient with a NaN; a client's gradient (fresh memory, finite)
    computed before the step's apply() must not stand in for it."""
    shard, _ = shard_pair("softmax", 3, "float32", OptimizerConfig("sgd"))
    shard.X = shard.X.copy()
    shard.X[2, 5] = np.nan
    Z, _, _ = shard.forward(1)
    shard.backward(1, np.full_like(Z, 0.5))                     # the step's: kept, with NaN
    clean = np.array([r for r in range(ROWS) if r != 2])
    Z2, _, _ = shard.forward(2, clean)
    sqnorm, grad, _ = shard.backward(2, np.full_like(Z2, 0.5), want_grad=True)
    assert np.isfinite(sqnorm) and np.all(np.isfinite(grad))
    theta = shard.theta.copy()
    with pytest.raises(ValueError, match="not finite; nothing was applied"):
        shard.apply(1, 0.1)
    np.testing.assert_array_equal(shard.theta, theta)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_failed_fused_step_leaves_no_norm_behind():
    """A finite backward, then a fused step that fails on a NaN and leaves it in the kept
    gradient: the earlier norm must not let a later apply() take that gradient."""
    shard, _ = shard_pair("softmax", 3, "float32", OptimizerConfig("sgd"))
    Z, _, _ = shard.forward(1)
    assert np.isfinite(shard.backward(1, np.full_like(Z, 0.5))[0])
    shard.forward(2)
    with pytest.raises(ValueError, match="not finite; nothing was applied"):
        shard.backward_apply(2, np.full_like(Z, np.nan), 1, 0.1, next_token=3)
    assert not np.all(np.isfinite(shard.grad))
    theta = shard.theta.copy()
    with pytest.raises(ValueError, match="not finite; nothing was applied"):
        shard.apply(1, 0.1)
    np.testing.assert_array_equal(shard.theta, theta)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_backward_that_fails_midway_leaves_no_norm_behind(monkeypatch):
    """A backward that raises after writing part of the kept gradient (a fake math whose
    backward writes a NaN and raises: the test is about the shard's bookkeeping) must not
    leave the previous backward's norm to vouch for what is there now."""
    shard, _ = shard_pair("softmax", 3, "float32", OptimizerConfig("sgd"))
    Z, _, _ = shard.forward(1)
    assert np.isfinite(shard.backward(1, np.full_like(Z, 0.5))[0])
    shard.forward(2)

    def fails_midway(theta, X, dZ, cache, out):
        out[7] = np.nan
        raise RuntimeError("out of memory halfway")

    monkeypatch.setattr(shard.math, "backward", fails_midway)
    with pytest.raises(RuntimeError, match="halfway"):
        shard.backward(2, np.full_like(Z, 0.5))
    theta = shard.theta.copy()
    with pytest.raises(ValueError, match="not finite; nothing was applied"):
        shard.apply(1, 0.1)
    np.testing.assert_array_equal(shard.theta, theta)
