"""The penalty coefficient of the RL trainers: fixed, or steered toward a target distance."""

from __future__ import annotations

import math


class BetaController:
    r"""The penalty coefficient: fixed, or steered toward a target distance (Ziegler et al.'s adaptive KL,
    generalised to any regularizer).

    After each step with measured per-token distance :math:`D` and :math:`n` samples:
    :math:`e = \mathrm{clip}(D / D_{target} - 1, -0.2, 0.2)`, :math:`\beta \leftarrow \beta\,(1 + e\,n / H)`.
    Its state is saved in checkpoints (registered with the accelerator), so a resumed run continues the schedule.

    Args:
        beta: the initial value (>= 0).
        target: :math:`D_{target}` > 0, or None for a fixed beta.
        horizon: :math:`H` in samples (> 0).
    """

    def __init__(self, beta: float, target: float | None = None, horizon: float = 10000.0) -> None:
        self.value, self.target, self.horizon = float(beta), target, float(horizon)

    def update(self, distance: float, n_steps: int) -> float:
        """Move beta after a step that measured ``distance`` over ``n_steps`` samples; returns the new beta."""
        if self.target is not None and math.isfinite(distance):
            error = min(max(distance / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
