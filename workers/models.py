"""Model specifications: tensor shapes, the unit-major flat layout, and named <-> flat views.

Every model's output is a sum of per-unit contributions, so a contiguous run of
units is a shard. Linear models: a unit is an input feature d with its K weights
W[d, :]. MLP: a unit is a hidden neuron j with [W1[:, j], b1[j], W2[j, :]]. The
output bias (K values) follows the units and belongs to the last shard.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.plan import ShardPlan, make_plan

KINDS = ("linear", "logistic", "softmax", "mlp")
ACTIVATIONS = ("relu", "tanh")
LOSS_OF = {"linear": "mse", "logistic": "bce_logits", "softmax": "softmax_ce", "mlp": "softmax_ce"}


@dataclass(frozen=True)
class ModelSpec:
    """One model's family and sizes: D features, K outputs, H hidden units (mlp only)."""

    kind: str
    n_features: int          # D
    n_outputs: int           # K
    n_hidden: int = 0        # H, mlp only
    activation: str = "relu"  # mlp only
    l2: float = 0.0          # penalty 0.5 * l2 * sum of squared weights (not biases)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.n_features < 1:
            raise ValueError(f"features must be >= 1, got {self.n_features}")
        if self.kind == "logistic" and self.n_outputs != 1:
            raise ValueError(f"logistic has exactly 1 output, got {self.n_outputs}")
        if self.kind in ("softmax", "mlp") and self.n_outputs < 2:
            raise ValueError(f"{self.kind} needs at least 2 classes, got {self.n_outputs}")
        if self.n_outputs < 1:
            raise ValueError(f"outputs must be >= 1, got {self.n_outputs}")
        if self.kind == "mlp":
            if self.n_hidden < 1:
                raise ValueError(f"hidden must be >= 1 for mlp, got {self.n_hidden}")
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        else:
            if self.n_hidden != 0:
                raise ValueError(f"hidden must be 0 for {self.kind}, got {self.n_hidden}")
            if self.activation != "relu":
                raise ValueError(f"activation applies to mlp only; leave it unset for {self.kind}")
        if not (np.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"l2 must be finite and >= 0, got {self.l2}")

    @property
    def loss(self) -> str:
        return LOSS_OF[self.kind]

    @property
    def is_mlp(self) -> bool:
        return self.kind == "mlp"

    @property
    def n_units(self) -> int:
        return self.n_hidden if self.is_mlp else self.n_features

    @property
    def unit_size(self) -> int:
        D, K = self.n_features, self.n_outputs
        return D + 1 + K if self.is_mlp else K

    @property
    def tail_size(self) -> int:
        return self.n_outputs

    @property
    def n_params(self) -> int:
        return self.n_units * self.unit_size + self.tail_size

    def plan(self, n_shards: int) -> ShardPlan:
        return make_plan(self.n_units, n_shards, self.unit_size, self.tail_size)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Named tensors in natural shapes, in flat-view order."""
        D, K, H = self.n_features, self.n_outputs, self.n_hidden
        if self.is_mlp:
            return {"W1": (D, H), "b1": (H,), "W2": (H, K), "b2": (K,)}
        return {"W": (D, K), "b": (K,)}

    def to_named(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split the flat view into named tensors (fresh C-contiguous arrays)."""
        self._check_flat(flat)
        D, K, H = self.n_features, self.n_outputs, self.n_hidden
        if self.is_mlp:
            U = flat[: H * self.unit_size].reshape(H, self.unit_size)   # (H, D+1+K)
            return {"W1": np.ascontiguousarray(U[:, :D].T), "b1": U[:, D].copy(),
                    "W2": U[:, D + 1:].copy(), "b2": flat[H * self.unit_size:].copy()}
        return {"W": flat[: D * K].reshape(D, K).copy(), "b": flat[D * K:].copy()}

    def from_named(self, named: dict[str, np.ndarray], dtype: np.dtype) -> np.ndarray:
        """Assemble the flat view from a complete set of named tensors."""
        shapes = self.tensor_shapes()
        for name, shape in shapes.items():
            if name not in named:
                raise ValueError(f"tensor {name} is missing; {self.kind} needs {', '.join(shapes)}")
            if tuple(named[name].shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(named[name].shape)}, expected {shape}")
        D, H = self.n_features, self.n_hidden
        if self.is_mlp:
            U = np.empty((H, self.unit_size), dtype)
            U[:, :D] = named["W1"].T
            U[:, D] = named["b1"]
            U[:, D + 1:] = named["W2"]
            return np.concatenate([U.ravel(), np.asarray(named["b2"], dtype)])
        return np.concatenate([np.asarray(named["W"], dtype).ravel(), np.asarray(named["b"], dtype)])

    def locate(self, index: int) -> tuple[str, tuple[int, ...]]:
        """Which named tensor entry the flat index is."""
        if not 0 <= index < self.n_params:
            raise ValueError(f"parameter index {index} is outside [0, {self.n_params})")
        D, K = self.n_features, self.n_outputs
        body = self.n_units * self.unit_size
        if index >= body:
            return ("b2" if self.is_mlp else "b"), (index - body,)
        if not self.is_mlp:
            return "W", divmod(index, K)
        j, r = divmod(index, self.unit_size)
        if r < D:
            return "W1", (r, j)
        if r == D:
            return "b1", (j,)
        return "W2", (j, r - D - 1)

    def _check_flat(self, flat: np.ndarray) -> None:
        if flat.shape != (self.n_params,):
            raise ValueError(f"flat has shape {flat.shape}, expected ({self.n_params},)")
