"""PEBAL evaluation: the fine-tuned model's anomaly score against baselines of the original model.

Methods (all oriented higher = more anomalous, see :mod:`segxal.pebal.scores`):

- ``pebal``: free energy of the fine-tuned model (abstention channel dropped), Gaussian-smoothed
  (kernel 7, σ 1 by default): PEBAL's inference score;
- on the original segmenter, without fine-tuning: ``energy`` (raw, the paper's baseline),
  ``smoothed_energy`` (the same blur as ``pebal``, so that the gain of fine-tuning is not confused with
  the gain of smoothing), ``msp``, ``max_logit`` and ``entropy``.

Scores of every non-void pixel of a dataset are pooled, then AUROC / AP / FPR95 are computed as
:func:`segxal.metrics.anomaly_metrics` defines them. Datasets are anomaly benchmarks (labels 0 inlier,
1 anomaly, 255 void) or :class:`MixedValidationSet`: a segmentation split with outliers pasted by
AnomalyMix at a fixed seed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segxal.component_metrics import (
    COMPONENT_METRICS,
    best_f1_threshold,
    image_components,
    summarize,
)
from segxal.data.anomaly import AnomalyBenchmark
from segxal.data.dataset import SampleTransform
from segxal.data.labels import IGNORE_INDEX, LabelSet
from segxal.data.transforms import denormalize
from segxal.markdown import markdown_table
from segxal.metrics import anomaly_metrics, roc_points
from segxal.pebal.anomalymix import AnomalyMix, CocoOutliers
from segxal.pebal.config import AnomalyMixConfig, BenchmarkConfig, EvaluationConfig, PebalConfig
from segxal.pebal.scores import anomaly_score, free_energy

PEBAL = "pebal"
ORIGINAL = "original"  # key of the segmenter before fine-tuning in the ``models`` mappings below
METRICS = ("ap", "fpr95", "auroc")


@dataclass(frozen=True)
class Method:
    """An anomaly score ``score`` computed from the logits of ``models[model]``."""

    name: str
    model: str
    score: str
    abstention: bool = False


def default_methods() -> tuple[Method, ...]:
    return (
        Method(PEBAL, PEBAL, "smoothed_energy", abstention=True),
        Method("energy", ORIGINAL, "energy"),
        Method("smoothed_energy", ORIGINAL, "smoothed_energy"),
        Method("msp", ORIGINAL, "msp"),
        Method("max_logit", ORIGINAL, "max_logit"),
        Method("entropy", ORIGINAL, "entropy"),
    )


def anomaly_labels(labels: torch.Tensor, anomaly_index: int) -> torch.Tensor:
    """Segmentation labels with the anomaly class ``anomaly_index`` -> 0 inlier, 1 anomaly, 255 void."""
    out = torch.where(labels == anomaly_index, 1, 0).to(labels.dtype)
    return torch.where(labels == IGNORE_INDEX, torch.full_like(labels, IGNORE_INDEX), out)


def split_outliers(
    config: AnomalyMixConfig, val_share: float = 0.25
) -> tuple[CocoOutliers | None, CocoOutliers | None]:
    """(training, validation) outlier sources: COCO instances split by image, so that no object pasted
    into the validation set was seen in training. ``(None, None)`` for the procedural outliers, whose
    training and validation draws already differ by their seeds."""
    if not config.uses_coco:
        return None, None
    instances = CocoOutliers.from_config(config).instances
    images = sorted({str(instance.image_path) for instance in instances})
    step = max(2, round(1 / val_share))
    held_out = set(images[step - 1 :: step])
    train = [i for i in instances if str(i.image_path) not in held_out]
    val = [i for i in instances if str(i.image_path) in held_out]
    if not train or not val:  # too few images to split: both sides see every instance
        return CocoOutliers(instances), CocoOutliers(instances)
    return CocoOutliers(train), CocoOutliers(val)


def mixed_validation_name(label_set: LabelSet) -> str:
    """The name of the AnomalyMix'd validation split in tables and metrics."""
    return f"{label_set.name}_anomalymix_val"


