"""Durable job state under --state-dir: job definitions and complete sets of shard checkpoints.

    STATE/jobs/<job_id>/job.json             the JobConfig, and when the job was created
    STATE/jobs/<job_id>/ckpt-<step>-<id>/shard-<s>.npz   one shard's parameters, step and optimizer state
    STATE/jobs/<job_id>/manifest.json        names the newest complete checkpoint (with checksums)

Every file is written to a temporary name, fsynced, renamed into place, and its directory
fsynced. The manifest is written last, so it only ever names a complete set; a crash in
between leaves the previous manifest, and the previous set, in force.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np

from service.files import fsync_dir, write_atomic
from service.jobs import JobConfig
from workers.optimizers import OptimizerConfig
from workers.schedules import Schedule
from workers.shard import DataSpec

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_to_dict(config: JobConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> JobConfig:
    return JobConfig(**{**d, "data": DataSpec(**d["data"]), "optimizer": OptimizerConfig(**d["optimizer"]),
                        "schedule": Schedule(**d["schedule"])})


class StateStore:
    def __init__(self, directory: str) -> None:
        self.root = Path(directory)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def _job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def save_job(self, job_id: str, config: JobConfig, created_ns: int = 0) -> None:
        """The job's definition; created_ns (its place in ListJobs) orders the jobs a restart resumes."""
        d = self._job_dir(job_id)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "job.json", lambda f: f.write(json.dumps(
            {"job_id": job_id, "config": config_to_dict(config), "created_ns": created_ns}, indent=1).encode()))
        fsync_dir(d.parent)

    def save_checkpoint(self, job_id: str, step: int, states: list[dict]) -> None:
        """Write every shard's state, then the manifest naming them; drop older sets."""
        d = self._job_dir(job_id)
        # A fresh directory for every set, even at the same step: the set the manifest names
        # is never written over.
        ckpt = d / f"ckpt-{step}-{uuid.uuid4().hex[:8]}"
        ckpt.mkdir()
        files = {}
        for s, st in enumerate(states):
            arrays = {k: np.asarray(v) for k, v in st.items() if v is not None}
            path = ckpt / f"shard-{s}.npz"
            write_atomic(path, lambda f, a=arrays: np.savez(f, **a))
            files[path.name] = _sha256(path)
        fsync_dir(d)
        manifest = {"step": step, "dir": ckpt.name, "shards": len(states), "files": files}
        write_atomic(d / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        for old in d.glob("ckpt-*"):
            if old.name != ckpt.name:
                shutil.rmtree(old, ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)

    def load(self) -> list[tuple[str, JobConfig, int, list[dict]]]:
        """(job_id, config, step, shard states) of every saved job with a complete checkpoint, in the
        order the jobs were created (so that ListJobs keeps it across a restart)."""
        out = []                          # (created_ns, the job's entry)
        for d in sorted((self.root / "jobs").iterdir()):
            try:
                saved = json.loads((d / "job.json").read_text())
                manifest = json.loads((d / "manifest.json").read_text())
                ckpt = d / manifest["dir"]
                states = []
                for s in range(manifest["shards"]):
                    path = ckpt / f"shard-{s}.npz"
                    if _sha256(path) != manifest["files"][path.name]:
                        raise ValueError(f"{path} does not match its checksum")
                    with np.load(path) as f:
                        st = {k: f[k] for k in f.files}
                    states.append({"theta": st["theta"], "step": int(st["step"]), "opt_t": int(st["opt_t"]),
                                   "m": st.get("m"), "v": st.get("v")})
                out.append((int(saved.get("created_ns") or 0),     # 0: saved before it was recorded
                            (saved["job_id"], config_from_dict(saved["config"]), int(manifest["step"]), states)))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("cannot resume %s: %s", d.name, exc, extra={"job_id": d.name})
        return [job for _, job in sorted(out, key=lambda entry: entry[0])]    # stable: ties stay by job id
