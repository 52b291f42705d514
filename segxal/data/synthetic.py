"""Procedural driving scenes written in the Cityscapes layout, with ground-truth depth.

A pinhole camera at height ``cam_h`` looks along a straight road. Every surface is placed in metres
and projected, and a z-buffer keeps the nearest surface per pixel, so labels, image and depth agree
by construction: the road and sidewalks in perspective, building facades with windows, trees,
fences, poles with signs and traffic lights, cars in lanes and parked, pedestrians on the sidewalks,
with texture noise, lighting, shadows and distance haze. Depth is written as Cityscapes disparity
(``baseline * fx / Z``) with the camera in ``camera/<split>/<city>/<stem>_camera.json``.

The anomaly split (Fishyscapes convention, ``anomaly/original`` and ``anomaly/labels``: 0 inlier,
1 anomaly, 255 void) puts objects of no inlier class on the road.

Each image depends only on (seed, split, index), so generation is deterministic and parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segxal.data.io import write_disparity
from segxal.data.labels import CITYSCAPES_LABEL_IDS

CITY = "synthetic"
BASELINE_M = 0.209313  # Cityscapes stereo baseline
SPLITS = ("train", "val", "anomaly")
MARKER = "synthetic.json"
GENERATOR_VERSION = 2  # bump when the output changes, so datasets on disk are regenerated
ID = {name: raw for name, (raw, _) in CITYSCAPES_LABEL_IDS.items()}


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int = 160
    num_val: int = 40
    num_anomaly: int = 20
    height: int = 256
    width: int = 512
    seed: int = 0
    workers: int = 0  # processes; 0 = all cores

    def __post_init__(self) -> None:
        if self.height < 32 or self.width < 32:
            raise ValueError(
                f"synthetic scenes need at least 32x32 pixels, got {self.height}x{self.width}"
            )
        for field in ("num_train", "num_val", "num_anomaly"):
            if getattr(self, field) < 0:
                raise ValueError(f"SyntheticConfig.{field} must be >= 0")


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    label_ids: np.ndarray  # (H, W) uint8 Cityscapes label ids
    depth: np.ndarray  # (H, W) float32 metres, inf for sky
    anomaly: np.ndarray  # (H, W) bool
    camera: dict


class _Canvas:
    """Colour, label and depth buffers; ``paint`` keeps the nearer surface per pixel."""

    def __init__(self, height: int, width: int) -> None:
        self.color = np.zeros((height, width, 3), np.float32)
        self.label = np.zeros((height, width), np.uint8)
        self.depth = np.full((height, width), np.inf, np.float32)
        self.anomaly = np.zeros((height, width), bool)

    def paint(self, mask, depth, label_id: int, color, anomaly: bool = False) -> None:
        depth = np.broadcast_to(np.asarray(depth, np.float32), mask.shape)
        visible = mask & (depth < self.depth)
        self.depth[visible] = depth[visible]
        self.label[visible] = label_id
        self.color[visible] = np.broadcast_to(color, (*mask.shape, 3))[visible]
        self.anomaly[visible] = anomaly


class _Renderer:
    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.rng = rng
        self.h, self.w = height, width
        self.f = width * rng.uniform(0.75, 0.95)
        self.horizon = height * rng.uniform(0.38, 0.48)
        self.vx = width * (0.5 + rng.uniform(-0.06, 0.06))
        self.cam_h = rng.uniform(1.3, 1.7)
        self.rows, self.cols = np.mgrid[0:height, 0:width].astype(np.float32)
        self.canvas = _Canvas(height, width)
        self.road_half = rng.uniform(3.5, 7.0)
        self.sidewalk = rng.uniform(1.5, 4.0)

    # -- projection helpers -------------------------------------------------------------------
    def ground_row(self, z):
        return self.horizon + self.f * self.cam_h / z

    def row_of_height(self, z, metres):
        return self.horizon - self.f * (metres - self.cam_h) / z

    def col_of(self, x, z):
        return self.vx + self.f * x / z

    def texture(self, base, noise=8.0, blotch=0.15, scale=16):
        """Base colour with per-pixel noise and low-frequency multiplicative blotches."""
        rng = self.rng
        grid = rng.uniform(
            1 - blotch, 1 + blotch, (max(2, self.h // scale), max(2, self.w // scale), 1)
        )
        low = (
            np.asarray(
                Image.fromarray((grid[..., 0] * 127).astype(np.uint8)).resize(
                    (self.w, self.h), Image.Resampling.BILINEAR
                ),
                np.float32,
            )[..., None]
            / 127
        )
        jitter = np.asarray(base, np.float32) * rng.uniform(0.85, 1.15, 3)
        return jitter * low + rng.normal(0, noise, (self.h, self.w, 3)).astype(np.float32)

    def box(self, x_center, z, width_m, bottom_m, top_m, extra_mask=None):
        """Pixel mask of a fronto-parallel rectangle at depth z."""
        c0, c1 = self.col_of(x_center - width_m / 2, z), self.col_of(x_center + width_m / 2, z)
        r_top, r_bot = self.row_of_height(z, top_m), self.row_of_height(z, bottom_m)
        if c1 - c0 < 1:  # keep thin far objects at least one pixel wide
            c0, c1 = (c0 + c1) / 2 - 0.5, (c0 + c1) / 2 + 0.5
        mask = (self.cols >= c0) & (self.cols < c1) & (self.rows >= r_top) & (self.rows < r_bot)
        return mask if extra_mask is None else mask & extra_mask

    def ellipse(self, x_center, z, height_center_m, radius_x_m, radius_y_m):
        cx, cy = self.col_of(x_center, z), self.row_of_height(z, height_center_m)
        rx, ry = max(self.f * radius_x_m / z, 0.7), max(self.f * radius_y_m / z, 0.7)
        return ((self.cols - cx) / rx) ** 2 + ((self.rows - cy) / ry) ** 2 <= 1

    # -- scene parts ----------------------------------------------------------------------------
    def sky(self):
        rng = self.rng
        top, bottom = (
            rng.uniform([40, 90, 150], [110, 160, 230]),
            rng.uniform([150, 180, 200], [230, 235, 250]),
        )
        t = np.clip(self.rows / max(self.horizon, 1), 0, 1)[..., None]
        color = top * (1 - t) + bottom * t + rng.normal(0, 2, (self.h, self.w, 3))
        self.sky_color = bottom
        self.canvas.color[:] = color  # the background: infinitely far, so not through the z-test
        self.canvas.label[:] = ID["sky"]

    def ground(self):
        below = self.rows > self.horizon + 0.5
        z = np.where(below, self.f * self.cam_h / np.maximum(self.rows - self.horizon, 0.5), np.inf)
        x = (self.cols - self.vx) * z / self.f
        ax = np.abs(x)
        road = below & (ax < self.road_half)
        sidewalk = below & (ax >= self.road_half) & (ax < self.road_half + self.sidewalk)
        terrain = below & ~road & ~sidewalk
        asphalt = self.texture(self.rng.uniform([60, 60, 60], [110, 105, 110]), noise=7, blotch=0.2)
        marking = ((np.abs(x) < 0.08) & (np.mod(z, 9.0) < 4.0)) | (
            np.abs(ax - (self.road_half - 0.25)) < 0.08
        )
        asphalt[marking & road] = self.rng.uniform(200, 240)
        self.canvas.paint(road, z, ID["road"], asphalt)
        self.canvas.paint(
            sidewalk,
            z,
            ID["sidewalk"],
            self.texture(self.rng.uniform([150, 120, 130], [200, 170, 190]), noise=6, scale=8),
        )
        self.canvas.paint(
            terrain,
            z,
            ID["terrain"],
            self.texture(self.rng.uniform([90, 140, 60], [140, 190, 100]), noise=12, scale=6),
        )
        self.ground_x, self.ground_z = x, z

    def roadside(self):
        """Facades, trees and fences on planes parallel to the road, in segments along its length."""
        rng = self.rng
        for side in (-1, 1):
            x_plane = side * (self.road_half + self.sidewalk + rng.uniform(0.0, 3.0))
            du = (self.cols - self.vx) * side
            z_col = np.where(du > 0.5, self.f * abs(x_plane) / np.maximum(du, 0.5), np.inf)
            z = rng.uniform(2.0, 8.0)
            while z < 250:
                length = rng.uniform(8, 35)
                kind = rng.choice(
                    ["building", "vegetation", "fence", "gap"], p=[0.5, 0.25, 0.1, 0.15]
                )
                span = (z_col >= z) & (z_col < z + length)
                if kind == "building":
                    self._facade(span, z_col, rng.uniform(6, 30), x_plane)
                elif kind == "vegetation":
                    self._trees(span, z_col, rng.uniform(4, 12))
                elif kind == "fence":
                    self._fence(span, z_col)
                z += length + (rng.uniform(1, 10) if kind != "gap" else 0)

    def _vertical_span(self, span, z_col, top_m, bottom_m=0.0):
        top = self.row_of_height(z_col, top_m)
        bottom = self.row_of_height(z_col, bottom_m)
        return span & (self.rows >= top) & (self.rows < bottom)

    def _facade(self, span, z_col, height_m, x_plane):
        rng = self.rng
        mask = self._vertical_span(span, z_col, height_m)
        color = self.texture(rng.uniform([70, 60, 55], [190, 170, 160]), noise=5, blotch=0.08)
        storey, bay = rng.uniform(2.8, 3.6), rng.uniform(2.5, 4.5)
        height_px = self.cam_h + (self.horizon - self.rows) * z_col / self.f
        windows = (
            (np.mod(height_px, storey) > storey * 0.35)
            & (np.mod(z_col, bay) < bay * 0.55)
            & (height_px > 2.5)
        )
        color[windows] = color[windows] * 0.35 + rng.uniform(20, 60)
        self.canvas.paint(mask, z_col, ID["building"], color)

    def _trees(self, span, z_col, height_m):
        rng = self.rng
        raw_noise = rng.uniform(0.6, 1.0, self.w).astype(np.float32)
        top_noise = np.convolve(raw_noise, np.ones(9) / 9, mode="same")
        mask = self._vertical_span(span, z_col, height_m * top_noise[None, :]) & (
            self.rows < self.row_of_height(z_col, 0.0)
        )
        color = self.texture(
            rng.uniform([40, 80, 20], [90, 140, 60]), noise=18, blotch=0.3, scale=4
        )
        self.canvas.paint(mask, z_col, ID["vegetation"], color)

    def _fence(self, span, z_col):
        mask = self._vertical_span(span, z_col, self.rng.uniform(1.0, 2.0))
        color = self.texture(self.rng.uniform([120, 100, 90], [190, 160, 150]), noise=6)
        color[np.mod(self.cols, 6) < 2] *= 0.6
        self.canvas.paint(mask, z_col, ID["fence"], color)

    def poles(self):
        rng = self.rng
        for side in (-1, 1):
            x = side * (self.road_half + 0.4)
            z = rng.uniform(5, 20)
            while z < 90:
                height = rng.uniform(3.5, 6.5)
                self.canvas.paint(
                    self.box(x, z, 0.15, 0.0, height),
                    z,
                    ID["pole"],
                    np.array(rng.uniform(110, 170, 3), np.float32),
                )
                roll = rng.uniform()
                if roll < 0.45:
                    sign = (
                        self.box(x, z - 0.05, 0.7, height - 0.8, height)
                        if rng.uniform() < 0.5
                        else self.ellipse(x, z - 0.05, height - 0.4, 0.38, 0.38)
                    )
                    color = np.array(
                        [[230, 30, 30], [30, 60, 200], [240, 220, 20]][rng.integers(3)], np.float32
                    )
                    self.canvas.paint(sign, z - 0.05, ID["traffic sign"], color)
                elif roll < 0.65:
                    housing = self.box(x, z - 0.05, 0.35, height - 1.0, height)
                    self.canvas.paint(
                        housing, z - 0.05, ID["traffic light"], np.array([30, 30, 30], np.float32)
                    )
                    lamp = self.ellipse(x, z - 0.06, height - rng.choice([0.2, 0.5, 0.8]), 0.1, 0.1)
                    self.canvas.paint(
                        lamp,
                        z - 0.06,
                        ID["traffic light"],
                        np.array(
                            [[255, 40, 40], [255, 200, 0], [40, 255, 80]][rng.integers(3)],
                            np.float32,
                        ),
                    )
                z += rng.uniform(12, 35)

    def cars(self):
        rng = self.rng
        lanes = [
            -self.road_half / 2,
            self.road_half / 2,
            -(self.road_half - 1.1),
            self.road_half - 1.1,
        ]
        for _ in range(rng.integers(0, 7)):
            x = rng.choice(lanes) + rng.uniform(-0.4, 0.4)
            z = rng.uniform(4.0, 70.0)
            width, height = rng.uniform(1.6, 2.0), rng.uniform(1.35, 1.8)
            body_color = np.array(rng.uniform(20, 235, 3), np.float32)
            body = self.box(x, z, width, 0.25, height * 0.6) | self.box(
                x, z, width * 0.85, height * 0.6, height
            )
            color = np.broadcast_to(body_color, (self.h, self.w, 3)).copy() + rng.normal(
                0, 4, (self.h, self.w, 3)
            )
            glass = self.box(x, z, width * 0.75, height * 0.63, height * 0.95)
            color[glass] = rng.uniform(20, 60)
            wheels = self.box(x - width * 0.35, z, 0.4, 0.0, 0.45) | self.box(
                x + width * 0.35, z, 0.4, 0.0, 0.45
            )
            color[wheels] = 15
            lights = self.box(x - width * 0.4, z, 0.2, 0.7, 0.85) | self.box(
                x + width * 0.4, z, 0.2, 0.7, 0.85
            )
            color[lights] = (200, 20, 20)
            shadow = (
                (self.ground_z > z - 0.5)
                & (self.ground_z < z + 3.5)
                & (np.abs(self.ground_x - x) < width * 0.55)
            )
            shadow &= self.canvas.label == ID["road"]
            self.canvas.color[shadow] *= 0.55
            self.canvas.paint(body | wheels, z, ID["car"], color)

    def pedestrians(self):
        rng = self.rng
        for _ in range(rng.integers(0, 5)):
            side = rng.choice([-1, 1])
            x = side * (self.road_half + rng.uniform(0.5, max(self.sidewalk - 0.3, 0.6)))
            z = rng.uniform(4.0, 40.0)
            height = rng.uniform(1.5, 1.9)
            legs = self.box(x - 0.12, z, 0.16, 0.0, height * 0.47) | self.box(
                x + 0.12, z, 0.16, 0.0, height * 0.47
            )
            torso = self.box(x, z, 0.48, height * 0.45, height * 0.85)
            head = self.ellipse(x, z, height * 0.92, 0.11, 0.13)
            color = np.empty((self.h, self.w, 3), np.float32)
            color[:] = rng.uniform(10, 120, 3)
            color[torso] = rng.uniform(30, 240, 3)
            color[head] = rng.uniform([150, 100, 80], [240, 190, 160])
            self.canvas.paint(legs | torso | head, z, ID["person"], color)

    def anomalies(self):
        """Objects of no inlier class on the road: boxes, blobs and irregular shapes in odd colours."""
        rng = self.rng
        for _ in range(rng.integers(1, 4)):
            z = rng.uniform(5.0, 35.0)
            x = rng.uniform(-self.road_half * 0.7, self.road_half * 0.7)
            size = rng.uniform(0.35, 1.3)
            shape = rng.integers(3)
            if shape == 0:
                mask = self.box(x, z, size, 0.0, size * rng.uniform(0.5, 1.2))
            elif shape == 1:
                mask = self.ellipse(x, z, size * 0.45, size * 0.6, size * 0.45)
            else:
                cx, cy = self.col_of(x, z), self.row_of_height(z, size * 0.4)
                angle = np.arctan2(self.rows - cy, self.cols - cx)
                radius = (
                    self.f * size * 0.5 / z * (1 + 0.35 * np.sin(3 * angle + rng.uniform(0, 6)))
                )
                mask = np.hypot(self.rows - cy, self.cols - cx) <= radius
            mask &= self.rows <= self.ground_row(z)
            color = np.empty((self.h, self.w, 3), np.float32)
            color[:] = [[240, 20, 200], [20, 230, 230], [255, 140, 0], [140, 255, 20]][
                rng.integers(4)
            ]
            if rng.uniform() < 0.5:
                color[(np.floor(self.cols / 4) + np.floor(self.rows / 4)) % 2 == 0] = rng.uniform(
                    0, 255, 3
                )
            self.canvas.paint(mask, z, ID["dynamic"], color, anomaly=True)

    def ego_vehicle(self):
        if self.rng.uniform() < 0.5:
            return
        band = self.h * self.rng.uniform(0.05, 0.1)
        curve = band * (1 - ((self.cols - self.w / 2) / (self.w / 2)) ** 2 * 0.5)
        mask = self.rows >= self.h - curve
        self.canvas.paint(
            mask, 1.0, ID["ego vehicle"], self.texture(self.rng.uniform(10, 60, 3), noise=3)
        )

    def finish(self) -> np.ndarray:
        rng = self.rng
        color = self.canvas.color
        visibility = rng.uniform(80, 400)
        haze = np.exp(-np.minimum(self.canvas.depth, 1e4) / visibility)[..., None]
        color = color * haze + self.sky_color * (1 - haze)
        sun = 1 + rng.uniform(-0.25, 0.25) * (self.cols / self.w - 0.5)[..., None]
        tint = rng.uniform(0.9, 1.1, 3)
        color = color * sun * tint * rng.uniform(0.6, 1.25) + rng.uniform(-15, 15)
        return np.clip(color, 0, 255).astype(np.uint8)

    def camera(self) -> dict:
        return {
            "extrinsic": {
                "baseline": BASELINE_M,
                "x": 0.0,
                "y": 0.0,
                "z": self.cam_h,
                "pitch": 0.0,
                "roll": 0.0,
                "yaw": 0.0,
            },
            "intrinsic": {"fx": self.f, "fy": self.f, "u0": self.vx, "v0": self.horizon},
        }


def render_scene(seed: int, split: str, index: int, height: int, width: int) -> Scene:
    """One scene; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    renderer = _Renderer(rng, height, width)
    with np.errstate(invalid="ignore"):  # sky pixels carry infinite depth through the maths
        renderer.sky()
        renderer.ground()
        renderer.roadside()
        renderer.poles()
        renderer.cars()
        renderer.pedestrians()
        if split == "anomaly":
            renderer.anomalies()
        renderer.ego_vehicle()
        image = renderer.finish()
    canvas = renderer.canvas
    return Scene(image, canvas.label, canvas.depth, canvas.anomaly, renderer.camera())