class MixedValidationSet(Dataset):
    """A segmentation dataset with AnomalyMix outliers pasted into every image, reproducibly.

    Image ``i`` is mixed with ``numpy.random.default_rng([seed, i])``, whatever the batch size or
    order; labels come out as 0 inlier, 1 anomaly, 255 void.
    """

    def __init__(
        self,
        dataset: Dataset,
        config: AnomalyMixConfig,
        anomaly_index: int,
        seed: int = 0,
        outliers=None,
        name: str = "anomalymix_val",
    ) -> None:
        self.dataset = dataset
        self.mixer = AnomalyMix(replace(config, fraction=1.0), anomaly_index, outliers)
        self.anomaly_index = anomaly_index
        self.seed = seed
        self.name = name

    def __len__(self) -> int:
        # a map-style dataset has a length; torch's Dataset type declares none
        return len(cast(Sized, self.dataset))

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        rng = np.random.default_rng([self.seed, index])
        images, labels, _ = self.mixer(item["image"][None], item["label"][None], rng)
        item["image"], item["label"] = images[0], anomaly_labels(labels[0], self.anomaly_index)
        return item


@dataclass
class Panel:
    sample_id: str
    image: np.ndarray  # (H, W, 3) float in [0, 1]
    label: np.ndarray  # (H, W) 0 / 1 / 255
    maps: dict[str, np.ndarray]  # method -> (H, W) score map


@dataclass
class DatasetResult:
    name: str
    metrics: dict[str, dict[str, float]]  # method -> {"ap", "fpr95", "auroc"[, component metrics]}
    scores: dict[str, np.ndarray] = field(repr=False)  # method -> pooled non-void pixel scores
    labels: np.ndarray = field(repr=False)  # pooled non-void labels, 1 = anomaly
    panels: list[Panel] = field(default_factory=list, repr=False)
    protocol: str = ""  # how the images were scored and compared (in every table)


@dataclass(frozen=True)
class ComponentSizes:
    """SegmentMeIfYouCan's component filters, in pixels at the label's resolution."""

    min_predicted: int = 500
    min_gt: int = 100


@dataclass(frozen=True)
class EvaluationSet:
    """A dataset to evaluate, how (``protocol``, in every table) and with which component filters."""

    name: str
    dataset: Dataset
    protocol: str
    batch_size: int = 4
    components: ComponentSizes | None = None


def benchmark_set(
    benchmark: AnomalyBenchmark,
    entry: BenchmarkConfig,
    evaluation: EvaluationConfig,
    image_size: tuple[int, int] | None,
    batch_size: int,
) -> EvaluationSet:
    """``benchmark`` under ``evaluation``'s protocol (``image_size``: the training size, data.image_size)."""
    sizes = ComponentSizes(
        evaluation.min_predicted_component
        if entry.min_predicted_component is None
        else entry.min_predicted_component,
        evaluation.min_gt_component if entry.min_gt_component is None else entry.min_gt_component,
    )
    if evaluation.protocol == "training_size":
        where = "each file's own size" if image_size is None else f"{image_size[0]}x{image_size[1]}"
        protocol = (
            f"training_size: images and labels resized to {where} (data.image_size), metrics there"
        )
        dataset = benchmark.dataset(SampleTransform(size=image_size))
        return EvaluationSet(benchmark.name, dataset, protocol, batch_size, sizes)
    height: int | None
    if evaluation.input_height == "training":
        height = None if image_size is None else image_size[0]
    elif evaluation.input_height == "native":
        height = None
    else:
        height = evaluation.input_height
    if height is None:
        protocol = (
            "label_resolution: scored at each file's own size, metrics at the label resolution"
        )
        transform = SampleTransform(label_at_file_size=True)
    else:
        protocol = (
            f"label_resolution: scored at height {height} with the aspect kept, scores upsampled "
            "bilinearly to the label resolution, metrics there"
        )
        transform = SampleTransform(height=height, label_at_file_size=True)
    # images of one benchmark may differ in size: one per batch
    return EvaluationSet(benchmark.name, benchmark.dataset(transform), protocol, 1, sizes)


