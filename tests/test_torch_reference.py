"""The sharded optimizers against torch itself: torch.optim (SGD, momentum, Nesterov, Adam,
AdamW), torch.nn.utils.clip_grad_norm_ and a LambdaLR warm-up + cosine, with autograd for
the gradients, float64. An implementation we did not write (test_optimizers.py has a numpy one)."""
import math

import numpy as np
import pytest
import torch

from service.coordinator import Coordinator
from service.jobs import JobConfig
from service.shard_group import LocalShardGroup
from workers.data import batch_rows, synthetic_inputs
from workers.optimizers import OptimizerConfig
from workers.plan import Slice
from workers.schedules import Schedule
from workers.shard import DataSpec

D, ROWS, SEED, STEPS, BATCH, LR, WARMUP, TOTAL, CLIP = 6, 40, 2, 12, 8, 0.05, 3, 7, 0.4

CASES = {
    "sgd": (OptimizerConfig("sgd", weight_decay=0.02), lambda p: torch.optim.SGD(p, lr=LR, weight_decay=0.02)),
    "momentum": (OptimizerConfig("momentum", momentum=0.8),
                 lambda p: torch.optim.SGD(p, lr=LR, momentum=0.8)),
    "nesterov": (OptimizerConfig("momentum", momentum=0.9, nesterov=True, weight_decay=0.01),
                 lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (OptimizerConfig("adam", beta1=0.85, beta2=0.99, eps=1e-7, weight_decay=0.05),
             lambda p: torch.optim.Adam(p, lr=LR, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05)),
    "adamw": (OptimizerConfig("adamw", weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.1)),
}


def lr_factor(t):
    """Warm-up then cosine to 0, as a LambdaLR factor of step t."""
    if t < WARMUP:
        return (t + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * min(t - WARMUP, TOTAL) / TOTAL))


@pytest.mark.parametrize("clip", [0.0, CLIP])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_steps_equal_torch_optim(case, clip):
    ours, make_torch = CASES[case]
    c = Coordinator(LocalShardGroup)
    job = c.create_job(JobConfig("mlp", DataSpec("synthetic", rows=ROWS, seed=SEED), features=D, outputs=3,
                                 hidden=5, shards=3, dtype="float64", seed=SEED, learning_rate=LR,
                                 batch_size=BATCH, optimizer=ours, clip_norm=clip,
                                 schedule=Schedule("cosine", warmup_steps=WARMUP, total_steps=TOTAL)))
    start = job.spec.to_named(c.get_params(job.job_id))
    reports = list(c.step(job.job_id, STEPS))

    X = torch.tensor(synthetic_inputs(SEED, ROWS, Slice(0, D), np.float64))
    y = torch.tensor(job.y)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    opt = make_torch(list(params.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    for t in range(STEPS):
        rows = torch.tensor(batch_rows(SEED, ROWS, BATCH, t)[0])
        Z = torch.relu(X[rows] @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
        loss = torch.nn.functional.cross_entropy(Z, y[rows])
        opt.zero_grad()
        loss.backward()
        assert reports[t].loss == pytest.approx(loss.item(), rel=1e-12)
        assert reports[t].learning_rate == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        if clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        opt.step()
        sched.step()
    if clip:
        assert min(r.clip_scale for r in reports) < 1            # the clip really acted
    got = job.spec.to_named(c.get_params(job.job_id))
    for name, p in params.items():
        expected = p.detach().numpy()
        assert np.max(np.abs(got[name] - expected)) <= 1e-9 * np.max(np.abs(expected)), name
