import numpy as np
import pyarrow as pa
import pytest

from orchestrator.selection import (
    budget_count,
    cycle_rng,
    draw_subset,
    k_center_greedy,
    top_n_of_batches,
)
from orchestrator.strategies import STRATEGIES, Candidates, ScoreKind, get_strategy
from segxal.eem.config import EEMConfig


def top_n(ids, scores, n):
    return top_n_of_batches([(ids, scores)], n)


def candidates(columns: dict, rng=0, labelled=None, batch=2) -> Candidates:
    """``columns`` as a strategy's input, in batches of ``batch`` rows."""
    table = pa.table(columns)
    batches = [table.slice(i, batch) for i in range(0, len(table), batch)]
    return Candidates(batches, len(table), np.random.default_rng(rng), labelled)


# ---- core-set ------------------------------------------------------------------------------------


def test_k_center_on_a_line_with_a_labelled_centre():
    unlabelled = np.arange(1, 11, dtype=np.float64)[:, None]  # values 1..10 at indices 0..9
    picks = k_center_greedy(unlabelled, np.array([[0.0]]), 10)
    # 10 is farthest from 0; then 5 (5 from both); then 2,3,7,8 tie at 2 -> lowest index (2);
    # then 7 (the only one left at 2); then all remaining are at 1 -> ascending.
    assert unlabelled[picks, 0].tolist() == [10, 5, 2, 7, 1, 3, 4, 6, 8, 9]


def test_k_center_prefix_is_the_same_for_smaller_n_and_float32():
    unlabelled = np.arange(1, 11, dtype=np.float32)[:, None]
    picks = k_center_greedy(unlabelled, np.zeros((1, 1), dtype=np.float32), 3)
    assert (unlabelled[picks, 0] == [10, 5, 2]).all()


def test_k_center_without_labelled_starts_nearest_the_mean():
    points = np.arange(0, 11, dtype=np.float64)[:, None]  # mean 5
    for labelled in (None, np.empty((0, 1))):
        picks = k_center_greedy(points, labelled, 4)
        # 5 first; 0 and 10 tie at distance 5 -> lowest index first; then 2, 3, 7, 8 tie at 2 -> 2
        assert points[picks, 0].tolist() == [5, 0, 10, 2]


def test_k_center_in_2d_and_duplicates_are_never_picked_twice():
    square = np.array([[0, 0], [0, 3], [4, 0], [4, 3], [2, 1.5]], dtype=np.float64)
    assert k_center_greedy(square, np.array([[2.0, 1.5]]), 1).tolist() == [
        0
    ]  # corners tie at 2.5 -> index 0
    same = np.ones((4, 3))
    picks = k_center_greedy(same, np.ones((1, 3)), 4)
    assert sorted(picks.tolist()) == [0, 1, 2, 3]


def test_k_center_does_not_mutate_and_chunks_give_the_same_answer():
    rng = np.random.default_rng(0)
    unlabelled, labelled = rng.normal(size=(200, 8)), rng.normal(size=(50, 8))
    before = unlabelled.copy(), labelled.copy()
    whole = k_center_greedy(unlabelled, labelled, 20)
    chunked = k_center_greedy(
        unlabelled, labelled, 20, chunk_bytes=8 * 200 * 3
    )  # 3 labelled rows at a time
    assert whole.tolist() == chunked.tolist()
    assert len(set(whole.tolist())) == 20
    assert np.array_equal(unlabelled, before[0]) and np.array_equal(labelled, before[1])


def test_k_center_errors():
    with pytest.raises(ValueError, match="larger than the 3 candidates"):
        k_center_greedy(np.zeros((3, 2)), None, 4)
    with pytest.raises(ValueError, match="features_labelled has 3 dims"):
        k_center_greedy(np.zeros((3, 2)), np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="features_unlabelled: contains NaN"):
        k_center_greedy(np.array([[np.nan, 0.0]]), None, 1)
    with pytest.raises(ValueError, match="2-D"):
        k_center_greedy(np.zeros(3), None, 1)
    assert k_center_greedy(np.zeros((3, 2)), None, 0).tolist() == []


def test_coreset_breaks_ties_by_id_and_refuses_candidates_out_of_order():
    features = {"a": [-1.0], "b": [1.0], "c": [-4.0], "d": [4.0], "e": [0.0]}
    ids = sorted(features)  # d and c tie at distance 4 from the labelled centre 0
    rows = {"sample_id": ids, "embedding": [features[i] for i in ids]}
    chosen = get_strategy("coreset").select(candidates(rows, labelled=np.array([[0.0]])), 2)
    assert chosen == ["c", "d"]
    shuffled = {"sample_id": ids[::-1], "embedding": [features[i] for i in ids[::-1]]}
    with pytest.raises(ValueError, match="candidates must come in id order"):
        get_strategy("coreset").select(candidates(shuffled), 2)


