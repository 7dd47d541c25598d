"""pipeline.observe_ages: the end-to-end histogram filled from stream entry ids in C-level passes
gives the same buckets, count and sum as one Histogram.observe() per id (issue 13)."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from prometheus_client import CollectorRegistry, Histogram

from processor.core.metrics import Metrics
from processor.core.pipeline import observe_ages

NOW_S = 1_764_770_000.1234  # 0.4 ms past a millisecond: no age falls exactly on a bound


def _histogram() -> Histogram:
    # The service's own histogram (its bounds), in a registry of its own.
    return Metrics(registry=CollectorRegistry()).end_to_end_seconds


def _state(h: Histogram) -> tuple[list[float], float]:
    samples = {(s.name, s.labels.get("le")): s.value for m in h.collect() for s in m.samples}
    buckets = [v for (name, _), v in sorted(samples.items(), key=lambda kv: float(kv[0][1] or 0))
               if name.endswith("_bucket")]
    return buckets, samples[(h._name + "_sum", None)]  # type: ignore[attr-defined]


def _by_observe(ids: list[str]) -> tuple[list[float], float]:
    h = _histogram()
    for i in ids:
        h.observe(max(NOW_S - int(i.split("-")[0]) / 1000, 0.0))
    return _state(h)


def _by_ages(ids: list[str]) -> tuple[list[float], float]:
    h = _histogram()
    observe_ages(h, NOW_S, ids)
    return _state(h)


def _ids(ages_ms: list[int]) -> list[str]:
    now_ms = int(NOW_S * 1000)
    return [f"{now_ms - age}-{seq}" for seq, age in enumerate(ages_ms)]  # ages 0.4 ms more than given


@pytest.mark.parametrize("seed", range(20))
def test_the_same_buckets_count_and_sum_as_observe_for_random_batches(seed: int) -> None:
    rng = random.Random(seed)
    ages = [int(rng.expovariate(1 / rng.choice([5, 50, 500, 5_000, 60_000]))) + 1 for _ in range(rng.randint(1, 1500))]
    ages.sort(reverse=True)  # a batch's ids ascend: the oldest first
    if seed % 3 == 0:
        rng.shuffle(ages)  # ids in any order (settling after a split) count the same
    ids = _ids(ages)
    buckets, total = _by_ages(ids)
    want_buckets, want_total = _by_observe(ids)
    assert buckets == want_buckets
    assert buckets[-1] == len(ids)
    # The sum, against the exact one: observe() rounds each age (a large float minus another, 2e-7 s each);
    # observe_ages() subtracts small numbers only.
    exact = float(sum(Fraction(NOW_S) - Fraction(int(i.split("-")[0]), 1000) for i in ids))
    assert abs(total - exact) <= 1e-6, (total - exact, want_total - exact)


def test_ids_ahead_of_the_clock_count_as_age_zero() -> None:
    ids = _ids([-2_000, -1, 0, 3, 40_000])  # two from a clock ahead of ours
    buckets, total = _by_ages(ids)
    assert buckets == _by_observe(ids)[0]
    # ages -1,999.6 and -0.6 ms (counted as 0), 0.4, 3.4 and 40,000.4 ms; the first bucket's bound is 5 ms
    assert buckets[0] == 4 and buckets[-1] == 5 and total == pytest.approx(0.0004 + 0.0034 + 40.0004, abs=1e-6)


def test_nothing_to_observe_leaves_the_histogram_untouched() -> None:
    buckets, total = _by_ages([])
    assert set(buckets) == {0.0} and total == 0.0


def test_a_histogram_without_the_private_fields_falls_back_to_observe() -> None:
    class Plain:
        def __init__(self) -> None:
            self.values: list[float] = []

        def observe(self, value: float) -> None:
            self.values.append(value)

    h = Plain()
    observe_ages(h, NOW_S, _ids([1_500, -5]))  # type: ignore[arg-type]
    assert h.values == [pytest.approx(1.5004, abs=1e-6), 0.0]