def scene_stem(split: str, index: int) -> str:
    return f"{CITY}_{SPLITS.index(split):06d}_{index:06d}"


def _write_scene(root: Path, seed: int, split: str, index: int, height: int, width: int) -> None:
    scene = render_scene(seed, split, index, height, width)
    stem = scene_stem(split, index)
    if split == "anomaly":
        label = np.where(scene.anomaly, 1, 0).astype(np.uint8)
        label[scene.label_ids == ID["ego vehicle"]] = 255
        Image.fromarray(scene.image).save(root / "anomaly" / "original" / f"{stem}.png")
        Image.fromarray(label).save(root / "anomaly" / "labels" / f"{stem}.png")
        return
    Image.fromarray(scene.image).save(
        root / "leftImg8bit" / split / CITY / f"{stem}_leftImg8bit.png"
    )
    Image.fromarray(scene.label_ids).save(
        root / "gtFine" / split / CITY / f"{stem}_gtFine_labelIds.png"
    )
    disparity = BASELINE_M * scene.camera["intrinsic"]["fx"] / scene.depth
    disparity[scene.label_ids == ID["ego vehicle"]] = (
        0  # unknown, as stereo gives nothing usable on the hood
    )
    write_disparity(root / "disparity" / split / CITY / f"{stem}_disparity.png", disparity)
    (root / "camera" / split / CITY / f"{stem}_camera.json").write_text(json.dumps(scene.camera))


