"""Power-function EMA and post-hoc reconstruction against closed forms.

The formulas: docs/algorithms.md, "Power-function EMA and post-hoc EMA"."""

import io

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from pipeline.diffusion.phema import (
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)

KNOWN_PAIRS = [(0.050, 16.97), (0.100, 6.94), (0.130, 4.60), (0.010, 96.99)]  # EDM2, Eq. 126
DIM = 8
_rng = np.random.default_rng(0)
FREQ, PHASE, QUAD = _rng.uniform(0.5, 3.0, DIM), _rng.uniform(0, 2 * np.pi, DIM), _rng.normal(size=DIM)


def trajectory(u: float) -> np.ndarray:
    """A smooth synthetic parameter path theta(u) [DIM], u = time / total time."""
    return np.sin(2 * np.pi * FREQ * u + PHASE) + QUAD * u**2


class Params(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
        self.register_buffer("scale", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def set(self, theta: np.ndarray) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(theta))
            self.scale.fill_(float(theta[0]))


@pytest.mark.parametrize("sigma_rel, gamma", KNOWN_PAIRS)
def test_sigma_rel_gamma_known_pairs_and_round_trip(sigma_rel: float, gamma: float) -> None:
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, abs=0.005)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, abs=0.0005)
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.29, 1.0])
def test_sigma_rel_out_of_range_raises(sigma_rel: float) -> None:
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(sigma_rel)


def test_solve_coefficients_columns_sum_to_one_and_inputs_map_to_unit_columns() -> None:
    times = np.arange(1, 21) * 1_000_000.0
    in_times, in_sigma = np.concatenate([times, times]), [0.05] * 20 + [0.10] * 20
    out_times, out_sigma = [20e6, 13e6, 7e6], [0.07, 0.05, 0.10]
    x = solve_coefficients(in_times, in_sigma, out_times, out_sigma)
    assert x.shape == (40, 3)
    np.testing.assert_allclose(x.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(x[:, 1], np.eye(40)[12], atol=1e-6)  # 0.05 at 13 Mi = input 12
    np.testing.assert_allclose(x[:, 2], np.eye(40)[26], atol=1e-6)  # 0.10 at 7 Mi = input 26
    with pytest.raises(ValueError, match="last snapshot"):
        solve_coefficients(in_times, in_sigma, [21e6], [0.07])


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.2])
def test_update_matches_power_function_average(sigma_rel: float) -> None:
    steps, batch = 2000, 4
    net = Params()
    ema = PowerFunctionEMA(net, [sigma_rel])
    mids = (np.arange(1, steps + 1) - 0.5) / steps
    for k, u in enumerate(mids, start=1):
        net.set(trajectory(u))  # weights held during step k: the midpoint of its interval
        ema.update(net, nimg=k * batch, batch=batch)
    got = ema.ema_state(sigma_rel)["weight"].numpy()
    g = sigma_rel_to_gamma(sigma_rel)
    # EDM2, Section 3: theta_g(t) = (g+1)/t^(g+1) int_0^t tau^g theta(tau) dtau, with u = tau/t;
    # exact for the piecewise-constant path: step k weighs u_k^(g+1) - u_{k-1}^(g+1)
    edges = np.arange(steps + 1) / steps
    step_weights = np.diff(edges ** (g + 1))
    piecewise = step_weights @ np.stack([trajectory(u) for u in mids])
    np.testing.assert_allclose(got, piecewise, rtol=0, atol=1e-12)
    integrals = [quad(lambda u: u**g * trajectory(u)[d], 0, 1, limit=200)[0] for d in range(DIM)]
    # the smooth path differs from the piecewise-constant one by the midpoint rule's O(steps^-2)
    np.testing.assert_allclose(got, (g + 1) * np.array(integrals), rtol=0, atol=1e-4)


def test_first_update_copies_net_and_state_dict_round_trips() -> None:
    net = Params()
    ema = PowerFunctionEMA(net, [0.05, 0.10])
    net.set(trajectory(0.3))
    ema.update(net, nimg=16, batch=16)  # first step: beta = 0
    state = ema.ema_state(0.10)
    assert set(state) == {"weight", "scale"}  # float entries of state_dict(), int buffers skipped
    torch.testing.assert_close(state["weight"], net.weight.detach())
    net.set(trajectory(0.9))
    ema.update(net, nimg=32, batch=16)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = PowerFunctionEMA(Params(), [0.05, 0.10])
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for s in (0.05, 0.10):
        torch.testing.assert_close(restored.ema_state(s), ema.ema_state(s), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not tracked"):
        ema.ema_state(0.07)
    with pytest.raises(ValueError, match="batch"):
        ema.update(net, nimg=8, batch=16)


def test_reconstruction_matches_directly_tracked_ema() -> None:
    steps, every = 4000, 100
    net = Params()
    ema = PowerFunctionEMA(net, [0.05, 0.10, 0.07])
    snaps: dict[float, list[dict[str, torch.Tensor]]] = {0.05: [], 0.10: []}
    for k in range(1, steps + 1):
        net.set(trajectory(k / steps))
        ema.update(net, nimg=k, batch=1)
        if k % every == 0:
            for s, lst in snaps.items():
                lst.append(ema.ema_state(s))
    times = list(range(every, steps + 1, every))
    coef = solve_coefficients(times * 2, [0.05] * len(times) + [0.10] * len(times), [steps], [0.07])
    (out,) = reconstruct(iter(snaps[0.05] + snaps[0.10]), coef)
    direct = ema.ema_state(0.07)
    spread = (ema.ema_state(0.05)["weight"] - ema.ema_state(0.10)["weight"]).abs().max().item()
    err = (out["weight"].double() - direct["weight"]).abs().max().item()
    assert out["weight"].dtype == torch.float32
    assert spread > 0.3  # the two tracked EMAs differ a lot on this trajectory
    assert err < 2e-5, f"reconstruction error {err:.2e} (EMA spread {spread:.2f})"  # measured 4.7e-6
    torch.testing.assert_close(out["scale"].double(), direct["scale"], rtol=0, atol=2e-5)


def test_reconstruct_checks_snapshot_count() -> None:
    snap = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="2 rows"):
        reconstruct([snap], np.ones((2, 1)))
    with pytest.raises(ValueError, match="more snapshots"):
        reconstruct([snap, snap, snap], np.ones((2, 1)))
