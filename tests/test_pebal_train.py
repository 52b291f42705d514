"""PEBAL fine-tuning and evaluation: the pieces on tiny tensors, then Ray Train on a real local Ray."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from actors.pebal_train import (
    PebalJob,
    PebalTrainingError,
    finetune,
    load_finetuned,
    pebal_train_epoch,
)
from orchestrator.config import ScalingConfig
from segxal.checkpoint import load_checkpoint
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES, IGNORE_INDEX
from segxal.models.unet import UNet, UNetConfig
from segxal.pebal.anomalymix import AnomalyMix
from segxal.pebal.config import AnomalyMixConfig, FinetuneConfig, PebalConfig
from segxal.pebal.evaluate import (
    Method,
    MixedValidationSet,
    anomaly_labels,
    calibrate_margins,
    evaluate_anomaly,
    flat_metrics,
    plot_curves,
    plot_panels,
    split_outliers,
    table_csv,
    table_markdown,
)
from segxal.pebal.losses import NonFiniteLossError
from segxal.pebal.model import prepare_pebal_model
from segxal.training import TrainConfig, fit, make_optimizer

SIZE = (64, 128)


@pytest.fixture
def one_thread():
    """In-process training on one thread: on the shared 2-core machines two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datasets(synthetic_root):
    train = SegmentationDataset(
        cityscapes_manifest(synthetic_root, "train"),
        CITYSCAPES,
        SampleTransform(SIZE, augment=True),
    )
    val = SegmentationDataset(
        cityscapes_manifest(synthetic_root, "val"), CITYSCAPES, SampleTransform(SIZE)
    )
    return train, val


