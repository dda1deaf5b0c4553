"""shared.fit.nuts: the adaptation's control flow under vmap."""

from __future__ import annotations

import pytest
from numpyro.infer.hmc_util import build_adaptation_schedule

from shared.fit.nuts import window_index


@pytest.mark.parametrize("num_warmup", [500, 150, 30, 11, 1])
def test_the_window_index_from_the_step_is_the_one_numpyro_carries(num_warmup):
    """NumPyro's adapter moves to the next window after the step that ends one; the index from t is that index."""
    schedule = build_adaptation_schedule(num_warmup)
    carried = 0
    for t in range(num_warmup):
        assert int(window_index(t, num_warmup)) == carried, t
        if t == schedule[carried].end:
            carried += 1

