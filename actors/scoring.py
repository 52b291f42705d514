"""Pool scoring on Ray: actors that each load the segmenter and the depth model once and score
shards of D^S, returning ids and scalars (and embeddings for core-set) as Arrow; full maps, prompts
and panels only for the images sent to the oracle.

``PoolScorer`` is a plain class (tests call it directly); ``ScorerPool`` runs it as Ray actors that
restart after a crash and retry the shard they were working on, so a pass always scores every id once.
An image that cannot be read is not scored: it comes back with its reason in ``unreadable`` (scoring) or
in ``Explained.unreadable`` (explaining), for the coordinator to quarantine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from actors.dispatch import map_on_idle_actors
from orchestrator.coordinator import file_name
from orchestrator.loop import UNREADABLE, Explained
from orchestrator.oracles import AnnotationRequest
from orchestrator.strategies import Scorer, StrategySpec, get_strategy
from segxal.data.dataset import DataError, SampleTransform, SegmentationDataset
from segxal.data.labels import LABEL_SETS
from segxal.eem.config import EEMConfig
from segxal.eem.entropy import normalized_entropy
from segxal.eem.panels import save_panel
from segxal.eem.pipeline import score_batch
from segxal.eem.regions import region_map
from segxal.models.depth import build_depth_backend
from segxal.models.unet import UNet
from segxal.training import resolve_device

log = logging.getLogger(__name__)


def strategy_eem(config: EEMConfig, spec: StrategySpec) -> EEMConfig:
    """The EEM settings a strategy scores and explains with: the ablations zero one term; strategies
    outside the EEM pipeline still get the full EEM for their prompts."""
    if spec.scorer in (Scorer.EEM, Scorer.PAE, Scorer.EBU):
        alpha, beta = spec.eem_weights(config.alpha, config.beta)
        return dataclasses.replace(config, alpha=alpha, beta=beta)
    return config


class PoolScorer:
    def __init__(
        self,
        eem: EEMConfig,
        label_set: str,
        size: tuple[int, int] | None,
        batch_size: int,
        device: str = "auto",
    ) -> None:
        self.eem = eem
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
        """Batches of the readable rows, in order; each unreadable one goes into ``unreadable`` instead."""
        dataset = SegmentationDataset(
            rows, self.label_set, self.transform, load_depth=self.eem.depth.backend == "dataset"
        )
        samples = []
        for index in range(len(dataset)):
            try:
                samples.append(dataset[index])
            except DataError as error:
                sample_id = rows["sample_id"][index].as_py()
                log.warning("%s cannot be read and is left out: %s", sample_id, error)
                unreadable[sample_id] = str(error)
                continue
            if len(samples) == self.batch_size:
                yield default_collate(samples)
                samples = []
        if samples:
            yield default_collate(samples)

    def score(self, rows: pa.Table, strategy: str) -> pa.Table:
        """One row per input row: ``sample_id`` and ``score`` (higher = more informative), or
        ``embedding`` for core-set; the rows of unreadable images (last) have a reason in ``unreadable``
        and a null score or embedding."""
        if self.model is None:
            raise RuntimeError("load_model must be called before score")
        spec = get_strategy(strategy)
        config = strategy_eem(self.eem, spec)
        ids, scores, embeddings, unreadable = [], [], [], {}
        for batch in self._batches(rows, unreadable):
            images = batch["image"].to(self.device)
            ids.extend(batch["sample_id"])
            if spec.scorer is Scorer.EMBEDDING:
                with torch.no_grad():
                    embeddings.extend(self.model.embed(images).float().cpu().numpy())
            elif spec.scorer is Scorer.ENTROPY:
                with torch.no_grad():
                    scores.extend(
                        normalized_entropy(self.model(images)).mean(dim=(1, 2)).cpu().tolist()
                    )
            else:
                depth = batch.get("depth")
                result = score_batch(
                    self.model,
                    images,
                    config,
                    self.depth_backend,
                    None if depth is None else depth.to(self.device),
                )
                scores.extend(result.score.tolist())
        missing = [None] * len(unreadable)
        columns = {"sample_id": pa.array(ids + list(unreadable), pa.string())}
        if spec.scorer is Scorer.EMBEDDING:
            columns["embedding"] = pa.array(
                [e.tolist() for e in embeddings] + missing, pa.list_(pa.float32())
            )
        else:
            columns["score"] = pa.array(scores + missing, pa.float64())
        columns[UNREADABLE] = pa.array([None] * len(ids) + list(unreadable.values()), pa.string())
        return pa.table(columns)

    def explain(
        self, rows: pa.Table, strategy: str, panel_dir: str | None = None, panels: int = 0
    ) -> Explained:
        """Full EEM maps, prompts and flip-TTA predictions of the selected images; the first ``panels``
        also get a PNG panel in ``panel_dir``."""
        if self.model is None:
            raise RuntimeError("load_model must be called before explain")
        config = strategy_eem(self.eem, get_strategy(strategy))
        requests, unreadable = [], {}
        for batch in self._batches(rows, unreadable):
            images = batch["image"].to(self.device)
            depth = batch.get("depth")
            result = score_batch(
                self.model,
                images,
                config,
                self.depth_backend,
                None if depth is None else depth.to(self.device),
                return_maps=True,
            )
            maps = result.maps
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
                requests.append(
                    AnnotationRequest(
                        sample_id=sample_id,
                        image_path=rows["image_path"][row].as_py(),
                        label_path=rows["label_path"][row].as_py(),
                        prediction=maps.prediction[i].cpu().numpy().astype(np.uint8),
                        tta_prediction=tta_prediction[i].cpu().numpy().astype(np.uint8),
                        tta_confidence=confidence[i].cpu().numpy().astype(np.float32),
                        region_map=region_map(eem, regions[i], config.region_threshold),
                        regions=regions[i],
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
                        regions[i],
                        self.label_set,
                        title=sample_id,
                    )
        return Explained(requests, unreadable)


def images_done_bar(show: bool, total: int, desc: str):
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

    def score_with(self, version: int, model_box: list, rows: pa.Table, strategy: str) -> pa.Table:
        self._ensure(version, model_box)
        return self.score(rows, strategy)

    def explain_with(
        self,
        version: int,
        model_box: list,
        rows: pa.Table,
        strategy: str,
        panel_dir: str | None,
        panels: int,
    ) -> Explained:
        self._ensure(version, model_box)
        return self.explain(rows, strategy, panel_dir, panels)


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

    def load_model(self, checkpoint: dict) -> None:
        self.version += 1
        self.model_box = [ray.put(checkpoint)]

    def score(self, rows: pa.Table, strategy: str) -> pa.Table:
        parts = shards(rows, len(self.actors) * self.shards_per_actor)

        def submit(actor, part: pa.Table):
            return actor.score_with.remote(self.version, self.model_box, part, strategy)

        with images_done_bar(self.progress, len(rows), f"scoring ({strategy})") as bar:
            results = map_on_idle_actors(
                self.actors, parts, submit, on_done=lambda i: bar.update(len(parts[i]))
            )
        return (
            pa.concat_tables(results)
            if results
            else pa.table({"sample_id": pa.array([], pa.string())})
        )

    def explain(
        self, rows: pa.Table, strategy: str, panel_dir: str | None, panels: int
    ) -> Explained:
        return ray.get(
            self.actors[0].explain_with.remote(
                self.version, self.model_box, rows, strategy, panel_dir, panels
            )
        )

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
