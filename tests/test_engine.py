"""The forward-gradient engine against autograd (torch.func.jvp in float64 on the exporter's model).

Tolerances, from measurement on the test bundle (tiny BERT, BitFit top layer, d = 387;
|∇f·v| up to 1.8 over 40 seeds): central differences have truncation error O(ε²): the
max |jvp − ∇f·v| was 0.48 at ε=0.1 and 5.2e-3 at ε=0.01 (ONNX Runtime and LiteRT alike),
then float32 rounding of the loss takes over (~1e-4 at ε=1e-3, ≈ ulp(loss)/ε). Forward
differences are O(ε): 0.25 at ε=0.01, 0.025 at ε=1e-3. Each test allows about 3× the
measured error, so a wrong sign, scale or seed order fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from device_standin import LABELS, TEXTS, initial_theta, shared_backend, shared_bundle, theta_dim

from fwdllm.device_runtime.engine import Cancelled, EngineError, forward_gradients
from fwdllm.proto.perturbation import generate

BACKENDS = ["onnxruntime", "litert"]
SEEDS = [(7 << 32) | i for i in range(40)]


@pytest.fixture
def opened():
    return shared_backend


@pytest.fixture(scope="module")
def reference():
    return shared_bundle()[1].double()


def batch_of(backend):
    from fwdllm.device_runtime.examples import Example

    return backend.tokenizer().batch([Example(text=t, label=LABELS.index(lab)) for t, lab in TEXTS])


def autograd(model, batch, theta, seeds, dist="gaussian"):
    """∇f(θ)·v(seed) for each seed, and ∇f(θ), in float64 (one backward pass, then dot products)."""
    ids, mask, labels = (torch.tensor(x) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    grad = torch.func.grad(lambda x: model.loss(ids, mask, labels, x[None])[0][0])(
        torch.tensor(theta, dtype=torch.float64)
    ).numpy()
    jvps = np.array([generate(s, 0, grad.size, dist).astype(np.float64) @ grad for s in seeds])
    return jvps, grad


@pytest.mark.parametrize("name", BACKENDS)
def test_central_jvp_equals_autograd_directional_derivative(opened, reference, name):
    backend = opened(name, True)
    batch, theta = batch_of(backend), initial_theta()
    want, _ = autograd(reference, batch, theta, SEEDS)
    coarse = forward_gradients(backend, batch, theta, SEEDS, epsilon=0.1)
    fine = forward_gradients(backend, batch, theta, SEEDS, epsilon=0.01)
    assert fine.nonfinite == [] and fine.seeds == SEEDS and fine.evaluations == 2 * len(SEEDS)
    np.testing.assert_allclose(fine.jvp, want, rtol=0, atol=1.5e-2)
    # second order: 10× smaller ε gives ~100× smaller error (not merely 10×)
    ratio = np.abs(coarse.jvp - want).max() / np.abs(fine.jvp - want).max()
    assert ratio > 50
    assert coarse.loss_min <= fine.loss_mean <= coarse.loss_max and np.isnan(fine.loss_base)


@pytest.mark.parametrize("name", BACKENDS)
def test_forward_scheme_and_rademacher(opened, reference, name):
    backend = opened(name, False)
    batch, theta = batch_of(backend), initial_theta(3)
    want, _ = autograd(reference, batch, theta, SEEDS[:12], "rademacher")
    got = forward_gradients(
        backend, batch, theta, SEEDS[:12], epsilon=1e-3, scheme="forward", distribution="rademacher"
    )
    assert got.evaluations == 13 and np.isfinite(got.loss_base)
    np.testing.assert_allclose(got.jvp, want, rtol=0, atol=0.075)


@pytest.mark.parametrize("dist", ["gaussian", "sparse-gaussian-0.1"])
def test_average_of_jvp_times_v_approaches_the_gradient(opened, reference, dist):
    backend = opened("onnxruntime", True)
    batch, theta = batch_of(backend), initial_theta()
    seeds = list(range(2000))
    result = forward_gradients(backend, batch, theta, seeds, group=250, distribution=dist)
    _, grad = autograd(reference, batch, theta, [])
    estimate, cosines = np.zeros_like(grad), {}
    for i, (s, j) in enumerate(zip(seeds, result.jvp), 1):
        estimate += j * generate(s, 0, theta.size, dist)
        if i in (10, 100, 2000):
            cosines[i] = float(estimate @ grad / np.linalg.norm(estimate) / np.linalg.norm(grad))
    # theory for Gaussian v: cos ≈ sqrt(n / (n + d + 1)) with d = 387: 0.16, 0.45, 0.92; sparse v (E[v_i⁴] = 3/ρ
    # instead of 3) adds 3/ρ − 3 = 27 to d + 1: 0.15, 0.44, 0.91
    assert cosines[10] < cosines[100] < cosines[2000]
    assert cosines[2000] > 0.85 and cosines[10] < 0.5
    # unbiased: the mean estimate's length along ∇f is |∇f| (a sparse v without its 1/√ρ scale gives 0.1)
    along = float(estimate @ grad / len(seeds) / (grad @ grad))
    assert 0.85 < along < 1.15, along


@pytest.mark.parametrize("name", BACKENDS)
def test_grouping_does_not_change_results(opened, name):
    backend = opened(name, False)
    batch, theta = batch_of(backend), initial_theta()
    a = forward_gradients(backend, batch, theta, SEEDS[:9], group=1)
    b = forward_gradients(backend, batch, theta, SEEDS[:9], group=9)
    np.testing.assert_allclose(a.jvp, b.jvp, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_nonfinite_losses_are_reported_never_sent_as_numbers(opened, name):
    backend = opened(name, False)
    batch = batch_of(backend)
    theta = initial_theta()
    theta[:] = 3e38  # every θ entry near float32 max: activations overflow to inf, the loss is NaN
    result = forward_gradients(backend, batch, theta, SEEDS[:5])
    assert result.nonfinite == [0, 1, 2, 3, 4]
    assert np.all(result.jvp == 0) and np.isnan(result.loss_mean)


def test_bad_requests_are_clear_errors(opened):
    backend = opened("onnxruntime", False)
    batch, theta = batch_of(backend), initial_theta()
    cases = [
        (dict(seeds=SEEDS, max_seeds=8), "40 seeds but at most 8"),
        (dict(seeds=[]), "at least one seed"),
        (dict(seeds=[-1]), "unsigned 64-bit"),
        (dict(seeds=SEEDS[:2], epsilon=0.0), "positive finite"),
        (dict(seeds=SEEDS[:2], scheme="backward"), "unknown difference scheme"),
        (dict(seeds=SEEDS[:2], distribution="uniform"), "unknown distribution"),
    ]
    for kwargs, message in cases:
        with pytest.raises(EngineError, match=message):
            forward_gradients(backend, batch, theta, **kwargs)
    with pytest.raises(EngineError, match=f"length {theta_dim()}"):
        forward_gradients(backend, batch, theta[:-1], SEEDS[:2])
    bad = theta.copy()
    bad[0] = np.nan
    with pytest.raises(EngineError, match="NaN or Inf"):
        forward_gradients(backend, batch, bad, SEEDS[:2])


def test_cancellation_between_calls(opened):
    backend = opened("onnxruntime", False)
    calls = []
    with pytest.raises(Cancelled):
        forward_gradients(
            backend,
            batch_of(backend),
            initial_theta(),
            SEEDS,
            group=4,
            should_stop=lambda: calls.append(1) or len(calls) > 2,
        )
    assert len(calls) == 3
