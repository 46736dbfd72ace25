"""Tests for rlhf_scratch.kl_control."""

import pytest

from rlhf_scratch.kl_control import AdaptiveKLController, FixedKLController


def test_fixed_controller_stays_fixed():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=1000)
    assert controller.value == 0.05


@pytest.mark.parametrize(
    "current_kl, factor",
    [
        (6.6, 1 + 0.1 * 256 / 10000),  # 6.6/6 − 1 = +0.1: KL too high, coefficient rises
        (5.4, 1 - 0.1 * 256 / 10000),  # 5.4/6 − 1 = −0.1: KL too low, coefficient falls
        (6.0, 1.0),  # on target: unchanged
        (60.0, 1 + 0.2 * 256 / 10000),  # error 9 is clipped to +0.2
        (0.0, 1 - 0.2 * 256 / 10000),  # error −1 is clipped to −0.2
    ],
)
def test_adaptive_controller_by_hand(current_kl, factor):
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6, horizon=10000)
    controller.update(current_kl, n_steps=256)
    assert controller.value == pytest.approx(0.2 * factor, rel=1e-12)


def test_adaptive_controller_compounds_over_updates():
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    for _ in range(3):
        controller.update(2.0, n_steps=10)  # error clipped to 0.2, factor 1.02 each time
    assert controller.value == pytest.approx(0.1 * 1.02**3)


def test_state_round_trip_resumes_exactly():
    for make in (lambda: AdaptiveKLController(0.2, 6.0, 10000), lambda: FixedKLController(0.3)):
        controller = make()
        controller.update(8.0, 512)
        resumed = make()
        resumed.load_state_dict(controller.state_dict())
        assert resumed.value == controller.value
        controller.update(4.0, 512)
        resumed.update(4.0, 512)
        assert resumed.value == controller.value


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.2, target=0.0, horizon=10000)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.2, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
    with pytest.raises(ValueError, match="not finite"):
        AdaptiveKLController(0.2, 6.0, 10000).update(float("nan"), 256)
