"""The descriptive log-log slope of benchmarks/protocol_answers.py: it recovers a known
exponent, and its seed-resampled interval widens with the seed noise."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "protocol_answers.py"
spec = importlib.util.spec_from_file_location("protocol_answers", SCRIPT)
protocol_answers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(protocol_answers)


class FakeResults:
    """Per-seed accuracies by key; error = 1 - accuracy, as for an accuracy metric."""

    def __init__(self, values: dict):
        self._values = values

    def values(self, key):
        return self._values.get(key, [])

    def error(self, value):
        return 1.0 - value


def cells(noise: float, seeds: int = 5):
    rng = np.random.default_rng(1)
    out = {}
    for x in (1, 4, 16, 64):  # error = 0.4 * x^-0.3, seed noise on the accuracy
        err = 0.4 * x ** -0.3
        out[("m", "lora", x, 1.0)] = list(1.0 - err + noise * rng.standard_normal(seeds))
    return FakeResults(out)


def test_slope_recovers_the_exponent_and_the_interval_grows_with_noise():
    keys = [("m", "lora", x, 1.0) for x in (1, 4, 16, 64)]
    quiet = protocol_answers.loglog_slope(cells(0.002), keys, lambda k: k[2], 400)
    noisy = protocol_answers.loglog_slope(cells(0.03), keys, lambda k: k[2], 400)
    assert abs(quiet[0] + 0.3) < 0.03
    assert quiet[1] <= -0.3 <= quiet[2]
    assert (noisy[2] - noisy[1]) > 3 * (quiet[2] - quiet[1])


def test_slope_needs_two_cells_with_two_seeds():
    res = FakeResults({("m", "lora", 1, 1.0): [0.8, 0.81], ("m", "lora", 4, 1.0): [0.82]})
    keys = [("m", "lora", 1, 1.0), ("m", "lora", 4, 1.0)]
    assert protocol_answers.loglog_slope(res, keys, lambda k: k[2], 10) is None
