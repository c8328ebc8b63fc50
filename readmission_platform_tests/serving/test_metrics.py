import numpy as np
import prometheus_client
import pytest

from readmission_platform.serving.metrics import observe_many


def buckets(histogram) -> dict[str, float]:
    return {
        s.labels.get("le", s.name.rsplit("_", 1)[-1]): s.value
        for m in histogram.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def test_observing_many_values_at_once_equals_observing_each():
    registry = prometheus_client.CollectorRegistry()
    bounds = (0.05, 0.1, 0.14, 0.5, 1.0)
    one = prometheus_client.Histogram("one", "each", buckets=bounds, registry=registry)
    many = prometheus_client.Histogram("many", "at once", buckets=bounds, registry=registry)
    values = np.concatenate([np.random.default_rng(0).random(1_000) ** 3, bounds])  # values on the bounds too
    for value in values:
        one.observe(float(value))
    observe_many(many, values)
    assert buckets(one) == pytest.approx(buckets(many), rel=1e-12)  # the sum only differs in its last bits
