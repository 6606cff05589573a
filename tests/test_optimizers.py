"""Optimizers, schedules, weight decay and global-norm clipping: N sharded steps equal N steps
of a plain numpy reference written here from torch.optim's documented update rules."""
import math

import numpy as np
import pytest

import reference as ref
from service.coordinator import Coordinator
from service.jobs import JobConfig
from service.shard_group import LocalShardGroup
from workers.data import batch_rows, synthetic_inputs
from workers.optimizers import OptimizerConfig
from workers.plan import Slice
from workers.schedules import Schedule
from workers.shard import DataSpec

D, ROWS, DATA_SEED, SEED, STEPS, BATCH = 7, 37, 8, 4, 11, 10


class RefOptimizer:
    """torch.optim.SGD / Adam / AdamW on one whole flat vector."""

    def __init__(self, kind, lr_of, momentum=0.9, nesterov=False, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
        self.kind, self.lr_of, self.mu, self.nesterov, self.betas, self.eps, self.wd = \
            kind, lr_of, momentum, nesterov, betas, eps, wd
        self.buf = self.m = self.v = None
        self.t = 0

    def step(self, p, g):
        lr = self.lr_of(self.t)
        self.t += 1
        if self.kind in ("sgd", "momentum"):
            d_p = g + self.wd * p
            if self.kind == "momentum":
                self.buf = d_p.copy() if self.buf is None else self.mu * self.buf + d_p
                d_p = d_p + self.mu * self.buf if self.nesterov else self.buf
            return p - lr * d_p
        b1, b2 = self.betas
        if self.kind == "adamw":
            p = p * (1 - lr * self.wd)
        else:
            g = g + self.wd * p
        self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
        self.v = (1 - b2) * g * g if self.v is None else b2 * self.v + (1 - b2) * g * g
        m_hat, v_hat = self.m / (1 - b1 ** self.t), self.v / (1 - b2 ** self.t)
        return p - lr * m_hat / (np.sqrt(v_hat) + self.eps)


def ref_lr(base, kind, warmup=0, step_size=1, gamma=0.1, total=1, min_lr=0.0):
    def lr(t):
        if t < warmup:
            return base * (t + 1) / warmup
        t -= warmup
        if kind == "step":
            return base * gamma ** (t // step_size)
        if kind == "cosine":
            return min_lr + (base - min_lr) * (1 + math.cos(math.pi * min(t, total) / total)) / 2
        return base
    return lr


OPTIMIZERS = {
    "sgd-wd": (OptimizerConfig("sgd", weight_decay=0.05), dict(kind="sgd", wd=0.05)),
    "momentum": (OptimizerConfig("momentum", momentum=0.8), dict(kind="momentum", momentum=0.8)),
    "nesterov-wd": (OptimizerConfig("momentum", momentum=0.9, nesterov=True, weight_decay=0.01),
                    dict(kind="momentum", momentum=0.9, nesterov=True, wd=0.01)),
    "adam": (OptimizerConfig("adam", beta1=0.8, beta2=0.99, eps=1e-7), dict(kind="adam", betas=(0.8, 0.99), eps=1e-7)),
    "adam-wd": (OptimizerConfig("adam", weight_decay=0.1), dict(kind="adam", wd=0.1)),
    "adamw": (OptimizerConfig("adamw", weight_decay=0.1), dict(kind="adamw", wd=0.1)),
}
SCHEDULES = {
    "constant": (Schedule(), dict(kind="constant")),
    "step-warmup": (Schedule("step", warmup_steps=3, step_size=4, gamma=0.5),
                    dict(kind="step", warmup=3, step_size=4, gamma=0.5)),
    "cosine-warmup": (Schedule("cosine", warmup_steps=2, total_steps=7, min_lr=0.01),
                      dict(kind="cosine", warmup=2, total=7, min_lr=0.01)),
}


def run_both(optimizer, schedule, clip, shards, lr=0.05, model="mlp", hidden=6):
    """(sharded parameters after STEPS steps, reference parameters, reported clip scales)."""
    (opt_cfg, opt_ref), (sch_cfg, sch_ref) = OPTIMIZERS[optimizer], SCHEDULES[schedule]
    c = Coordinator(LocalShardGroup)
    cfg = JobConfig(model, DataSpec("synthetic", rows=ROWS, seed=DATA_SEED), features=D, outputs=3, hidden=hidden,
                    activation="tanh", shards=shards, dtype="float64", seed=SEED, learning_rate=lr,
                    batch_size=BATCH, optimizer=opt_cfg, schedule=sch_cfg, clip_norm=clip)
    job = c.create_job(cfg)
    X = synthetic_inputs(DATA_SEED, ROWS, Slice(0, D), np.float64)
    theta = c.get_params(job.job_id)
    reports = list(c.step(job.job_id, STEPS))
    opt = RefOptimizer(lr_of=ref_lr(lr, **sch_ref), **opt_ref)
    scales = []
    for t in range(STEPS):
        rows, _ = batch_rows(SEED, ROWS, BATCH, t)
        _, grads = ref.loss_and_grads(model, job.spec.to_named(theta), X[rows], job.y[rows], activation="tanh")
        g = job.spec.from_named(grads, np.float64)
        scale = min(1.0, clip / (np.linalg.norm(g) + 1e-6)) if clip else 1.0
        scales.append(scale)
        theta = opt.step(theta, g * scale)
        assert reports[t].learning_rate == pytest.approx(opt.lr_of(t), rel=1e-15)
    return c.get_params(job.job_id), theta, [r.clip_scale for r in reports], scales


def assert_rel_close(actual, expected, rel=1e-9):
    assert np.max(np.abs(actual - expected)) <= rel * np.max(np.abs(expected))


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_each_optimizer_equals_the_reference(optimizer, shards):
    got, expected, _, _ = run_both(optimizer, "constant", 0.0, shards)
    assert_rel_close(got, expected)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_each_schedule_equals_the_reference(schedule, shards):
    got, expected, _, _ = run_both("momentum", schedule, 0.0, shards)
    assert_rel_close(got, expected)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("optimizer", ["sgd-wd", "adamw"])
def test_global_norm_clipping_equals_clipping_the_full_gradient(optimizer, shards):
    got, expected, scales, ref_scales = run_both(optimizer, "cosine-warmup", 0.3, shards)
    assert_rel_close(got, expected)
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-12)
    assert min(scales) < 0.9                    # the clip really acted


def test_optimizer_and_schedule_settings_are_validated():
    for kwargs, match in [(dict(kind="rmsprop"), "optimizer must be one of"),
                          (dict(kind="momentum", momentum=1.0), r"momentum must be in \[0, 1\)"),
                          (dict(kind="adam", nesterov=True), "nesterov needs the momentum optimizer"),
                          (dict(kind="adam", eps=0.0), "eps must be finite and > 0"),
                          (dict(kind="sgd", weight_decay=-1.0), "weight_decay must be finite and >= 0")]:
        with pytest.raises(ValueError, match=match):
            OptimizerConfig(**kwargs)
    for kwargs, match in [(dict(kind="cosine"), "total_steps must be >= 1"),
                          (dict(kind="step"), "step_size must be >= 1"),
                          (dict(kind="linear"), "schedule must be one of")]:
        with pytest.raises(ValueError, match=match):
            Schedule(**kwargs)
