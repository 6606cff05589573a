"""Independent plain-numpy float64 reference for losses and gradients, used by tests as ground truth."""
import math
from typing import Optional

import numpy as np

MODELS = ("linear", "logistic", "softmax", "mlp")
WEIGHTS = {"linear": ["W"], "logistic": ["W"], "softmax": ["W"], "mlp": ["W1", "W2"]}


def _as64(params):
    """Return a float64 copy of params so callers' arrays are never mutated or downcast."""
    return {k: np.array(v, dtype=np.float64) for k, v in params.items()}


def _check(model, activation):
    """Fail loudly on unknown names rather than silently computing something else."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}")
    if activation not in ("relu", "tanh"):
        raise ValueError(f"unknown activation {activation!r}")


def predict(model, params, X, activation="relu"):
    """Return the logits / outputs Z of shape (B, K)."""
    _check(model, activation)
    p = _as64(params)
    X = np.asarray(X, dtype=np.float64)
    if model != "mlp":
        return X @ p["W"] + p["b"]
    A = X @ p["W1"] + p["b1"]
    Hh = np.maximum(A, 0.0) if activation == "relu" else np.tanh(A)
    return Hh @ p["W2"] + p["b2"]


def _data_loss_and_dZ(model, Z, y):
    """Mean data loss and its gradient w.r.t. Z (same shape as Z)."""
    B = Z.shape[0]
    if model == "linear":
        Y = np.asarray(y, dtype=np.float64).reshape(Z.shape)  # (B,) -> (B,1) when K == 1
        diff = Z - Y
        return float(np.mean(diff**2)), 2.0 * diff / diff.size  # mean over all B*K entries
    if model == "logistic":
        z = Z[:, 0]
        t = np.asarray(y, dtype=np.float64).reshape(B)
        L = np.mean(np.logaddexp(0.0, z) - t * z)  # log(1+e^z) without overflow
        sig = np.exp(-np.logaddexp(0.0, -z))  # sigmoid(z) = 1/(1+e^-z), overflow-free
        return float(L), ((sig - t) / B).reshape(B, 1)
    # softmax cross-entropy (softmax and mlp): subtract row max so exp never overflows
    labels = np.asarray(y).astype(np.int64).reshape(B)
    m = Z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(Z - m).sum(axis=1))
    L = np.mean(lse - Z[np.arange(B), labels])
    P = np.exp(Z - lse[:, None])
    P[np.arange(B), labels] -= 1.0
    return float(L), P / B


def loss(model, params, X, y, activation="relu", l2=0.0):
    """Scalar loss: mean data loss plus 0.5*l2*sum of squared weight matrices (no biases)."""
    Z = predict(model, params, X, activation)
    L, _ = _data_loss_and_dZ(model, Z, y)
    reg = sum(float(np.sum(np.asarray(params[w], dtype=np.float64) ** 2)) for w in WEIGHTS[model])
    return L + 0.5 * float(l2) * reg


def loss_and_grads(model, params, X, y, activation="relu", l2=0.0):
    """Loss and hand-written backprop gradients, same keys and shapes as params."""
    _check(model, activation)
    p = _as64(params)
    X = np.asarray(X, dtype=np.float64)
    g = {}
    if model != "mlp":
        Z = X @ p["W"] + p["b"]
        L, dZ = _data_loss_and_dZ(model, Z, y)
        g["W"] = X.T @ dZ
        g["b"] = dZ.sum(axis=0)
    else:
        A = X @ p["W1"] + p["b1"]
        Hh = np.maximum(A, 0.0) if activation == "relu" else np.tanh(A)
        Z = Hh @ p["W2"] + p["b2"]
        L, dZ = _data_loss_and_dZ(model, Z, y)
        g["W2"] = Hh.T @ dZ
        g["b2"] = dZ.sum(axis=0)
        dH = dZ @ p["W2"].T
        # relu'(A) = 1 where A > 0 else 0; tanh'(A) = 1 - tanh(A)^2
        dA = dH * (A > 0) if activation == "relu" else dH * (1.0 - Hh**2)
        g["W1"] = X.T @ dA
        g["b1"] = dA.sum(axis=0)
    reg = 0.0
    for w in WEIGHTS[model]:
        reg += float(np.sum(p[w] ** 2))
        g[w] = g[w] + float(l2) * p[w]  # d/dW of 0.5*l2*||W||^2
    return L + 0.5 * float(l2) * reg, {k: g[k] for k in p}


def numeric_grads(model, params, X, y, entries, h=1e-6, activation="relu", l2=0.0):
    """Central-difference gradient for each (name, index_tuple) in entries."""
    out = []
    for name, idx in entries:
        q = _as64(params)  # fresh copy per entry so perturbations never leak
        orig = q[name][idx]
        q[name][idx] = orig + h
        lp = loss(model, q, X, y, activation, l2)
        q[name][idx] = orig - h
        lm = loss(model, q, X, y, activation, l2)
        out.append((lp - lm) / (2.0 * h))
    return out


def init_params(model, D, K, H=None, rng: Optional[np.random.Generator] = None):
    """Random normal params scaled by 1/sqrt(fan_in); rng defaults to a fixed seed for reproducibility."""
    _check(model, "relu")
    rng = np.random.default_rng(0) if rng is None else rng
    if model == "logistic" and K != 1:
        raise ValueError("logistic requires K == 1")
    if model != "mlp":
        s = 1.0 / math.sqrt(D)
        return {"W": rng.normal(size=(D, K)) * s, "b": rng.normal(size=(K,)) * s}
    if H is None:
        raise ValueError("mlp requires H")
    s1, s2 = 1.0 / math.sqrt(D), 1.0 / math.sqrt(H)
    return {"W1": rng.normal(size=(D, H)) * s1, "b1": rng.normal(size=(H,)) * s1,
            "W2": rng.normal(size=(H, K)) * s2, "b2": rng.normal(size=(K,)) * s2}


if __name__ == "__main__":
    B, D, K, H = 13, 5, 3, 4
    rng = np.random.default_rng(1234)
    X = rng.normal(size=(B, D))
    cases = [("linear", "relu", K), ("logistic", "relu", 1), ("softmax", "relu", K),
             ("mlp", "relu", K), ("mlp", "tanh", K)]
    worst_all = 0.0
    for model, act, k in cases:
        if model == "linear":
            y = rng.normal(size=(B, k))
        elif model == "logistic":
            y = rng.integers(0, 2, size=B)
        else:
            y = rng.integers(0, k, size=B)
        params = init_params(model, D, k, H if model == "mlp" else None, rng)
        for l2 in (0.0, 0.1):
            L, g = loss_and_grads(model, params, X, y, act, l2)
            assert abs(L - loss(model, params, X, y, act, l2)) < 1e-12
            entries = [(n, i) for n in params for i in np.ndindex(params[n].shape)]
            num = numeric_grads(model, params, X, y, entries, activation=act, l2=l2)
            # guard the denominator at 1e-8 so exactly-zero grads (dead relu) compare by absolute error
            rel = [abs(g[n][i] - v) / max(abs(g[n][i]), abs(v), 1e-8) for (n, i), v in zip(entries, num)]
            worst = max(rel)
            worst_all = max(worst_all, worst)
            print(f"{model:8s} act={act:4s} l2={l2:.1f} loss={L:.6f} entries={len(entries):3d} "
                  f"max_rel_err={worst:.2e} {'OK' if worst < 1e-6 else 'FAIL'}")
            assert worst < 1e-6, (model, act, l2, worst)
    print(f"all checks passed, worst relative error {worst_all:.2e}")
