"""jobs.compare on a temporary SQLite MLflow store holding runs shaped like those of jobs.al and jobs.pebal."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

from jobs.compare import main

EXPERIMENT = "segxal-test"
LABELLED = [0.2, 0.25, 0.3]
MIOU = {  # (strategy, seed) -> val/miou at cycles 0, 1, 2
    ("eem", 0): [0.40, 0.50, 0.60],
    ("eem", 1): [0.42, 0.54, 0.62],
    ("random", 0): [0.40, 0.45, 0.48],
    ("random", 1): [0.38, 0.43, 0.50],
}
ANOMALY = {  # run -> (variant, {method: (ap, fpr95, auroc)}) on the dataset "fs_lf"
    "pebal-paper": ("paper", {"pebal": (0.60, 0.05, 0.97), "energy": (0.16, 0.42, 0.88)}),
    "pebal-reference": ("reference", {"pebal": (0.55, 0.07, 0.96), "energy": (0.16, 0.42, 0.88)}),
}
SUPERVISED = {
    0: [0.5, 0.8, 0.7],
    1: [0.6, 0.76, 0.74],
}  # jobs.train runs: val/miou per epoch; best 0.8, 0.76


def log_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: dict,
    params: dict,
    metrics: list[Metric],
) -> str:
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture
def store(tracking_uri):
    """The runs above, jobs.train runs, an untagged run with val/miou only, and an experiment with no run."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    client.create_experiment("empty")
    for (strategy, seed), values in MIOU.items():
        metrics = [Metric("val/miou", v, 1000 + cycle, cycle) for cycle, v in enumerate(values)]
        metrics += [
            Metric("pool/labelled_fraction", f, 1000 + cycle, cycle)
            for cycle, f in enumerate(LABELLED)
        ]
        if (strategy, seed) == (
            "eem",
            0,
        ):  # cycle 1 logged twice (a resumed run): the later value counts
            metrics.append(Metric("val/miou", 0.99, 900, 1))
        log_run(
            client,
            experiment_id,
            f"al-{strategy}-s{seed}",
            {
                "strategy": strategy,
                "oracle": "simulated",
                "depth_backend": "dataset",
                "dataset": "synthetic",
            },
            {"seed": seed, "al.strategy": strategy},
            metrics,
        )
    for name, (variant, methods) in ANOMALY.items():
        metrics = [
            Metric(f"anomaly/fs_lf/{method}/{key}", value, 0, 0)
            for method, values in methods.items()
            for key, value in zip(("ap", "fpr95", "auroc"), values, strict=True)
        ]
        log_run(client, experiment_id, name, {}, {"seed": 0, "pebal.variant": variant}, metrics)
    log_run(client, experiment_id, "train-demo", {}, {"seed": 0}, [Metric("val/miou", 0.7, 0, 0)])
    for seed, history in SUPERVISED.items():
        log_run(
            client,
            experiment_id,
            f"train-s{seed}",
            {"job": "train"},
            {"seed": seed},
            [Metric("val/miou", v, 0, epoch) for epoch, v in enumerate(history)],
        )
    return client


