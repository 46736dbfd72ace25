"""benchmarks/cost_curves.py: the growth fit on known power laws, the sweep's points, the raw loop's parts and the
flag on faster growth (no model is run; ``--quick`` is the end-to-end smoke run, ~1 min on a busy machine)."""

import math

import pytest
from benchmark_scripts import load_benchmark_script


@pytest.fixture(scope="module")
def curves():
    return load_benchmark_script("cost_curves")


def test_fit_recovers_a_known_power_law(curves):
    xs = [24, 64, 128, 256]
    a, b = curves.fit_power(xs, [3 * x**1.5 for x in xs])
    assert b == pytest.approx(1.5, abs=1e-12) and a == pytest.approx(3.0, rel=1e-12)
    a, b = curves.fit_power([16, 64, 256], [0.25, 1.0, 4.0])  # linear: t = x / 64
    assert b == pytest.approx(1.0, abs=1e-12) and a == pytest.approx(1 / 64, rel=1e-12)


def test_fit_is_least_squares_on_log_log(curves):
    # log t = (0, 1, 3) at log x = (0, 1, 2): slope Σ(u-1)(v-4/3) / Σ(u-1)² = (4/3 + 5/3) / 2 = 1.5, intercept -1/6.
    a, b = curves.fit_power([1, math.e, math.e**2], [1, math.e, math.e**3])
    assert b == pytest.approx(1.5, abs=1e-12) and math.log(a) == pytest.approx(-1 / 6, abs=1e-12)


def test_fit_refuses_what_it_cannot_fit(curves):
    with pytest.raises(ValueError, match="two distinct x"):
        curves.fit_power([16, 16], [1.0, 2.0])
    with pytest.raises(ValueError, match="must be > 0"):
        curves.fit_power([16, 64], [0.0, 1.0])


def test_sweep_points_share_the_corner(curves):
    sweep = curves.sweep_points([24, 64, 128, 256], [16, 64, 256], length_batch=16, batch_length=24)
    assert sweep["axes"]["length"] == [(16, 24), (16, 64), (16, 128), (16, 256)]
    assert sweep["axes"]["batch"] == [(16, 24), (64, 24), (256, 24)]
    assert sweep["unique"] == [(16, 24), (16, 64), (16, 128), (16, 256), (64, 24), (256, 24)]  # (16, 24) once


def test_raw_parts_count_the_passes_the_engine_makes(curves):
    update = {"generation": 1.0, "forward": 0.25, "learning": 2.0}
    from_generation = curves.raw_parts(update, engine_policy_forward=False)
    assert "policy_forward" not in from_generation and from_generation["total"] == 3.25
    with_forward = curves.raw_parts(update, engine_policy_forward=True)
    assert with_forward["policy_forward"] == 0.25 and with_forward["total"] == 3.5


def test_growth_and_flags(curves):
    assert curves.point_of(curves.point_key(16, 24)) == (16, 24)
    axes = {"length": [curves.point_key(16, g) for g in (24, 64, 128)]}
    medians = {  # raw learning linear in G; the engine's quadratic: flagged. Generation alike: not flagged.
        "raw": {f"B16_G{g}": {"generation": g / 100, "learning": g / 10} for g in (24, 64, 128)},
        "engine": {f"B16_G{g}": {"generation": 1.1 * g / 100, "learning": g**2 / 1000, "reward": 1e-4}
                   for g in (24, 64, 128)},
    }
    fits = curves.growth(medians, axes)
    assert fits["length"]["engine"]["learning"][1] == pytest.approx(2.0)
    assert fits["length"]["engine"]["reward"] is None  # under MIN_SECONDS: not fitted
    flagged = curves.flags(fits)
    assert len(flagged) == 1 and flagged[0].startswith("engine learning grows as length^2.00")


def test_bad_arguments_are_one_line(curves, capsys):
    with pytest.raises(SystemExit):
        curves.parse_args(["--batches", "16", "24", "--minibatch", "16"])
    assert "must divide every batch" in capsys.readouterr().err
    quick = curves.parse_args(["--quick"])
    assert quick.rounds == 1 and max(quick.lengths) <= 8 and max(quick.batches) <= 8
