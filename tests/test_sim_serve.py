"""The serving simulator's event loop (benchmarks/sim_serve.py) against hand-computed schedules."""

import sys
from pathlib import Path

import numpy as np
import pytest

from nextscale.engine.scheduler import SchedulerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sim_serve as sim

COST = sim.CostModel(F=1.0, c=(0.1, 0.2, 0.3), G=0.05, d0=0.5, d1=0.25, tokens=(1, 4, 9))
OPEN = SchedulerConfig(max_tokens=10**6, max_rows=10**6, max_running=10**6)


def test_a_lone_request_costs_the_same_in_both_servers():
    arrivals = np.array([2.0])
    one_pass = 3 * COST.F + sum(COST.c) + COST.decode(1)
    lat_e, ttfp_e = sim.simulate_engine(COST, arrivals, OPEN)
    lat_s, ttfp_s = sim.simulate_static(COST, arrivals, B=4)
    assert lat_e[0] == pytest.approx(one_pass) and lat_s[0] == pytest.approx(one_pass)
    assert ttfp_e[0] == pytest.approx(COST.F + 0.1) and ttfp_s[0] == pytest.approx(COST.F + 0.1)


def test_static_batches_wait_for_the_batch_in_progress():
    arrivals = np.array([0.0, 0.5, 0.6])  # the 2nd and 3rd arrive while the 1st is running alone
    lat, _ = sim.simulate_static(COST, arrivals, B=8)
    first_done = 3 * COST.F + sum(COST.c) + COST.decode(1)
    second_batch = 3 * COST.F + 2 * sum(COST.c)
    assert lat[0] == pytest.approx(first_done)
    assert lat[1] == pytest.approx(first_done + second_batch + COST.decode(1) - 0.5)
    assert lat[2] == pytest.approx(first_done + second_batch + 2 * COST.decode(1) - 0.6)


def test_engine_fuses_a_late_arrival_into_the_running_iterations():
    arrivals = np.array([0.0, 0.5])  # arrives during the first request's first iteration
    lat, ttfp = sim.simulate_engine(COST, arrivals, OPEN)
    it1 = COST.F + 0.1  # request 0 at scale 0
    it2 = COST.F + 0.2 + 0.1 + COST.G  # request 0 at scale 1, request 1 at scale 0: two distinct scales
    it3 = COST.F + 0.3 + 0.2 + COST.G
    assert ttfp[1] == pytest.approx(it1 + it2 - 0.5)
    assert lat[0] == pytest.approx(it1 + it2 + it3 + COST.decode(1))
    it4 = COST.F + 0.3
    assert lat[1] == pytest.approx(it1 + it2 + it3 + COST.decode(1) + it4 + COST.decode(1) - 0.5)


def test_scaling_unit_costs_keeps_fixed_costs():
    s = COST.scaled(0.1)
    assert s.F == COST.F and s.G == COST.G and s.d0 == COST.d0
    assert s.c == pytest.approx((0.01, 0.02, 0.03)) and s.d1 == pytest.approx(0.025)
