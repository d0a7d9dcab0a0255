"""The server optimiser and the discriminative sampler against independent computations."""

import numpy as np
import pytest
import torch

from fwdllm.coordinator.optimizer import Optimizer, OptimizerConfig, learning_rate
from fwdllm.coordinator.sampler import cosines, samples_this_step, select
from fwdllm.errors import UserError
from fwdllm.proto.manifest import ThetaLayout
from fwdllm.proto.perturbation import generate, seed_for

LAYOUT = ThetaLayout.from_shapes(
    [("encoder.layer.0.bias", (6,)), ("classifier.weight", (2, 3)), ("classifier.bias", (2,))]
)


def test_linear_decay_is_fwdllms_schedule():
    cfg = OptimizerConfig(lr=0.1, schedule="linear")
    assert [learning_rate(cfg, t, 4) for t in range(4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert learning_rate(OptimizerConfig(lr=0.1, schedule="cosine"), 4, 4) == pytest.approx(0.0)
    assert learning_rate(OptimizerConfig(lr=0.1, schedule="constant", warmup_steps=2), 0, 4) == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_matches_torch_optimizers(name):
    rng = np.random.default_rng(0)
    theta = rng.normal(size=LAYOUT.dim).astype(np.float32)
    cfg = OptimizerConfig(name=name, lr=0.05, schedule="constant", momentum=0.8)
    opt = Optimizer(cfg, LAYOUT, total_steps=10)
    p = torch.nn.Parameter(torch.tensor(theta))
    ref = {
        "sgd": lambda: torch.optim.SGD([p], lr=0.05),
        "momentum": lambda: torch.optim.SGD([p], lr=0.05, momentum=0.8),
        "adam": lambda: torch.optim.Adam([p], lr=0.05, betas=(0.9, 0.999), eps=1e-8),
    }[name]()
    for step in range(5):
        g = rng.normal(size=LAYOUT.dim).astype(np.float32)
        theta, _ = opt.apply(theta, g, step)
        p.grad = torch.tensor(g)
        ref.step()
    np.testing.assert_allclose(theta, p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clip_normalise_and_group_learning_rates():
    g = np.full(LAYOUT.dim, 2.0, dtype=np.float32)
    theta = np.zeros(LAYOUT.dim, dtype=np.float32)
    clipped, info = Optimizer(OptimizerConfig(lr=1.0, schedule="constant", clip_norm=1.0), LAYOUT, 1).apply(theta, g, 0)
    assert np.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-5) and info["grad_norm"] == pytest.approx(
        2 * np.sqrt(14)
    )
    normed, _ = Optimizer(OptimizerConfig(lr=0.5, schedule="constant", normalize=True), LAYOUT, 1).apply(theta, g, 0)
    assert np.linalg.norm(normed) == pytest.approx(0.5, rel=1e-5)
    cfg = OptimizerConfig(
        lr=1.0,
        schedule="constant",
        groups=[{"match": "classifier.*", "lr_scale": 1.0}, {"match": "*.bias", "lr_scale": 0.1}],
    )
    opt = Optimizer(cfg, LAYOUT, 1)
    out, _ = opt.apply(theta, g, 0)
    np.testing.assert_allclose(out[:6], -0.2)  # encoder bias: second group
    np.testing.assert_allclose(out[6:], -2.0)  # classifier.*: first match wins
    assert not opt.replayable
    with pytest.raises(UserError, match="match no theta tensor"):
        Optimizer(OptimizerConfig(groups=[{"match": "lora_*", "lr_scale": 2}]), LAYOUT, 1)


def test_jvp_std_divides_the_estimate_by_the_spread_of_the_directional_derivatives():
    """FZOO's step: θ - lr · ĝ / std(jvp), whatever ĝ's own norm; SGD stays replayable (the scale is recorded)."""
    rng = np.random.default_rng(1)
    theta = rng.normal(size=LAYOUT.dim).astype(np.float32)
    grad = rng.normal(size=LAYOUT.dim).astype(np.float32)
    jvp = np.array([0.5, -1.5, 2.0, 0.25])
    opt = Optimizer(OptimizerConfig(lr=0.1, schedule="constant", jvp_std=True), LAYOUT, total_steps=10)
    new, info = opt.apply(theta, grad, 0, jvp_std=float(np.std(jvp)))
    spread = np.sqrt(np.mean((jvp - jvp.mean()) ** 2))
    np.testing.assert_allclose(new, theta - 0.1 * grad / spread, rtol=1e-5)
    assert info["grad_scale"] == pytest.approx(1 / spread) and opt.replayable
    assert opt.apply(theta, grad, 1, jvp_std=0.0)[1]["grad_scale"] == 0.0  # no spread: no information, no step


def test_sampler_ranks_all_candidates_by_cosine():
    dim = 3_000
    reference = np.random.default_rng(5).normal(size=dim).astype(np.float32)
    pool = [seed_for(1, i) for i in range(1_500)]  # more than the reference's 1,000-candidate window
    chosen, scores = select(pool, reference, 15, "gaussian", threads=2)
    dense = np.stack([generate(int(s), 0, dim) for s in pool]).astype(np.float64)
    cos = dense @ reference / (np.linalg.norm(dense, axis=1) * np.linalg.norm(reference))
    assert list(chosen) == [pool[i] for i in np.argsort(-cos)[:15]]
    np.testing.assert_allclose(scores, np.sort(cos)[::-1][:15], rtol=1e-5)
    random_cos = cosines(pool[:15], reference, "gaussian")
    assert scores.mean() > random_cos.mean() + 3 * random_cos.std() / np.sqrt(15)
    assert not samples_this_step(0) and samples_this_step(1)
