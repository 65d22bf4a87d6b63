"""Power-function EMA and post-hoc EMA reconstruction (docs/algorithms.md, "Power-function EMA and post-hoc EMA").

Times are counted in images. `PowerFunctionEMA` averages every floating-point entry of a
module's `state_dict()` (parameters and float buffers), so `ema_state(sigma_rel)` can be
loaded back with `net.load_state_dict(...)` when the module has no other entries.
"""

from collections.abc import Iterable, Sequence

import numpy as np
import torch

SIGMA_REL_MAX = float(np.sqrt(1.0 / 12.0))  # sigma_rel at gamma = 0


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the power-function profile with exponent gamma (EDM2, Eq. 123)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of a profile with relative std sigma_rel: largest real root of the cubic."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    s2 = sigma_rel**-2
    # g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0 (EDM2, Eq. 126)
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return max(float(roots[np.isreal(roots)].real.max()), 0.0)


def _inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Closed-form <p_a, p_b> of power-function profiles on [0, t] (EDM2, Eq. 151); broadcasts."""
    e = np.where(t_a < t_b, g_b, -g_a)
    num = (g_a + 1) * (g_b + 1) * (t_a / t_b) ** e
    return num / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    in_times: Sequence[float],
    in_sigma_rel: Sequence[float],
    out_times: Sequence[float],
    out_sigma_rel: Sequence[float],
) -> np.ndarray:
    """Weights [n_in, n_out] that combine snapshots into the wanted profiles; columns sum to 1."""
    t_in, t_out = np.asarray(in_times, np.float64), np.asarray(out_times, np.float64)
    if t_in.shape != (len(in_sigma_rel),) or t_out.shape != (len(out_sigma_rel),):
        raise ValueError("times and sigma_rels must be 1-D sequences of equal length")
    if t_in.min() <= 0 or t_out.max() > t_in.max():
        raise ValueError("times must be > 0 and targets no later than the last snapshot")
    g_in = np.array([sigma_rel_to_gamma(s) for s in in_sigma_rel])
    g_out = np.array([sigma_rel_to_gamma(s) for s in out_sigma_rel])
    gram = _inner(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])  # [n_in, n_in]
    rhs = _inner(t_in[:, None], g_in[:, None], t_out[None, :], g_out[None, :])  # [n_in, n_out]
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]  # solve A X = B (EDM2, Algorithm 3)
    return x / x.sum(axis=0, keepdims=True)


def _float_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if v.is_floating_point()}


class PowerFunctionEMA:
    """EMAs of a module's float state for several sigma_rels, updated in images (EDM2, Section 3)."""

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float]) -> None:
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        state = _float_state(net)
        self.names = list(state)
        self.emas = [[t.detach().clone() for t in state.values()] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, nimg: int, batch: int) -> None:
        """Fold in the weights after a step; nimg = images seen after it (first step: nimg == batch)."""
        if not 0 < batch <= nimg:
            raise ValueError(f"need 0 < batch <= nimg, got batch={batch}, nimg={nimg}")
        state = _float_state(net)
        src = [state[name] for name in self.names]
        for gamma, ema in zip(self.gammas, self.emas):
            beta = (1.0 - batch / nimg) ** (gamma + 1)  # EDM2, Eq. 127
            torch._foreach_lerp_(ema, src, 1.0 - beta)  # ema = beta*ema + (1-beta)*theta

    def ema_state(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """CPU copy of the EMA tracked at sigma_rel, keyed like net.state_dict()."""
        ema = self.emas[self._index(sigma_rel)]
        return {name: t.to("cpu", copy=True) for name, t in zip(self.names, ema)}

    def state_dict(self) -> dict:
        """{"sigma_rels": [...], "emas": [state per sigma_rel]}; loadable with weights_only=True."""
        return {"sigma_rels": list(self.sigma_rels), "emas": [self.ema_state(s) for s in self.sigma_rels]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore EMAs saved by state_dict(); the sigma_rels and names must match."""
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"checkpoint tracks sigma_rels {state['sigma_rels']}, not {self.sigma_rels}")
        for ema, saved in zip(self.emas, state["emas"]):
            if list(saved) != self.names:
                raise ValueError("checkpoint EMA entries do not match the module's state_dict")
            torch._foreach_copy_(ema, [saved[name] for name in self.names])

    def _index(self, sigma_rel: float) -> int:
        for i, s in enumerate(self.sigma_rels):
            if np.isclose(s, sigma_rel, rtol=0, atol=1e-9):
                return i
        raise ValueError(f"sigma_rel {sigma_rel} is not tracked; tracked: {self.sigma_rels}")


def reconstruct(
    snapshots: Iterable[dict[str, torch.Tensor]], coefficients: np.ndarray
) -> list[dict[str, torch.Tensor]]:
    """Post-hoc EMAs: output j = sum_i coefficients[i, j] * snapshot i, streamed (float32)."""
    n_in, n_out = coefficients.shape
    keys: list[str] = []
    outs: list[list[torch.Tensor]] = []
    n_seen = 0
    for snap in snapshots:  # one snapshot alive at a time: memory = model x (n_out + 1)
        if n_seen == n_in:
            raise ValueError(f"more snapshots than the {n_in} rows of coefficients")
        if not outs:
            keys = list(snap)
            outs = [[torch.zeros_like(snap[k], dtype=torch.float32) for k in keys] for _ in range(n_out)]
        src = [snap[k].float() for k in keys]
        for j, out in enumerate(outs):
            torch._foreach_add_(out, src, alpha=float(coefficients[n_seen, j]))
        n_seen += 1
        del snap, src
    if n_seen == 0:
        raise ValueError("no snapshots to reconstruct from")
    if n_seen != n_in:
        raise ValueError(f"got {n_seen} snapshots for {n_in} rows of coefficients")
    return [dict(zip(keys, out)) for out in outs]
