"""Data sets uploaded by clients, kept as uncompressed .npz files that shards memory-map.

An upload passes through the coordinator once, to disk; each shard of a job on it
then maps the file and copies only its own columns. A file appears under its final
name only when complete and valid (written to a temporary name, then renamed), so
a refused upload leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import NotFound, ResourceExhausted
from service.files import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    dataset_id: str
    name: str
    path: str
    rows: int
    features: int
    nbytes: int
    label_dtype: str


def validate(X: np.ndarray, y: np.ndarray, classes: int) -> None:
    """Shapes, finite values and, if classes > 0, integer labels in [0, classes)."""
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must be 2-D (rows, features) with at least one of each, got shape {X.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must have {X.shape[0]} rows like X, got shape {y.shape}")
    for name, a in (("X", X), ("y", y)):
        bad = ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{name} has {int(bad.sum())} non-finite values, first at "
                             f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    if classes < 0:
        raise ValueError(f"classes must be >= 0, got {classes}")
    if classes:
        if y.ndim != 1 or not np.all(y == np.round(y)):
            raise ValueError("y must hold integer class labels when classes is set")
        if y.min() < 0 or y.max() >= classes:
            raise ValueError(f"y must hold class labels in [0, {classes}), got [{int(y.min())}, {int(y.max())}]")


class DatasetStore:
    """Uploaded data sets by id, in one directory; at most max_bytes in all."""

    def __init__(self, directory: str | None, max_bytes: int) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="gradshard-data-")
        os.makedirs(self.directory, exist_ok=True)
        self.max_bytes = max_bytes
        self._sets: dict[str, Dataset] = {}
        self._lock = threading.Lock()
        self._reserved = 0           # bytes of uploads being written
        for meta in Path(self.directory).glob("data-*.json"):     # kept from before a restart
            try:
                d = Dataset(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.error("skipping unreadable data set record %s: %s", meta, exc)
                continue
            if os.path.exists(d.path):
                self._sets[d.dataset_id] = d

    def used_bytes(self) -> int:
        with self._lock:
            return self._stored_bytes()

    def _stored_bytes(self) -> int:
        return sum(d.nbytes for d in self._sets.values())

    def check_room(self, nbytes: int, reserve: bool = False) -> None:
        """RESOURCE_EXHAUSTED if an upload would not fit (uploads being written count too)."""
        with self._lock:
            used = self._stored_bytes() + self._reserved
            if used + nbytes > self.max_bytes:
                raise ResourceExhausted(f"upload of {nbytes} bytes exceeds the data limit: {used} of "
                                        f"{self.max_bytes} bytes are in use (server flag --max-data-bytes)")
            if reserve:
                self._reserved += nbytes

    def add(self, name: str, X: np.ndarray, y: np.ndarray, classes: int = 0) -> Dataset:
        validate(X, y, classes)
        nbytes = X.nbytes + y.nbytes
        self.check_room(nbytes, reserve=True)
        try:
            return self._write(name, X, y)
        finally:
            with self._lock:
                self._reserved -= nbytes

    def _write(self, name: str, X: np.ndarray, y: np.ndarray) -> Dataset:
        dataset_id = f"data-{uuid.uuid4().hex[:12]}"
        path = Path(self.directory) / f"{dataset_id}.npz"
        write_atomic(path, lambda f: np.savez(f, X=X, y=y))      # uncompressed, so shards can memory-map X
        dataset = Dataset(dataset_id, name, str(path), X.shape[0], X.shape[1], X.nbytes + y.nbytes, str(y.dtype))
        write_atomic(Path(self.directory) / f"{dataset_id}.json",
                     lambda f: f.write(json.dumps(dataclasses.asdict(dataset)).encode()))
        with self._lock:
            self._sets[dataset_id] = dataset
        return dataset

    def get(self, dataset_id: str) -> Dataset:
        with self._lock:
            dataset = self._sets.get(dataset_id)
        if dataset is None:
            raise NotFound(f"no data set {dataset_id!r}")
        return dataset

    def all(self) -> list[Dataset]:
        with self._lock:
            return list(self._sets.values())

    def delete(self, dataset_id: str) -> None:
        dataset = self.get(dataset_id)
        with self._lock:
            self._sets.pop(dataset_id, None)
        os.unlink(dataset.path)
        Path(self.directory, f"{dataset_id}.json").unlink(missing_ok=True)
