"""Client tensors -> the job's flat parameter vector, checked before any shard is touched."""
from __future__ import annotations

import numpy as np

from service.jobs import Job


def flat_from(job: Job, named: dict[str, np.ndarray], partial: bool) -> np.ndarray:
    """The flat vector from named tensors or "flat": names, shapes, dtype and finite values checked.

    partial=True fills the tensors not sent from the job's current parameters (the caller
    holds the job's lock: they are read from the shards' lent slices, ShardGroup.lend).
    """
    spec, dtype = job.spec, np.dtype(job.config.dtype)
    shapes = spec.tensor_shapes()
    if not named:
        raise ValueError("no tensors were sent")
    for name, array in named.items():
        expected = (spec.n_params,) if name == "flat" else shapes.get(name)
        if expected is None:
            raise ValueError(f"unknown tensor {name!r}; {spec.kind} has {', '.join(shapes)} (or 'flat')")
        if array.dtype != dtype:
            raise ValueError(f"tensor {name} has dtype {array.dtype}, the job uses {dtype}")
        if tuple(array.shape) != expected:
            raise ValueError(f"tensor {name} has shape {tuple(array.shape)}, expected {expected}")
        finite = np.isfinite(array)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(f"tensor {name} has {int((~finite).sum())} non-finite values, first at {where}")
    if "flat" in named:
        if len(named) > 1:
            raise ValueError("send either 'flat' or named tensors, not both")
        return named["flat"]
    if set(named) != set(shapes):
        if not partial:
            missing = sorted(set(shapes) - set(named))
            raise ValueError(f"parameters must include every tensor; missing {', '.join(missing)}")
        named = {**spec.to_named(np.concatenate(job.group.lend("get_params"))), **named}
    return spec.from_named(named, dtype)
