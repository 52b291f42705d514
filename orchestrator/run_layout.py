"""Every path under a run's folder (``runs/<name>/``), in one place.

config.yaml                       the run's configuration (what a resume reads)
progress.json                     the last completed cycle, its model, the MLflow run
pool_state.parquet (+ .sha256)    the live pool state; .prev.parquet: the previous good one
cycles/cycle_NN/                  per cycle: model.pt, the end-of-cycle pool_state.parquet, and the
                                  audit trail: candidates, scores, decisions, train/val manifests
panels/cycle_NN/*.png             EEM panels of the selected images
panels/cycle_NN_regions.json      their prompt regions
annotations/cycle_NN/*.png        accepted re-annotations, in the dataset's label encoding
labelstudio/cycle_NN/             a cycle handed over to people (orchestrator.labelstudio.handoff)
ray/cycle_NN/                     Ray Train's storage for the cycle's training
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "pool_state.parquet"


def cycle_name(cycle: int) -> str:
    return f"cycle_{cycle:02d}"


def file_name(sample_id: str) -> str:
    """A sample id (``<split>/<stem>``) as a flat file name."""
    return sample_id.replace("/", "__")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def overrides_file(self) -> Path:
        return self.root / "overrides.jsonl"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def progress_file(self) -> Path:
        return self.root / "progress.json"

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    def cycle_dir(self, cycle: int) -> Path:
        return self.root / "cycles" / cycle_name(cycle)

    def snapshot(self, cycle: int) -> Path:
        """The pool state at the end of ``cycle``: where a resumed run starts from."""
        return self.cycle_dir(cycle) / STATE_FILE

    def model(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "model.pt"

    def candidates(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "candidates.parquet"

    def scores(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "scores.parquet"

    def decisions(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "decisions.parquet"

    def train_manifest(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "train_manifest.parquet"

    def val_manifest(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "val_manifest.parquet"

    def panel_dir(self, cycle: int) -> Path:
        return self.root / "panels" / cycle_name(cycle)

    def regions_file(self, cycle: int) -> Path:
        return self.root / "panels" / f"{cycle_name(cycle)}_regions.json"

    def annotation(self, cycle: int, sample_id: str) -> Path:
        return self.root / "annotations" / cycle_name(cycle) / (file_name(sample_id) + ".png")

    def region_labels(self, cycle: int, sample_id: str) -> Path:
        """The image's region labels after ``cycle`` (al.unit region; segxal.data.region_labels)."""
        return self.root / "region_labels" / cycle_name(cycle) / (file_name(sample_id) + ".png")

    def labelstudio_dir(self, cycle: int) -> Path:
        return self.root / "labelstudio" / cycle_name(cycle)

    def ray_cycle(self, cycle: int) -> Path:
        return self.ray_storage / cycle_name(cycle)