def _write_job(job: tuple) -> None:
    _write_scene(*job)


def generate_synthetic(
    root: str | Path, config: SyntheticConfig = SyntheticConfig(), progress: bool = False
) -> Path:
    """Write the dataset under ``root`` unless a marker says it was already written with ``config``.

    The marker is written last, so an interrupted generation is redone on the next call.
    """
    root = Path(root)
    marker = root / MARKER
    settings = {
        "generator_version": GENERATOR_VERSION,
        **{k: v for k, v in asdict(config).items() if k != "workers"},
    }
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    for split in ("train", "val"):
        for top in ("leftImg8bit", "gtFine", "disparity", "camera"):
            (root / top / split / CITY).mkdir(parents=True, exist_ok=True)
    for sub in ("original", "labels"):
        (root / "anomaly" / sub).mkdir(parents=True, exist_ok=True)
    jobs = [
        (root, config.seed, split, index, config.height, config.width)
        for split, count in zip(
            SPLITS, (config.num_train, config.num_val, config.num_anomaly), strict=True
        )
        for index in range(count)
    ]
    workers = min(config.workers or os.cpu_count() or 1, max(len(jobs), 1))
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as executor:
        results = executor.map(_write_job, jobs, chunksize=4) if executor else map(_write_job, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="synthetic scenes", unit="img")
        for _ in results:
            pass
    marker.write_text(json.dumps(settings))
    return root
