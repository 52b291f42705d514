"""Pool scoring on Ray: actors that each load the segmenter and the depth model once and score
shards of D^S, returning ids and scalars (and embeddings for core-set) as Arrow; full maps, prompts
and panels only for the images sent to the oracle.

``PoolScorer`` is a plain class (tests call it directly); ``ScorerPool`` runs it as Ray actors that
restart after a crash and retry the shard they were working on, so a pass always scores every id once.
An image that cannot be read is not scored: it comes back with its reason in ``unreadable`` (scoring) or
in ``Explained.unreadable`` (explaining), for the run to quarantine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from actors.dispatch import map_on_idle_actors
from orchestrator.oracles import AnnotationRequest
from orchestrator.records import REGION_SCORE_SCHEMA, UNREADABLE
from orchestrator.run import Explained
from orchestrator.run_layout import file_name
from orchestrator.strategies import RegionSpec, ScoreKind
from segxal.data.dataset import DataError, SampleTransform, SegmentationDataset
from segxal.data.labels import LABEL_SETS
from segxal.data.region_labels import labelled_mask, read_region_labels
from segxal.eem.bald import mc_probabilities, normalized_bald
from segxal.eem.config import EEMConfig
from segxal.eem.entropy import normalized_entropy
from segxal.eem.panels import save_panel
from segxal.eem.pipeline import EEMScores, score_batch
from segxal.eem.regions import cell_regions, extract_regions, queried_region_map, region_map
from segxal.models.depth import build_depth_backend
from segxal.models.unet import UNet
from segxal.training import resolve_device

log = logging.getLogger(__name__)


@torch.no_grad()
def _embeddings(scorer: PoolScorer, images: torch.Tensor, batch: dict, kind: ScoreKind) -> Scored:
    return [e.tolist() for e in scorer.model.embed(images).float().cpu().numpy()], None


@torch.no_grad()
def _entropy_map(scorer: PoolScorer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised entropy and the prediction."""
    assert scorer.model is not None
    logits = scorer.model(images)
    return normalized_entropy(logits), logits.argmax(1)


def _mean_entropy(scorer: PoolScorer, images: torch.Tensor, batch: dict, kind: ScoreKind) -> Scored:
    values, prediction = _entropy_map(scorer, images)
    return values.mean(dim=(1, 2)).cpu().tolist(), prediction