def _at_label_size(maps: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B, h, w) score maps upsampled bilinearly to the label's (B, H, W) when the sizes differ."""
    if maps.shape[-2:] == label.shape[-2:]:
        return maps
    return F.interpolate(
        maps[:, None].float(), size=label.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]


def _component_metrics(
    scores: np.ndarray, labels: np.ndarray, valid_masks: list[np.ndarray], sizes: ComponentSizes
) -> dict[str, float]:
    """sIoU, PPV and mean F1 at the best pixel-F1 threshold, the images rebuilt from the pooled
    non-void pixels (``valid_masks``: each image's non-void pixels, in the pooling order)."""
    threshold = best_f1_threshold(scores, labels)
    images, start = [], 0
    for valid in valid_masks:
        count = int(valid.sum())
        predicted = np.zeros(valid.shape, dtype=bool)
        label = np.full(valid.shape, IGNORE_INDEX, dtype=np.uint8)
        predicted[valid] = scores[start : start + count] >= threshold
        label[valid] = labels[start : start + count]
        images.append(image_components(predicted, label, sizes.min_predicted, sizes.min_gt))
        start += count
    return {**summarize(images), "threshold": threshold}


@torch.no_grad()
def evaluate_anomaly(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    name: str,
    methods: Sequence[Method] = default_methods(),
    smoothing: tuple[int, float] = (7, 1.0),
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    panel_images: int = 0,
    panel_methods: tuple[str, ...] = (PEBAL, "energy"),
    components: ComponentSizes | None = None,
    protocol: str = "",
) -> DatasetResult:
    """Pooled AUROC / AP / FPR95 of every method on ``dataset`` (items with ``image`` and 0/1/255 ``label``),
    and with ``components`` SegmentMeIfYouCan's sIoU, PPV and mean F1 (:mod:`segxal.component_metrics`).

    ``models`` maps the ``model`` keys of ``methods`` to networks (put in eval mode here; each runs
    once per batch). ``smoothing``: kernel and σ of the smoothed scores. Score maps are upsampled
    bilinearly to the label's size where it differs from the image's. The first ``panel_images``
    images keep their maps of ``panel_methods`` for :func:`plot_panels`.
    """
    needed = {method.model for method in methods}
    missing = needed - set(models)
    if missing:
        raise KeyError(f"no model given for {sorted(missing)} (have {sorted(models)})")
    for key in needed:
        models[key].eval()
    scores: dict[str, list[np.ndarray]] = {method.name: [] for method in methods}
    labels: list[np.ndarray] = []
    valid_masks: list[np.ndarray] = []
    panels: list[Panel] = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        image, label = batch["image"].to(device), batch["label"].to(device)
        logits = {key: models[key](image) for key in needed}
        valid = label != IGNORE_INDEX
        maps = {}
        for method in methods:
            score = anomaly_score(logits[method.model], method.score, method.abstention, *smoothing)
            maps[method.name] = _at_label_size(score, label)
            scores[method.name].append(maps[method.name][valid].float().cpu().numpy())
        labels.append(label[valid].to(torch.uint8).cpu().numpy())
        if components is not None:
            valid_masks.extend(valid.cpu().numpy())
        for index in range(min(panel_images - len(panels), image.shape[0])):
            panels.append(
                Panel(
                    sample_id=str(batch["sample_id"][index]),
                    image=denormalize(image[index]).clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
                    label=label[index].cpu().numpy(),
                    maps={m: maps[m][index].cpu().numpy() for m in panel_methods if m in maps},
                )
            )
    if not labels:
        raise ValueError(f"{name}: the anomaly dataset is empty")
    pooled_labels = np.concatenate(labels)
    pooled = {method: np.concatenate(parts) for method, parts in scores.items()}
    try:
        metrics = {
            method: anomaly_metrics(values, pooled_labels) for method, values in pooled.items()
        }
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error
    if components is not None:
        for method_name, values in pooled.items():
            metrics[method_name].update(
                _component_metrics(values, pooled_labels, valid_masks, components)
            )
    return DatasetResult(name, metrics, pooled, pooled_labels, panels, protocol)