@pytest.fixture(scope="module")
def pretrained(datasets):
    """A tiny segmenter trained for 30 epochs (a few seconds on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val = datasets
    model = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=8, depth=3))
    fit(
        model,
        DataLoader(train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(val, batch_size=4),
        TrainConfig(epochs=30, batch_size=4, lr=0.01, device="cpu"),
        CITYSCAPES.class_names,
    )
    torch.set_num_threads(threads)
    return model.eval()


# -- evaluation pieces --------------------------------------------------------------------------------


def test_anomaly_labels_map_the_anomaly_class_to_one_and_keep_void():
    labels = torch.tensor([[0, 3, 5], [IGNORE_INDEX, 5, 1]])
    assert anomaly_labels(labels, 5).tolist() == [[0, 0, 1], [IGNORE_INDEX, 1, 0]]


def test_mixed_validation_set_is_reproducible_and_labels_pasted_pixels(datasets):
    _, val = datasets
    mixed = MixedValidationSet(val, AnomalyMixConfig(fraction=0.0), CITYSCAPES.num_classes, seed=3)
    first, again = (
        mixed[1],
        MixedValidationSet(val, AnomalyMixConfig(), CITYSCAPES.num_classes, seed=3)[1],
    )
    assert torch.equal(first["image"], again["image"]) and torch.equal(
        first["label"], again["label"]
    )
    plain = val[1]
    changed = (first["image"] != plain["image"]).any(0)
    assert set(first["label"].unique().tolist()) <= {0, 1, IGNORE_INDEX}
    assert (first["label"] == 1).sum() > 0  # fraction is forced to 1: every image gets an object
    assert torch.equal(
        changed & (first["label"] != 1), torch.zeros_like(changed)
    )  # only pasted pixels change
    assert not torch.equal(
        first["image"],
        MixedValidationSet(val, AnomalyMixConfig(), CITYSCAPES.num_classes, seed=4)[1]["image"],
    )


def write_coco(root, images=4):
    """``images`` 16x16 images, each with one 8x8 'kite' polygon."""
    (root / "images" / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries, annotations = [], []
    for index in range(images):
        Image.fromarray(np.full((16, 16, 3), 30 * index, np.uint8)).save(
            root / "images" / "train2017" / f"{index}.jpg"
        )
        entries.append({"id": index, "file_name": f"{index}.jpg", "height": 16, "width": 16})
        annotations.append(
            {
                "id": 100 + index,
                "image_id": index,
                "category_id": 38,
                "iscrowd": 0,
                "area": 64.0,
                "bbox": [4, 4, 8, 8],
                "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]],
            }
        )
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps(
            {
                "images": entries,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "person"}, {"id": 38, "name": "kite"}],
            }
        )
    )
    return root


def test_split_outliers_holds_out_whole_coco_images(tmp_path):
    config = AnomalyMixConfig(coco_root=str(write_coco(tmp_path, images=8)), min_instance_area=0)
    train, val = split_outliers(config)
    train_images = {str(i.image_path) for i in train.instances}
    val_images = {str(i.image_path) for i in val.instances}
    assert len(val_images) == 2 and len(train_images) == 6 and not train_images & val_images
    assert split_outliers(AnomalyMixConfig()) == (None, None)


def test_calibrated_margins_are_quantiles_of_inlier_energy():
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=3, width=4, depth=2)).eval()
    batches = [
        {"image": torch.randn(2, 3, 16, 16), "label": torch.randint(0, 3, (2, 16, 16))}
        for _ in range(2)
    ]
    batches[0]["label"][:, :8] = IGNORE_INDEX
    with torch.no_grad():
        energy = torch.cat(
            [-torch.logsumexp(model(b["image"]), 1)[b["label"] != IGNORE_INDEX] for b in batches]
        )
    config = calibrate_margins(PebalConfig(margin_quantiles=(0.25, 0.9)), model, batches)
    assert config.m_in == pytest.approx(float(torch.quantile(energy.double(), 0.25)), rel=1e-5)
    assert config.m_out == pytest.approx(float(torch.quantile(energy.double(), 0.9)), rel=1e-5)
    assert calibrate_margins(PebalConfig(), model, batches) == PebalConfig()


class LabelEcho(torch.nn.Module):
    """Two equal logit channels of ``sign`` * -label: the max-logit score is ``sign`` * label."""

    def __init__(self, labels, sign):
        super().__init__()
        self.labels, self.sign = labels, sign

    def forward(self, x):
        logits = -self.sign * self.labels[: x.shape[0]].float()
        return torch.stack([logits, logits], 1)


def fake_result():
    """An evaluation where ``perfect`` scores equal the labels and ``inverted`` are their opposite."""
    images = [
        {
            "image": torch.zeros(3, 8, 8),
            "label": torch.zeros(8, 8, dtype=torch.long),
            "sample_id": f"s{i}",
        }
        for i in range(2)
    ]
    images[0]["label"][2:4, 2:4] = 1
    images[1]["label"][0] = IGNORE_INDEX
    labels = torch.stack([i["label"].clamp(max=1) for i in images])
    methods = (Method("perfect", "a", "max_logit"), Method("inverted", "b", "max_logit"))
    return evaluate_anomaly(
        {"a": LabelEcho(labels, 1), "b": LabelEcho(labels, -1)},
        images,
        "toy",
        methods,
        batch_size=2,
        panel_images=1,
        panel_methods=("perfect",),
    )


def test_evaluation_tables_metric_names_and_plots(tmp_path):
    result = fake_result()
    assert result.metrics["perfect"] == {"auroc": 1.0, "ap": 1.0, "fpr95": 0.0}
    assert result.metrics["inverted"]["auroc"] == 0.0 and result.metrics["inverted"]["fpr95"] == 1.0
    assert result.labels.size == 2 * 64 - 8  # void pixels are left out
    assert flat_metrics([result])["anomaly/toy/perfect/ap"] == 1.0
    assert set(flat_metrics([result])) == {
        f"anomaly/toy/{m}/{k}" for m in ("perfect", "inverted") for k in ("ap", "fpr95", "auroc")
    }
    csv = table_csv([result]).splitlines()
    assert csv[0] == "dataset,method,auroc,ap,fpr95,protocol" and csv[1].startswith(
        "toy,perfect,1.000000,1.000000,0.000000,"
    )
    markdown = table_markdown([result, replace(result, name="other")])
    assert "| method | toy AP | toy FPR95 | toy AUROC | other AP |" in markdown
    assert "| perfect | 100.00 | 0.00 | 100.00 | 100.00 |" in markdown
    for path in (
        plot_curves(result, tmp_path / "curves.png"),
        plot_panels(result, tmp_path / "panels.png"),
    ):
        assert Image.open(path).size[0] > 100
    assert len(result.panels) == 1 and set(result.panels[0].maps) == {"perfect"}


def test_epoch_trains_only_the_last_block_and_stops_on_non_finite_loss(
    pretrained, datasets, one_thread
):
    train, _ = datasets
    config = PebalConfig(m_in=-4.0, m_out=-2.0, trainable=("decoder.2", "head"))
    model = prepare_pebal_model(pretrained, config.trainable)
    before = copy.deepcopy(model.state_dict())
    optimizer = make_optimizer(model.parameters(), config.finetune)
    loader = DataLoader(torch.utils.data.Subset(train, range(4)), batch_size=2)
    stats = pebal_train_epoch(
        model,
        loader,
        optimizer,
        AnomalyMix(config.anomalymix, 19),
        config,
        np.random.default_rng(0),
        torch.device("cpu"),
        epoch=3,
        first_step=10,
    )
    assert stats["steps"] == 2 and np.isfinite(stats["loss"]) and stats["step_s"] > 0
    after = model.state_dict()
    for name, value in before.items():
        if not name.startswith(
            ("decoder.2.", "head.")
        ):  # frozen weights and BatchNorm statistics never move
            assert torch.equal(value, after[name]), name
    for name in ("head.weight", "head.bias", "decoder.2.0.weight", "decoder.2.1.running_mean"):
        assert not torch.equal(before[name], after[name]), name
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"step 10, batch 0 of epoch 3 \(samples train/"):
        pebal_train_epoch(
            model,
            loader,
            optimizer,
            AnomalyMix(config.anomalymix, 19),
            config,
            np.random.default_rng(0),
            torch.device("cpu"),
            epoch=3,
            first_step=10,
        )


def test_an_epoch_takes_finetune_min_steps_over_a_short_training_set(
    pretrained, datasets, one_thread
):
    train, _ = datasets
    config = PebalConfig(m_in=-4.0, m_out=-2.0, trainable=("decoder.2", "head"))
    config = replace(config, finetune=replace(config.finetune, epochs=2, min_steps=10))
    model = prepare_pebal_model(pretrained, config.trainable)
    loader = DataLoader(torch.utils.data.Subset(train, range(4)), batch_size=2)  # 2 batches a pass
    stats = pebal_train_epoch(
        model,
        loader,
        make_optimizer(model.parameters(), config.finetune),
        AnomalyMix(config.anomalymix, 19),
        config,
        np.random.default_rng(0),
        torch.device("cpu"),
    )
    assert stats["steps"] == 5  # 10 steps over 2 epochs: two passes and a half


# -- Ray Train ------------------------------------------------------------------------------------------


def bn_statistics(state):
    return {k: v for k, v in state.items() if "running_" in k}


@pytest.mark.slow
def test_pebal_finetuning_on_ray_trains_the_last_block_and_lifts_the_energy_of_pasted_objects(
    local_ray, pretrained, datasets, tmp_path
):
    train, val = datasets
    config = PebalConfig(
        m_in=-4.0,
        m_out=-2.0,
        lam=1.0,
        trainable=("decoder.2", "head"),
        anomalymix=AnomalyMixConfig(fraction=1.0),
        finetune=FinetuneConfig(epochs=20, batch_size=4, lr=1e-2),
    )
    job = PebalJob(
        train,
        MixedValidationSet(val, config.anomalymix, 19, seed=0),
        pretrained.to_checkpoint(),
        config,
    )
    result = finetune(job, ScalingConfig(num_workers=1), tmp_path / "ray", "pebal")
    assert [m["epoch"] for m in result.history] == list(range(20))
    assert result.best_metrics["val/ap"] == pytest.approx(max(m["val/ap"] for m in result.history))
    assert load_checkpoint(result.best_checkpoint)["metrics"]["val/ap"] == pytest.approx(
        result.best_metrics["val/ap"]
    )
    tuned, original = (
        load_checkpoint(result.last_checkpoint)["model"]["state_dict"],
        pretrained.state_dict(),
    )
    assert torch.equal(tuned["encoder.0.0.weight"], original["encoder.0.0.weight"])  # frozen
    assert not torch.equal(tuned["decoder.2.0.weight"], original["decoder.2.0.weight"])  # trained
    for name, value in bn_statistics(original).items():
        if not name.startswith(
            "decoder.2."
        ):  # frozen BatchNorm kept its statistics through Ray's prepare_model
            assert torch.equal(tuned[name], value), name
    # What cannot flip with the CPU's kernels or the seed (bench/pebal_synthetic_margin.py, 8 seeds on AVX512
    # and on AVX2 kernels): the loss falls to 0.55-0.71 of the first epoch's, and pasted pixels end with a
    # mean free energy 0.89-2.0 above the inliers'. Whether PEBAL's AP on the 4-image synthetic benchmark
    # beats the energy baseline flips with the seed (ratios 0.32-21): that claim lives in the bench.
    losses = [m["train/loss"] for m in result.history]
    assert losses[-1] < 0.85 * losses[0], losses
    assert mean_energy_gap(load_finetuned(result.last_checkpoint), job.val_set) > 0.3


@torch.no_grad()
def mean_energy_gap(model, dataset) -> float:
    """Mean free energy -logsumexp(inlier logits) of anomaly pixels minus that of inlier pixels."""
    gaps = {0: [], 1: []}
    for item in dataset:
        logits = model(item["image"][None])[0, :-1].double()
        energy = -torch.log(torch.exp(logits).sum(0))
        for value in gaps:
            gaps[value].append(energy[item["label"] == value])
    return float(torch.cat(gaps[1]).mean() - torch.cat(gaps[0]).mean())


@pytest.mark.slow
def test_non_finite_loss_names_step_and_batch_and_keeps_the_last_good_checkpoint(
    local_ray, pretrained, datasets, synthetic_root, tmp_path
):
    train, val = datasets
    four = SegmentationDataset(
        cityscapes_manifest(synthetic_root, "train").slice(0, 4), CITYSCAPES, train.transform
    )
    # An absurd learning rate: epoch 0 (one batch) is still finite, its update sends the logits to ~1e26,
    # so epoch 1's squared energy margins overflow.
    config = PebalConfig(
        m_in=-4.0, m_out=-2.0, finetune=FinetuneConfig(epochs=3, batch_size=4, lr=1e25)
    )
    job = PebalJob(
        four,
        MixedValidationSet(val, config.anomalymix, 19, seed=0),
        pretrained.to_checkpoint(),
        config,
    )
    with pytest.raises(
        PebalTrainingError, match=r"non-finite PEBAL loss at step 1, batch 0 of epoch 1"
    ) as caught:
        finetune(job, ScalingConfig(num_workers=1), tmp_path / "ray", "nan")
    assert isinstance(caught.value.cause, NonFiniteLossError)
    assert caught.value.last_checkpoint is not None and str(caught.value.last_checkpoint) in str(
        caught.value
    )
    assert load_checkpoint(caught.value.last_checkpoint)["epoch"] == 0
