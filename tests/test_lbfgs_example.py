"""examples/lbfgs_client.py: scipy's L-BFGS-B through the gradient RPC reaches the numpy + scipy optimum."""
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from lbfgs_client import minimize_through_service  # noqa: E402


def test_lbfgs_through_the_service_reaches_the_numpy_optimum(client, tmp_path):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((200, 15))
    y = (X @ rng.standard_normal(15) + 0.5 * rng.standard_normal(200) > 0).astype(np.float64)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    l2 = 0.05                                              # strictly convex: one optimum
    job = client.create_job("logistic", shards=3, dtype="float64", l2=l2, npz_path=str(tmp_path / "d.npz"))
    theta0 = client.get_params(job.job_id, flat=True)["flat"]
    got = minimize_through_service(client, job.job_id, theta0)

    def numpy_fun(theta):
        params = {"W": theta[:15].reshape(15, 1), "b": theta[15:]}
        loss, g = ref.loss_and_grads("logistic", params, X, y, l2=l2)
        return loss, np.concatenate([g["W"].ravel(), g["b"]])

    expected = minimize(numpy_fun, theta0, jac=True, method="L-BFGS-B")
    assert got.success and expected.success
    assert got.fun == expected.fun or abs(got.fun - expected.fun) < 1e-9
    np.testing.assert_allclose(got.x, expected.x, atol=1e-4)
    assert np.linalg.norm(numpy_fun(got.x)[1]) < 1e-4      # a true optimum: the gradient vanishes
    client.delete_job(job.job_id)