@torch.no_grad()
def inlier_energy_quantiles(
    model: nn.Module,
    batches: Iterable[dict],
    quantiles: Sequence[float],
    device: torch.device | str = "cpu",
    max_pixels: int = 2_000_000,
) -> list[float]:
    """Quantiles of the free energy of ``model`` (no abstention channel) over non-void pixels.

    Pixels are subsampled evenly to at most ``max_pixels`` so that large training sets stay cheap.
    """
    model.eval()
    energies = []
    for batch in batches:
        label = batch["label"].to(device)
        energies.append(free_energy(model(batch["image"].to(device)))[label != IGNORE_INDEX].cpu())
    values = torch.cat(energies).double()
    if values.numel() == 0:
        raise ValueError("no labelled pixel to calibrate the energy margins on")
    if values.numel() > max_pixels:
        values = values[:: -(-values.numel() // max_pixels)]
    return [
        float(v) for v in torch.quantile(values, torch.tensor(list(quantiles), dtype=torch.float64))
    ]


def calibrate_margins(
    config: PebalConfig,
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device | str = "cpu",
) -> PebalConfig:
    """``config`` with m_in, m_out set from ``config.margin_quantiles`` of ``model``'s inlier energy
    (``config`` unchanged when no quantiles are configured)."""
    if config.margin_quantiles is None:
        return config
    m_in, m_out = inlier_energy_quantiles(model, batches, config.margin_quantiles, device)
    if not m_in < m_out:
        raise ValueError(
            f"pebal.margin_quantiles {config.margin_quantiles} give m_in {m_in:.4f} >= m_out {m_out:.4f}: "
            "the pre-trained model's inlier energy is (nearly) constant; set pebal.m_in/m_out by hand"
        )
    return replace(config, m_in=m_in, m_out=m_out)


# -- reporting ------------------------------------------------------------------------------------------


def metric_name(dataset: str, method: str, metric: str) -> str:
    return f"anomaly/{dataset}/{method}/{metric}"


def result_metrics(result: DatasetResult) -> tuple[str, ...]:
    """The table's metrics of ``result``: AP, FPR95, AUROC, then sIoU, PPV, mean F1 when computed."""
    first = next(iter(result.metrics.values()), {})
    return METRICS + (COMPONENT_METRICS if COMPONENT_METRICS[0] in first else ())


def flat_metrics(results: Iterable[DatasetResult]) -> dict[str, float]:
    """``{"anomaly/<dataset>/<method>/<metric>": value}`` for MLflow (every metric computed)."""
    return {
        metric_name(r.name, method, key): value
        for r in results
        for method, values in r.metrics.items()
        for key, value in values.items()
    }


def table_rows(results: Iterable[DatasetResult]) -> list[dict]:
    """One row per (dataset, method) with every metric computed (empty where a dataset has none) and
    the dataset's protocol."""
    results = list(results)
    keys = list(dict.fromkeys(k for r in results for v in r.metrics.values() for k in v))
    return [
        {
            "dataset": r.name,
            "method": method,
            **{k: values.get(k, "") for k in keys},
            "protocol": r.protocol,
        }
        for r in results
        for method, values in r.metrics.items()
    ]


def table_csv(results: Iterable[DatasetResult]) -> str:
    rows = table_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


HEADINGS = {
    "ap": "AP",
    "fpr95": "FPR95",
    "auroc": "AUROC",
    "siou": "sIoU",
    "ppv": "PPV",
    "mean_f1": "mF1",
}


def table_markdown(results: Sequence[DatasetResult]) -> str:
    """Methods down, datasets across (each dataset's metrics in %, side by side), then each dataset's
    protocol."""
    methods = list(dict.fromkeys(m for r in results for m in r.metrics))
    header = ["method"] + [
        f"{r.name} {HEADINGS[key]}" for r in results for key in result_metrics(r)
    ]
    rows = []
    for method in methods:
        cells = [method]
        for r in results:
            values = r.metrics.get(method)
            cells += [f"{100 * values[key]:.2f}" if values else "-" for key in result_metrics(r)]
        rows.append(cells)
    protocols = "".join(f"\n- {r.name}: {r.protocol}" for r in results if r.protocol)
    return markdown_table(header, rows) + (f"\nProtocol:{protocols}\n" if protocols else "")


def _thinned(x: np.ndarray, y: np.ndarray, resolution: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The points of a curve that fall in distinct cells of a ``resolution`` x ``resolution`` grid, in order."""
    cells = np.round(x * resolution).astype(np.int64) * (resolution + 1) + np.round(
        y * resolution
    ).astype(np.int64)
    keep = np.r_[True, cells[1:] != cells[:-1]]
    keep[-1] = True
    return x[keep], y[keep]


def _curves(scores: np.ndarray, labels: np.ndarray):
    """((fpr, tpr), (recall, precision)) over every threshold, thinned for plotting."""
    tps, fps, _ = roc_points(scores.astype(np.float64), labels.astype(bool))
    positives, negatives = max(int(labels.sum()), 1), max(int(labels.size - labels.sum()), 1)
    roc = _thinned(np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives])
    pr = _thinned(tps / positives, tps / np.maximum(tps + fps, 1))
    return roc, pr


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: DatasetResult, path: str | Path) -> Path:
    """ROC and precision-recall curves of every method on one dataset, as a PNG."""
    plt = _pyplot()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, scores in result.scores.items():
        (fpr, tpr), (recall, precision) = _curves(scores, result.labels)
        values = result.metrics[method]
        roc.plot(
            fpr,
            tpr,
            label=f"{method} (AUROC {100 * values['auroc']:.1f}, FPR95 {100 * values['fpr95']:.1f})",
        )
        pr.plot(recall, precision, label=f"{method} (AP {100 * values['ap']:.1f})")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC: {result.name}",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    pr.axhline(result.labels.mean(), color="grey", linestyle=":", linewidth=1)
    pr.set(
        xlabel="recall",
        ylabel="precision",
        title=f"Precision-recall: {result.name}",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    for axis in (roc, pr):
        axis.legend(fontsize=7, loc="lower right" if axis is roc else "upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_panels(result: DatasetResult, path: str | Path) -> Path | None:
    """Rows of image | ground-truth anomaly | score maps (PEBAL, energy baseline) as a PNG; None without panels."""
    if not result.panels:
        return None
    plt = _pyplot()
    methods = list(result.panels[0].maps)
    columns = 2 + len(methods)
    fig, axes = plt.subplots(
        len(result.panels),
        columns,
        figsize=(3.2 * columns, 2.0 * len(result.panels) + 0.4),
        squeeze=False,
    )
    for row, panel in zip(axes, result.panels, strict=False):
        gt = np.where(panel.label == IGNORE_INDEX, 0.5, panel.label.astype(float))  # void grey
        row[0].imshow(panel.image)
        row[0].set_title(panel.sample_id, fontsize=7)
        row[1].imshow(gt, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        row[1].set_title("ground truth anomaly", fontsize=7)
        for axis, method in zip(row[2:], methods, strict=False):
            axis.imshow(panel.maps[method], cmap="inferno")
            axis.set_title(f"{method} score", fontsize=7)
        for axis in row:
            axis.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