# ---- top n ---------------------------------------------------------------------------------------


def test_top_n_orders_by_score_then_id():
    ids = ["d", "b", "a", "c", "e"]
    scores = np.array([1.0, 2.0, 2.0, 1.0, 0.5])
    before = scores.copy()
    assert top_n(ids, scores, 3).to_pylist() == ["a", "b", "c"]
    assert top_n(ids, scores, 5).to_pylist() == ["a", "b", "c", "d", "e"]
    assert np.array_equal(scores, before)
    # the same answer whatever order the candidates come in
    order = [4, 2, 0, 3, 1]
    assert top_n([ids[i] for i in order], scores[order], 3).to_pylist() == ["a", "b", "c"]
    assert top_n(pa.array(ids), pa.array(scores), 1).to_pylist() == ["a"]
    assert top_n(ids, scores, 0).to_pylist() == []


def test_top_n_of_batches_equals_top_n_of_everything():
    ids = ["d", "b", "a", "c", "e", "f", "g"]
    scores = [1.0, 2.0, 2.0, 1.0, 0.5, 2.0, 1.0]  # ties inside and across batches
    batches = [(ids[0:2], scores[0:2]), (ids[2:3], scores[2:3]), (ids[3:], scores[3:])]
    assert top_n_of_batches(batches, 4).to_pylist() == ["a", "b", "f", "c"]
    assert top_n_of_batches(batches, 4).to_pylist() == top_n(ids, scores, 4).to_pylist()
    assert (
        top_n_of_batches(batches, 10).to_pylist() == top_n(ids, scores, 7).to_pylist()
    )  # fewer than n: all
    assert top_n_of_batches([], 3).to_pylist() == []
    with pytest.raises(ValueError, match=r"duplicate sample ids \['b'\]"):
        top_n_of_batches([(["a", "b"], [1.0, 2.0]), (["b"], [0.0])], 2)


def test_top_n_handles_infinities_and_rejects_nan():
    assert top_n(["a", "b", "c"], [np.inf, -np.inf, 0.0], 2).to_pylist() == ["a", "c"]
    with pytest.raises(ValueError, match=r"NaN for 1 ids, e.g. \['b'\]"):
        top_n(["a", "b"], [1.0, np.nan], 1)
    with pytest.raises(ValueError, match="NaN for 1 ids"):  # a missing score reads as NaN
        top_n(["a", "b"], pa.array([1.0, None]), 1)


def test_top_n_errors():
    with pytest.raises(ValueError, match="expected 3 scores"):
        top_n(["a", "b", "c"], [1.0, 2.0], 1)
    assert top_n(["a", "b"], [1.0, 2.0], 3).to_pylist() == ["b", "a"]  # fewer than n: all, ranked
    with pytest.raises(ValueError, match="non-negative"):
        top_n(["a", "b"], [1.0, 2.0], -1)
    with pytest.raises(ValueError, match=r"duplicate sample ids \['a'\]"):
        top_n(["a", "a"], [1.0, 2.0], 1)


# ---- subsets and random ---------------------------------------------------------------------------


def test_draw_subset_is_deterministic_sorted_and_order_independent():
    ids = [f"img_{i:03d}" for i in range(100)]
    first = draw_subset(ids, 0.3, np.random.default_rng(7)).to_pylist()
    assert len(first) == 30 and first == sorted(first) and set(first) <= set(ids)
    shuffled = list(np.random.default_rng(1).permutation(ids))
    assert draw_subset(shuffled, 0.3, 7).to_pylist() == first
    assert draw_subset(np.array(ids), 30, 7).to_pylist() == first  # a count gives the same draw
    assert draw_subset(ids, 0.3, 8).to_pylist() != first


def test_draw_subset_sizes_and_errors():
    ids = [f"s{i}" for i in range(10)]
    assert len(draw_subset(ids, 0.25, 0)) == 3  # 2.5 rounds half up
    assert draw_subset(ids, 50, 0).to_pylist() == sorted(
        ids
    )  # larger than the pool: the whole pool
    assert draw_subset(ids, 1.0, 0).to_pylist() == sorted(ids)
    with pytest.raises(ValueError, match="unlabelled pool is empty"):
        draw_subset([], 5, 0)
    with pytest.raises(ValueError, match=r"subset size fraction must be in \(0, 1\]"):
        draw_subset(ids, 1.5, 0)
    with pytest.raises(ValueError, match="subset size must be positive"):
        draw_subset(ids, 0, 0)
    with pytest.raises(TypeError, match="rng must be a numpy Generator or an int seed"):
        draw_subset(ids, 3, None)


