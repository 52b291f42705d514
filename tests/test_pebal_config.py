"""PebalConfig: defaults from the paper, validation, and the field types the YAML loader supports."""

import dataclasses
import types
import typing

import pytest

from segxal.pebal.config import AnomalyMixConfig, PebalConfig


def test_defaults_follow_the_paper():
    config = PebalConfig()
    assert (config.variant, config.m_in, config.m_out, config.lam) == ("paper", -12.0, -6.0, 0.1)
    assert (config.smoothness_weight, config.sparsity_weight) == (5e-4, 3e-6)
    assert (config.smoothing_kernel, config.smoothing_sigma, config.trainable) == (
        7,
        1.0,
        ("head",),
    )
    assert config.anomalymix.coco_root is None and not config.anomalymix.uses_coco
    assert {"person", "car", "train", "traffic light"} <= set(
        config.anomalymix.excluded_coco_classes
    )


def test_reference_swaps_betas_unless_given():
    reference = PebalConfig(variant="reference")
    assert (reference.smoothness_weight, reference.sparsity_weight) == (3e-6, 5e-4)
    explicit = PebalConfig(variant="reference", beta_smooth=1e-3, beta_sparse=0.0)
    assert (explicit.smoothness_weight, explicit.sparsity_weight) == (1e-3, 0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(m_in=-6.0, m_out=-12.0),
            r"m_in \(-6.0\) must be smaller than PebalConfig.m_out \(-12.0\)",
        ),
        (dict(m_in=-6.0, m_out=-6.0), r"PebalConfig.m_in .* PebalConfig.m_out"),
        (dict(lam=-0.1), "PebalConfig.lam must be >= 0"),
        (dict(beta_sparse=-1e-6), "PebalConfig.beta_sparse must be >= 0"),
        (dict(ood_weight=-1.0), "PebalConfig.ood_weight"),
        (dict(m_in=float("nan")), "PebalConfig.m_in must be finite"),
        (dict(variant="code"), "PebalConfig.variant"),
        (dict(trainable=()), "PebalConfig.trainable"),
        (dict(smoothing_kernel=6), "smoothing_kernel must be a positive odd"),
        (dict(smoothing_sigma=0.0), "smoothing_sigma"),
    ],
)
def test_invalid_pebal_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PebalConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fraction=1.5), "AnomalyMixConfig.fraction"),
        (dict(scale_min=0.5, scale_max=0.2), "scale_min .* scale_max"),
        (dict(max_objects=0), "max_objects"),
        (dict(flip_probability=-0.1), "flip_probability"),
        (dict(coco_annotations="x.json"), "coco_root"),
    ],
)
def test_invalid_anomalymix_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnomalyMixConfig(**kwargs)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PebalConfig().m_in = 0.0


def _allowed(tp) -> bool:
    if tp in (int, float, str, bool):
        return True
    if dataclasses.is_dataclass(tp):
        return tp.__dataclass_params__.frozen and all(
            _allowed(t) for t in typing.get_type_hints(tp).values()
        )
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType):  # each option is tried in turn
        return all(_allowed(a) for a in args if a is not type(None))
    if origin is tuple:
        return all(a is Ellipsis or _allowed(a) for a in args)
    return False


def test_field_types_are_the_ones_the_yaml_loader_supports():
    assert _allowed(PebalConfig)


def test_round_trips_through_the_experiment_yaml_loader():
    from orchestrator.typed_config import from_dict, to_dict

    config = PebalConfig(
        variant="reference",
        m_in=-10.0,
        beta_sparse=1e-4,
        trainable=("decoder.3", "head"),
        anomalymix=AnomalyMixConfig(fraction=0.25, coco_root="/data/coco"),
    )
    assert from_dict(PebalConfig, to_dict(config)) == config
    assert (
        from_dict(
            PebalConfig, {"m_in": -13, "anomalymix": {"excluded_coco_classes": ["person"]}}
        ).m_in
        == -13.0
    )
