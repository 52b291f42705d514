"""The Markdown tables of the reports: the shared formatter and the sweep's trial table."""

from actors.tune_pebal import SweepResult, TrialOutcome
from jobs.sweep import trials_table
from segxal.markdown import markdown_table


def test_markdown_table_known_answer():
    assert (
        markdown_table(["a", "b"], [["1", "2"], ["x", "-"]])
        == "| a | b |\n|---|---|\n| 1 | 2 |\n| x | - |\n"
    )
    assert markdown_table(["only"], []) == "| only |\n|---|\n"


def test_trials_table_ranks_by_ap_and_marks_failures():
    params = {"m_in": -4.0, "margin_gap": 2.5, "beta_smooth": 3e-6, "beta_sparse": 5e-4, "lam": 0.5}
    trials = [
        TrialOutcome(
            "t1",
            params,
            {"epoch": 2, "val/ap": 0.4, "val/fpr95": 0.3, "val/auroc": 0.9},
            None,
            None,
        ),
        TrialOutcome(
            "t2",
            params,
            {"epoch": 1, "val/ap": 0.6, "val/fpr95": 0.2, "val/auroc": 0.95},
            None,
            None,
        ),
        TrialOutcome("t3", params, None, None, "worker died"),
    ]
    assert trials_table(SweepResult(trials)).splitlines() == [
        "| trial | m_in | m_out | β smooth | β sparse | λ | best epoch | AP | FPR95 | AUROC | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| t2 | -4.000 | -1.500 | 3.00e-06 | 5.00e-04 | 0.500 | 1 | 60.00 | 20.00 | 95.00 | ok |",
        "| t1 | -4.000 | -1.500 | 3.00e-06 | 5.00e-04 | 0.500 | 2 | 40.00 | 30.00 | 90.00 | ok |",
        "| t3 | -4.000 | -1.500 | 3.00e-06 | 5.00e-04 | 0.500 | - | - | - | - | failed |",
    ]