def run_compare(tracking_uri, out, *extra):
    return main(
        [
            "--experiment",
            EXPERIMENT,
            "--tracking-uri",
            tracking_uri,
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_tables_values(store, tracking_uri, tmp_path, capsys):
    run_compare(tracking_uri, tmp_path / "out", "--no-log")
    runs = pd.read_csv(tmp_path / "out" / "al_runs.csv")
    assert list(runs["run"]) == [
        "al-eem-s0",
        "al-eem-s1",
        "al-random-s0",
        "al-random-s1",
    ]  # not train-demo
    assert list(runs.columns[-4:]) == ["cycle_0", "cycle_1", "cycle_2", "final"]
    for _, row in runs.iterrows():
        values = MIOU[(row["strategy"], row["seed"])]
        assert [row["cycle_0"], row["cycle_1"], row["cycle_2"]] == pytest.approx(values)
        assert row["final"] == pytest.approx(values[-1])

    summary = pd.read_csv(tmp_path / "out" / "al_summary.csv").set_index("strategy")
    assert list(summary["runs"]) == [2, 2]
    # sample std of two values a, b: |a - b| / sqrt(2)
    assert summary.loc["eem", "cycle_0_mean"] == pytest.approx(0.41)
    assert summary.loc["eem", "cycle_0_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert summary.loc["eem", "cycle_1_mean"] == pytest.approx(0.52)
    assert summary.loc["eem", "cycle_1_std"] == pytest.approx(0.04 / math.sqrt(2))
    assert summary.loc["random", "final_mean"] == pytest.approx(0.49)
    assert summary.loc["random", "final_std"] == pytest.approx(0.02 / math.sqrt(2))

    anomaly = pd.read_csv(tmp_path / "out" / "anomaly.csv").set_index(["run", "method"])
    assert len(anomaly) == 4
    assert anomaly.loc[
        ("pebal-paper", "pebal"), ["ap", "fpr95", "auroc"]
    ].tolist() == pytest.approx([0.60, 0.05, 0.97])
    assert anomaly.loc[("pebal-reference", "pebal"), "variant"] == "reference"
    assert anomaly.loc[("pebal-reference", "energy"), "ap"] == pytest.approx(0.16)

    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert markdown in capsys.readouterr().out
    assert (
        "| eem | image | simulated | dataset | 2 | 41.00 ± 1.41 | 52.00 ± 2.83 | 61.00 ± 1.41 | 61.00 ± 1.41 |"
        in markdown
    )
    assert (
        "| al-random-s1 | random | image | simulated | dataset | 1 | FINISHED | 38.00 | 43.00 | 50.00 | 50.00 |"
        in markdown
    )
    assert "| pebal-paper | paper | fs_lf | pebal | 60.00 | 5.00 | 97.00 |" in markdown


def test_plots_are_images(store, tracking_uri, tmp_path):
    run_compare(tracking_uri, tmp_path, "--no-log")
    for name in ("miou_vs_labelled.png", "anomaly_ap.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300


def test_filter(store, tracking_uri, tmp_path):
    comparison = run_compare(
        tracking_uri, tmp_path, "--no-log", "--filter", "tags.strategy = 'eem'"
    )
    assert sorted(comparison.al_runs["run"]) == ["al-eem-s0", "al-eem-s1"]
    assert comparison.anomaly.empty
    assert not (tmp_path / "anomaly.csv").exists() and not (tmp_path / "anomaly_ap.png").exists()
    summary = pd.read_csv(tmp_path / "al_summary.csv")
    assert list(summary["strategy"]) == ["eem"]

    pebal_only = run_compare(
        tracking_uri, tmp_path / "pebal", "--no-log", "--filter", "params.`pebal.variant` = 'paper'"
    )
    assert pebal_only.al_runs.empty and set(pebal_only.anomaly["run"]) == {"pebal-paper"}
    assert sorted(p.name for p in (tmp_path / "pebal").iterdir()) == [
        "anomaly.csv",
        "anomaly_ap.png",
        "comparison.md",
    ]


def test_logs_a_compare_run_and_leaves_it_out(store, tracking_uri, tmp_path):
    run_compare(tracking_uri, tmp_path)
    experiment_id = store.get_experiment_by_name(EXPERIMENT).experiment_id
    compare_runs = store.search_runs([experiment_id], "tags.job = 'compare'")
    assert len(compare_runs) == 1 and compare_runs[0].info.run_name == "compare"
    assert compare_runs[0].info.status == "FINISHED"
    logged = {f.path for f in store.list_artifacts(compare_runs[0].info.run_id, "compare")}
    assert logged == {
        f"compare/{name}"
        for name in (
            "al_runs.csv",
            "al_summary.csv",
            "differences.csv",
            "difference_to_random.png",
            "anomaly.csv",
            "supervised.csv",
            "comparison.md",
            "miou_vs_labelled.png",
            "miou_vs_labelled_pixels.png",  # whole images: the labelled fraction
            "anomaly_ap.png",
        )
    }
    again = run_compare(tracking_uri, tmp_path / "again", "--no-log")
    assert len(again.al_runs) == 4 and len(again.anomaly) == 4


def test_errors(store, tracking_uri, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(
        SystemExit,
        match=r"no MLflow experiment named 'nope'.*experiments there: Default, empty, segxal-test",
    ):
        main(["--experiment", "nope", "--tracking-uri", tracking_uri, "--out", str(out)])
    with pytest.raises(
        SystemExit,
        match=r"no SegXAL, PEBAL or jobs.train run in experiment 'segxal-test' matches the filter "
        r"\"tags.strategy = 'coreset'\"",
    ):
        run_compare(tracking_uri, out, "--filter", "tags.strategy = 'coreset'")
    with pytest.raises(
        SystemExit, match="experiment 'empty' holds no SegXAL, PEBAL or jobs.train run"
    ):
        main(["--experiment", "empty", "--tracking-uri", tracking_uri, "--out", str(out)])
    with pytest.raises(SystemExit, match="bad filter 'tags.strategy =='"):
        run_compare(tracking_uri, out, "--filter", "tags.strategy ==")
    assert not out.exists()  # nothing written on an error


def test_fully_supervised_runs_are_the_reference(store, tracking_uri, tmp_path, capsys):
    comparison = run_compare(tracking_uri, tmp_path / "out", "--no-log")
    supervised = pd.read_csv(tmp_path / "out" / "supervised.csv")
    assert list(supervised["run"]) == ["train-s0", "train-s1"]  # not train-demo: no job=train tag
    assert list(supervised["miou"]) == pytest.approx([0.8, 0.76])  # the best epoch of each
    assert list(comparison.supervised["seed"]) == [0, 1]
    assert (
        "| mean of 2 | - | 78.00 ± 2.83 |" in capsys.readouterr().out
    )  # std of 0.80, 0.76: 0.04 / sqrt(2)


def test_region_runs_are_compared_by_labelled_pixels_and_clicks(store, tracking_uri, tmp_path):
    experiment_id = store.get_experiment_by_name(EXPERIMENT).experiment_id
    pixels, clicks = (0.40, 0.41, 0.43), (0.0, 20.0, 40.0)
    log_run(
        store,
        experiment_id,
        "al-entropy-region-s0",
        {
            "strategy": "entropy",
            "unit": "region",
            "oracle": "simulated",
            "depth_backend": "dataset",
        },
        {"seed": 0},
        [
            Metric(key, value, 2000 + cycle, cycle)
            for cycle in range(3)
            for key, value in (
                ("val/miou", 0.3 + cycle / 10),
                ("pool/labelled_fraction", 0.4 + cycle / 10),
                ("pool/labelled_pixel_fraction", pixels[cycle]),
                ("oracle/total_cost", clicks[cycle]),
            )
        ],
    )
    comparison = run_compare(tracking_uri, tmp_path, "--no-log")
    region = comparison.curves[comparison.curves["unit"] == "region"].sort_values("cycle")
    assert region["labelled_pixel_fraction"].tolist() == pytest.approx(list(pixels))
    assert region["clicks"].tolist() == pytest.approx(list(clicks))
    image = comparison.curves[comparison.curves["unit"] == "image"]
    assert image["labelled_pixel_fraction"].tolist() == image["labelled_fraction"].tolist()
    for name in ("miou_vs_labelled_pixels.png", "miou_vs_clicks.png"):
        with Image.open(tmp_path / name) as png:
            png.verify()


def test_differences_to_random_are_paired_by_seed_with_bootstrap_intervals(
    store, tracking_uri, tmp_path
):
    comparison = run_compare(tracking_uri, tmp_path, "--no-log")
    differences = pd.read_csv(tmp_path / "differences.csv")
    runs = comparison.al_runs.set_index(["strategy", "seed"])
    for _, row in differences.iterrows():
        column = f"cycle_{row['cycle']}"
        by_hand = [
            runs.loc[("eem", seed), column] - runs.loc[("random", seed), column] for seed in (0, 1)
        ]
        assert row["strategy"] == "eem" and row["seeds"] == 2
        assert row["difference"] == pytest.approx(np.mean(by_hand))
        reference = scipy.stats.bootstrap(
            (np.array(by_hand),), np.mean, n_resamples=10_000, method="percentile",
            random_state=0, confidence_level=0.95,
        ).confidence_interval  # fmt: skip
        assert row["ci_low"] == pytest.approx(reference.low, abs=1e-12)
        assert row["ci_high"] == pytest.approx(reference.high, abs=1e-12)
    assert "paired difference to random" in (tmp_path / "comparison.md").read_text()


def test_a_bootstrap_interval_by_hand():
    from orchestrator.paired import bootstrap_interval

    assert bootstrap_interval(np.array([0.1, 0.1, 0.1])) == pytest.approx((0.1, 0.1))
    assert all(np.isnan(bootstrap_interval(np.array([0.3]))))  # one seed: no interval
    rng = np.random.default_rng(3)
    values = rng.normal(0.02, 0.01, size=8)
    low, high = bootstrap_interval(values)
    reference = scipy.stats.bootstrap(
        (values,), np.mean, n_resamples=10_000, method="percentile", random_state=1
    ).confidence_interval
    assert low == pytest.approx(reference.low, abs=2e-3)  # other resamples: close, not equal
    assert high == pytest.approx(reference.high, abs=2e-3)
    assert low < values.mean() < high


def test_region_runs_are_paired_with_image_level_random_of_their_seed(
    store, tracking_uri, tmp_path
):
    experiment_id = store.get_experiment_by_name(EXPERIMENT).experiment_id
    for strategy, offset in (("random", 0.05), ("entropy", 0.08)):
        for seed in (0, 1):
            log_run(
                store,
                experiment_id,
                f"al-{strategy}-region-s{seed}",
                {"strategy": strategy, "unit": "region", "oracle": "simulated",
                 "depth_backend": "geometric"},
                {"seed": seed},
                [
                    Metric(key, value, 3000 + cycle, cycle)
                    for cycle in range(3)
                    for key, value in (
                        ("val/miou", 0.3 + offset + cycle / 10 + seed / 50),
                        ("pool/labelled_fraction", 0.5),
                        ("pool/labelled_pixel_fraction", 0.1 + cycle / 100),
                    )
                ],
            )  # fmt: skip
    comparison = run_compare(tracking_uri, tmp_path, "--no-log")
    table = pd.read_csv(tmp_path / "differences_to_image_random.csv")
    assert set(table["strategy"]) == {"random", "entropy"} and set(table["unit"]) == {"region"}
    runs = comparison.al_runs.set_index(["strategy", "unit", "seed"])
    for _, row in table.iterrows():
        column = f"cycle_{row['cycle']}"
        by_hand = [
            runs.loc[(row["strategy"], "region", seed), column]
            - runs.loc[("random", "image", seed), column]
            for seed in (0, 1)
        ]
        assert row["seeds"] == 2 and row["difference"] == pytest.approx(np.mean(by_hand))
    assert "paired difference to random at image level" in (tmp_path / "comparison.md").read_text()