def _bald_map(scorer: PoolScorer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised BALD and the MC-averaged prediction."""
    assert scorer.model is not None
    probabilities = mc_probabilities(scorer.model, images, scorer.eem.mc_samples)
    return normalized_bald(probabilities), probabilities.mean(dim=0).argmax(dim=1)


def _mean_bald(scorer: PoolScorer, images: torch.Tensor, batch: dict, kind: ScoreKind) -> Scored:
    values, prediction = _bald_map(scorer, images)
    return values.mean(dim=(1, 2)).cpu().tolist(), prediction


def _eem_of(
    scorer: PoolScorer, images: torch.Tensor, batch: dict, config: EEMConfig, maps: bool = False
) -> EEMScores:
    """``score_batch`` on a batch of the dataset, with the batch's disparity where it has one."""
    assert scorer.model is not None
    depth = batch.get("depth")
    depth = None if depth is None else depth.to(scorer.device)
    return score_batch(scorer.model, images, config, scorer.depth_backend, depth, return_maps=maps)


def _eem_score(scorer: PoolScorer, images: torch.Tensor, batch: dict, kind: ScoreKind) -> Scored:
    return _eem_of(scorer, images, batch, kind.eem_config(scorer.eem)).score.tolist(), None


Scored = tuple[list, torch.Tensor | None]  # one value per image; the predictions, where at hand
SCORE_FUNCTIONS = {
    ScoreKind.EMBEDDING: _embeddings,
    ScoreKind.ENTROPY: _mean_entropy,
    ScoreKind.BALD: _mean_bald,
    ScoreKind.EEM: _eem_score,
    ScoreKind.PAE: _eem_score,
    ScoreKind.EBU: _eem_score,
}
"""What the scorers compute for each kind: one value (a score or an embedding) per image of a batch,
and the batch's predictions where computing the value gave them."""


def _region_values(
    scorer: PoolScorer, images: torch.Tensor, batch: dict, spec: RegionSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, H, W) maps for region mode: the one a region's score is the mean of, the predictions, and
    the uncertainty its prompt marks the peak of."""
    if spec.kind is None:  # random regions: no score, the run draws one
        shape = (images.shape[0], *images.shape[2:])
        return np.zeros(shape), np.zeros(shape, dtype=np.int64), np.zeros(shape)
    if spec.kind in (ScoreKind.ENTROPY, ScoreKind.BALD):
        per_pixel = _entropy_map if spec.kind is ScoreKind.ENTROPY else _bald_map
        values, prediction = per_pixel(scorer, images)
        values_np = values.cpu().numpy()  # the score is the uncertainty: the prompt marks its peak
        return values_np, prediction.cpu().numpy(), values_np
    maps = _eem_of(scorer, images, batch, spec.kind.eem_config(scorer.eem), maps=True).maps
    assert maps is not None
    return maps.eem.cpu().numpy(), maps.prediction.cpu().numpy(), maps.entropy.cpu().numpy()


class ReadableOrNot(Dataset):
    """A dataset whose item is the sample, or, for a file that cannot be read, its ``sample_id`` and
    the reason under ``UNREADABLE`` (so that a DataLoader worker does not fail on it)."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except DataError as error:
            return {"sample_id": self.dataset.rows[index]["sample_id"], UNREADABLE: str(error)}


class PoolScorer:
    def __init__(
        self,
        eem: EEMConfig,
        label_set: str,
        size: tuple[int, int] | None,
        batch_size: int,
        device: str = "auto",
        loader_workers: int = 0,
    ) -> None:
        self.eem = eem
        self.loader_workers = loader_workers
        self.label_set = LABEL_SETS[label_set]
        self.transform = SampleTransform(size=None if size is None else tuple(size))
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.depth_backend = build_depth_backend(eem.depth, self.device)
        self.model: UNet | None = None

    def load_model(self, checkpoint: dict) -> None:
        """``checkpoint``: ``UNet.to_checkpoint()``; sent once per cycle through the object store."""
        self.model = UNet.from_checkpoint(checkpoint).to(self.device).eval()

    def _batches(self, rows: pa.Table, unreadable: dict[str, str]) -> Iterator[dict]:
        """Batches of the readable rows, in order; each unreadable one goes into ``unreadable`` instead.
        With ``loader_workers``, that many processes decode ahead (DataLoader prefetching)."""
        dataset = ReadableOrNot(
            SegmentationDataset(
                rows,
                self.label_set,
                self.transform,
                load_depth=self.eem.depth.backend == "dataset",
                load_label=False,  # scoring and explaining never use it
            )
        )
        decoded = DataLoader(
            dataset,
            batch_size=None,  # one sample at a time: an unreadable one leaves the batch, not fails it
            num_workers=self.loader_workers,
            prefetch_factor=2 * self.batch_size if self.loader_workers else None,
            generator=torch.Generator(),  # its own: the global one drives MC dropout (BALD)
        )
        samples = []
        for sample in decoded:
            if UNREADABLE in sample:
                log.warning(
                    "%s cannot be read and is left out: %s", sample["sample_id"], sample[UNREADABLE]
                )
                unreadable[sample["sample_id"]] = sample[UNREADABLE]
                continue
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield default_collate(samples)
                samples = []
        if samples:
            yield default_collate(samples)

    def score(
        self, rows: pa.Table, kind: ScoreKind, class_weights: Sequence[float] | None = None
    ) -> pa.Table:
        """One row per input row, in id order (``kind.schema``): ``sample_id`` and ``score`` (higher =
        more informative) or ``embedding``; unreadable images have a reason in ``unreadable`` and a
        null value. With ``class_weights`` (one per class, ``orchestrator.class_balance``) each score is
        multiplied by the mean weight of the image's predicted classes."""
        if self.model is None:
            raise RuntimeError("load_model must be called before score")
        compute = SCORE_FUNCTIONS[kind]
        ids, values, unreadable = [], [], {}
        for batch in self._batches(rows, unreadable):
            ids.extend(batch["sample_id"])
            images = batch["image"].to(self.device)
            scores, prediction = compute(self, images, batch, kind)
            if class_weights is not None:
                if prediction is None:
                    with torch.no_grad():
                        prediction = self.model(images).argmax(1)
                weight = self._class_weight_map(prediction, class_weights).mean(dim=(1, 2))
                scores = [v * w for v, w in zip(scores, weight.tolist(), strict=True)]
            values.extend(scores)
        table = pa.table(
            {
                "sample_id": ids + list(unreadable),
                kind.column: values + [None] * len(unreadable),
                UNREADABLE: [None] * len(ids) + list(unreadable.values()),
            },
            schema=kind.schema,
        )
        return table.sort_by("sample_id")

    def _class_weight_map(
        self, prediction: torch.Tensor, class_weights: Sequence[float]
    ) -> torch.Tensor:
        """(B, H, W) the class weight of each pixel's predicted class."""
        weights = torch.tensor(class_weights, dtype=torch.float32, device=prediction.device)
        return weights[prediction.long()]

    def _labelled(self, rows: pa.Table, row: int, shape: tuple[int, ...]) -> np.ndarray:
        """The pixels of row ``row`` labelled so far (region mode), at the scoring resolution."""
        mask_path = rows["mask_path"][row].as_py() if "mask_path" in rows.column_names else None
        return labelled_mask(read_region_labels(mask_path, (shape[0], shape[1])))

    def score_regions(
        self, rows: pa.Table, spec: RegionSpec, class_weights: Sequence[float] | None = None
    ) -> pa.Table:
        """One row per queryable region of each readable input row (``REGION_SCORE_SCHEMA``), in id
        order: EEM regions or cells over its unlabelled pixels, scored by their mean of ``spec.kind``'s
        map (null for random), times the mean class weight of their predicted pixels with
        ``class_weights``; unreadable images get one row with the reason."""
        if self.model is None:
            raise RuntimeError("load_model must be called before score_regions")
        eem = spec.kind.eem_config(self.eem) if spec.kind is not None else self.eem
        names = self.label_set.class_names
        found: list[dict] = []
        unreadable: dict[str, str] = {}
        for batch in self._batches(rows, unreadable):
            values, predictions, uncertainty = _region_values(
                self, batch["image"].to(self.device), batch, spec
            )
            for i, sample_id in enumerate(batch["sample_id"]):
                labelled = self._labelled(rows, int(batch["index"][i]), values[i].shape)
                if spec.source == "cells":
                    records = cell_regions(values[i], predictions[i], labelled, spec.cell, names)
                else:
                    records = extract_regions(
                        np.where(labelled, -np.inf, values[i]),
                        predictions[i],
                        eem.region_threshold,
                        eem.min_region_area,
                        eem.max_regions,
                        names,
                        eem.otsu_bins,
                        uncertainty[i],
                    )
                weights = dict.fromkeys((r["id"] for r in records), 1.0)
                if class_weights is not None and records:
                    area = queried_region_map(values[i], labelled, records)
                    pixel_weight = np.asarray(class_weights)[predictions[i]]
                    sums = np.bincount(area.ravel(), pixel_weight.ravel(), area.max() + 1)
                    counts = np.bincount(area.ravel(), minlength=area.max() + 1)
                    weights = {k: sums[k] / max(counts[k], 1) for k in weights}
                found.extend(
                    {
                        "sample_id": sample_id,
                        "region": r["id"],
                        "score": None if spec.kind is None else r["mean_eem"] * weights[r["id"]],
                        "pixels": r["area"],
                        "record": json.dumps(r),
                    }
                    for r in records
                )
                if not records:  # scored, with nothing left to query
                    found.append({"sample_id": sample_id})
        found.extend({"sample_id": i, UNREADABLE: why} for i, why in unreadable.items())
        table = pa.Table.from_pylist(found, schema=REGION_SCORE_SCHEMA)
        return table.sort_by([("sample_id", "ascending"), ("region", "ascending")])

    def explain(
        self,
        rows: pa.Table,
        kind: ScoreKind,
        panel_dir: str | None = None,
        panels: int = 0,
        queried: Mapping[str, list[dict]] | None = None,
    ) -> Explained:
        """Full EEM maps, prompts and flip-TTA predictions of the selected images; the first ``panels``
        also get a PNG panel in ``panel_dir``. Region mode: ``queried`` holds each image's queried
        region records, and its request asks for those regions only."""
        if self.model is None:
            raise RuntimeError("load_model must be called before explain")
        config = kind.eem_config(self.eem)
        requests, unreadable = [], {}
        for batch in self._batches(rows, unreadable):
            images = batch["image"].to(self.device)
            maps = _eem_of(self, images, batch, config, maps=True).maps
            with torch.no_grad():
                probabilities = (
                    F.softmax(self.model(images), 1)
                    + F.softmax(self.model(images.flip(-1)), 1).flip(-1)
                ) / 2
            confidence, tta_prediction = probabilities.max(1)
            regions = maps.regions(config, self.label_set.class_names)
            for i, sample_id in enumerate(batch["sample_id"]):
                eem = maps.eem[i].cpu()
                row = int(batch["index"][i])
                if queried is None:
                    shown, area = regions[i], region_map(eem, regions[i])
                else:
                    shown = queried[sample_id]
                    labelled = self._labelled(rows, row, tuple(eem.shape))
                    area = queried_region_map(eem, labelled, shown)
                requests.append(
                    AnnotationRequest(
                        sample_id=sample_id,
                        image_path=rows["image_path"][row].as_py(),
                        label_path=rows["label_path"][row].as_py(),
                        prediction=maps.prediction[i].cpu().numpy().astype(np.uint8),
                        tta_prediction=tta_prediction[i].cpu().numpy().astype(np.uint8),
                        tta_confidence=confidence[i].cpu().numpy().astype(np.float32),
                        region_map=area,
                        regions=shown,
                        queried_regions_only=queried is not None,
                    )
                )
                if panel_dir is not None and len(requests) <= panels:
                    save_panel(
                        Path(panel_dir) / (file_name(sample_id) + ".png"),
                        images[i].cpu(),
                        maps.prediction[i].cpu(),
                        maps.entropy[i].cpu(),
                        maps.proximity[i].cpu(),
                        maps.proxgradcam[i].cpu(),
                        eem,
                        requests[-1].regions,
                        self.label_set,
                        title=sample_id,
                    )
        return Explained(requests, unreadable)


def images_done_bar(show: bool, total: int | None, desc: str):
    """A bar of images done on the driver (tqdm); when not ``show``n, one that counts silently."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="image", disable=not show)


def shards(table: pa.Table, count: int) -> list[pa.Table]:
    """``table`` cut into at most ``count`` contiguous, near-equal, non-empty slices."""
    count = max(1, min(count, len(table)))
    bounds = np.linspace(0, len(table), count + 1).astype(int)
    return [
        table.slice(start, stop - start)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True)
        if stop > start
    ]


class ScoringActor(PoolScorer):
    """A ``PoolScorer`` that (re)loads the model whenever a call brings a version it does not hold,
    so an actor restarted after a crash picks the current model up again by itself."""

    version: int | None = None

    def _ensure(self, version: int, model_box: list) -> None:
        if self.version != version:
            self.load_model(ray.get(model_box[0]))  # boxed so Ray does not copy it into every call
            self.version = version

    def score_with(
        self,
        version: int,
        model_box: list,
        rows: pa.Table,
        kind: ScoreKind,
        class_weights: Sequence[float] | None,
    ) -> pa.Table:
        self._ensure(version, model_box)
        return self.score(rows, kind, class_weights)

    def score_regions_with(
        self,
        version: int,
        model_box: list,
        rows: pa.Table,
        spec: RegionSpec,
        class_weights: Sequence[float] | None,
    ) -> pa.Table:
        self._ensure(version, model_box)
        return self.score_regions(rows, spec, class_weights)

    def explain_with(
        self,
        version: int,
        model_box: list,
        rows: pa.Table,
        kind: ScoreKind,
        panel_dir: str | None,
        panels: int,
        queried: Mapping[str, list[dict]] | None,
    ) -> Explained:
        self._ensure(version, model_box)
        return self.explain(rows, kind, panel_dir, panels, queried)


class ScorerPool:
    """``num_actors`` restartable scoring actors; a pass splits the rows into ``shards_per_actor`` shards
    per actor, hands them to the actors on demand (:func:`map_on_idle_actors`) and gathers one result per
    shard, in order. A crashed actor restarts and its shard is retried. With ``progress``, a bar on the
    driver counts the images scored."""

    def __init__(
        self,
        num_actors: int,
        scorer_args: dict,
        cpus: float = 1.0,
        gpus: float = 0.0,
        shards_per_actor: int = 8,
        progress: bool = False,
    ) -> None:
        actor = ray.remote(ScoringActor).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=-1
        )
        self.actors = [actor.remote(**scorer_args) for _ in range(num_actors)]
        self.shards_per_actor = shards_per_actor
        self.progress = progress
        self.version = 0
        self.model_box: list = []

    def wait_ready(self) -> None:
        """Until every actor is constructed (its process started, the depth model loaded)."""
        ray.get([actor.__ray_ready__.remote() for actor in self.actors])

    def load_model(self, checkpoint: dict) -> None:
        self.version += 1
        self.model_box = [ray.put(checkpoint)]

    def score(
        self,
        rows: pa.Table,
        kind: ScoreKind | RegionSpec,
        bar=None,
        class_weights: Sequence[float] | None = None,
    ) -> pa.Table:
        """``rows`` scored by the actors, in their order (``kind.schema``): a score kind per image, or
        a region spec per region; ``class_weights``: see :meth:`PoolScorer.score`."""
        parts = shards(rows, len(self.actors) * self.shards_per_actor)

        def submit(actor, part: pa.Table):
            call = actor.score_regions_with if isinstance(kind, RegionSpec) else actor.score_with
            return call.remote(self.version, self.model_box, part, kind, class_weights)

        def done(index: int) -> None:
            if bar is not None:
                bar.update(len(parts[index]))

        results = map_on_idle_actors(self.actors, parts, submit, on_done=done)
        return pa.concat_tables(results) if results else kind.schema.empty_table()

    def score_batches(
        self,
        batches: Iterable[pa.Table],
        kind: ScoreKind | RegionSpec,
        total: int | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> Iterator[pa.Table]:
        """Each batch of ``batches`` scored in turn (a pass holds one batch and its scores at a time),
        with one bar of images scored over them all; ``total``: the images expected, for the bar."""
        what = kind.value if isinstance(kind, ScoreKind) else f"{kind.source} regions"
        with images_done_bar(self.progress, total, f"scoring ({what})") as bar:
            for rows in batches:
                yield self.score(rows, kind, bar, class_weights)

    def explain(
        self,
        rows: pa.Table,
        kind: ScoreKind,
        panel_dir: str | None,
        panels: int,
        queried: Mapping[str, list[dict]] | None = None,
    ) -> Explained:
        """The selected ``rows`` explained on every actor, shards handed out on demand as scoring does;
        requests come back in the order of ``rows``, and the first ``panels`` rows get a panel."""
        parts = shards(rows, len(self.actors) * 2)
        starts = np.cumsum([0, *(len(part) for part in parts)])[:-1]

        def submit(actor, numbered: tuple[int, pa.Table]):
            start, part = numbered
            shard_panels = int(np.clip(panels - start, 0, len(part)))
            shard_queried = (
                None if queried is None else {i: queried[i] for i in part["sample_id"].to_pylist()}
            )
            return actor.explain_with.remote(
                self.version, self.model_box, part, kind, panel_dir, shard_panels, shard_queried
            )

        results = map_on_idle_actors(self.actors, list(zip(starts, parts, strict=True)), submit)
        return Explained(
            [request for result in results for request in result.requests],
            {sample_id: why for result in results for sample_id, why in result.unreadable.items()},
        )

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