def test_uniform_random_draws_by_cycle_rng_in_id_order():
    ids = [f"s{i:02d}" for i in range(50)]
    random = get_strategy("random")
    chosen = random.select(
        candidates({"sample_id": ids}, rng=cycle_rng(3, 2, "random"), batch=7), 5
    )
    assert len(set(chosen)) == 5 and chosen == sorted(chosen) and set(chosen) <= set(ids)
    expected = np.sort(cycle_rng(3, 2, "random").choice(50, size=5, replace=False))
    assert chosen == [
        ids[i] for i in expected
    ]  # positions drawn by the generator, whatever the batches
    assert random.select(candidates({"sample_id": ids}, rng=cycle_rng(3, 3, "random")), 5) != chosen
    assert random.select(candidates({"sample_id": ids[:3]}), 5) == ids[:3]  # fewer than n: all


# ---- budgets --------------------------------------------------------------------------------------


def test_budget_count_resolves_fractions_and_counts():
    assert budget_count(0.05, 2975) == 149  # 148.75
    assert budget_count(0.4, 2975) == 1190
    assert budget_count(0.29, 100) == 29  # 28.999999999999996 must not floor to 28
    assert budget_count(1.0, 7) == 7
    assert budget_count(10, 100) == 10
    assert budget_count(np.int64(3), 10) == 3


@pytest.mark.parametrize(
    "budget, size, error, match",
    [
        (0, 100, ValueError, "budget must be positive, got 0"),
        (-3, 100, ValueError, "budget must be positive"),
        (0.0, 100, ValueError, r"fraction must be in \(0, 1\]"),
        (1.5, 100, ValueError, r"fraction must be in \(0, 1\]"),
        (float("nan"), 100, ValueError, "fraction must be"),
        (101, 100, ValueError, r"budget 101 is larger than the pool \(100 samples\)"),
        (0.001, 100, ValueError, "is 0 samples"),
        (5, 0, ValueError, "the pool is empty"),
        (True, 100, TypeError, "int count or a float fraction"),
        ("5", 100, TypeError, "int count or a float fraction"),
    ],
)
def test_budget_count_errors(budget, size, error, match):
    with pytest.raises(error, match=match):
        budget_count(budget, size)


# ---- registry -------------------------------------------------------------------------------------


def test_registry_declares_what_each_strategy_needs():
    assert set(STRATEGIES) == {
        "eem", "eem_no_ebu", "eem_no_pae", "random", "entropy", "bald", "coreset"
    }  # fmt: skip
    kinds = {name: strategy.score_kind for name, strategy in STRATEGIES.items()}
    assert kinds == {
        "eem": ScoreKind.EEM,
        "eem_no_ebu": ScoreKind.PAE,
        "eem_no_pae": ScoreKind.EBU,
        "entropy": ScoreKind.ENTROPY,
        "bald": ScoreKind.BALD,
        "coreset": ScoreKind.EMBEDDING,
        "random": None,
    }
    assert {n for n, s in STRATEGIES.items() if s.needs_depth} == {"eem", "eem_no_ebu"}
    assert {n for n, s in STRATEGIES.items() if s.needs_labelled_embeddings} == {"coreset"}
    explained = {name: strategy.explain_kind for name, strategy in STRATEGIES.items()}
    assert explained["eem_no_ebu"] is ScoreKind.PAE and explained["eem_no_pae"] is ScoreKind.EBU
    assert explained["random"] is explained["coreset"] is explained["entropy"] is ScoreKind.EEM
    assert explained["bald"] is ScoreKind.EEM
    regions = {name: s.region_source for name, s in STRATEGIES.items() if s.has_region_mode}
    assert regions == {
        "eem": "eem", "eem_no_ebu": "eem", "eem_no_pae": "eem",
        "entropy": "cells", "bald": "cells", "random": "cells",
    }  # fmt: skip


def test_score_kinds_set_the_eem_weights_of_the_ablations():
    config = EEMConfig(alpha=0.3, beta=0.7)
    weights = {k: (k.eem_config(config).alpha, k.eem_config(config).beta) for k in ScoreKind}
    assert weights[ScoreKind.EEM] == (0.3, 0.7) and weights[ScoreKind.ENTROPY] == (0.3, 0.7)
    assert weights[ScoreKind.PAE] == (1.0, 0.0) and weights[ScoreKind.EBU] == (0.0, 1.0)
    assert ScoreKind.EMBEDDING.schema.names == ["sample_id", "embedding", "unreadable"]
    assert ScoreKind.EEM.schema.names == ["sample_id", "score", "unreadable"]


def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(
        ValueError,
        match="unknown strategy 'eemm'; valid strategies: bald, coreset, eem, eem_no_ebu, eem_no_pae, entropy, random",
    ):
        get_strategy("eemm")


def test_top_score_streams_batches_and_keeps_the_best():
    ids = [f"s{i}" for i in range(7)]
    scores = [0.1, 0.9, 0.5, 0.9, 0.2, 0.7, 0.0]
    chosen = get_strategy("entropy").select(candidates({"sample_id": ids, "score": scores}), 3)
    assert chosen == ["s1", "s3", "s5"]
