"""The discovery harness's verdict on the issue's goal, read off embed reports."""

import importlib.util

from support.apps import REPO

spec = importlib.util.spec_from_file_location(
    "bench_discovery", REPO / "bench" / "bench_discovery.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def row(model, lm, handcrafted, pitch_classes) -> dict:
    cells = zip(
        ("model", "language_model", "handcrafted", "pitch_classes"),
        (model, lm, handcrafted, pitch_classes),
        strict=True,
    )
    return {name: {"accuracy": a, "std": 0.01} for name, a in cells}


def test_the_goal_is_ten_points_over_symbolic_features_on_three_tasks_and_over_the_lm_on_all():
    probes = {
        "collection": row(0.90, 0.80, 0.70, 0.79),  # 11 points over pitch classes
        "meter": row(0.80, 0.70, 0.70, 0.30),
        "key": row(0.60, 0.50, 0.51, 0.40),  # 9 points: not enough
        "region": row(0.75, 0.70, 0.60, 0.60),
    }
    verdict = bench.goal({"probes": probes})
    assert verdict["tasks_10_points_above_symbolic"] == ["collection", "meter", "region"]
    assert verdict["tasks_above_language_model"] == list(probes) and verdict["met"]
    probes["key"]["language_model"]["accuracy"] = 0.65  # the LM wins one task
    assert not bench.goal({"probes": probes})["met"]
