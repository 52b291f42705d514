"""How far fine-tuned PEBAL beats the energy baseline on the synthetic anomaly set, across seeds.

The recipe of ``tests/test_pebal_train.py`` (a width-8 U-Net trained 30 epochs on the tiny 12-image
synthetic set, PEBAL fine-tuned 20 epochs on its last block), run in-process, once per seed. It prints
each seed's AP of PEBAL and of the raw energy on the synthetic anomaly benchmark and on the AnomalyMix'd
validation set, so that what the test asserts rests on a margin measured across seeds and CPU kernels.

    PYTHONPATH=. .venv/bin/python bench/pebal_synthetic_margin.py --seeds 0 1 2 3 4
    # the AVX2 kernels on a CPU that has more (what the development machines run):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PYTHONPATH=. ...
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from segxal.data.anomaly import anomaly_benchmark
from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SampleTransform, SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.data.synthetic import SyntheticConfig, generate_synthetic
from segxal.models.unet import UNet, UNetConfig
from segxal.pebal.anomalymix import AnomalyMix
from segxal.pebal.config import AnomalyMixConfig, FinetuneConfig, PebalConfig
from segxal.pebal.evaluate import ORIGINAL, PEBAL, MixedValidationSet, evaluate_anomaly
from segxal.pebal.model import prepare_pebal_model
from segxal.training import TrainConfig, fit, make_optimizer

SIZE = (64, 128)
DATA = SyntheticConfig(
    num_train=12, num_val=4, num_anomaly=4, height=64, width=128, seed=7, workers=1
)


@torch.no_grad()
def energy_gap(model: UNet, dataset, abstention: bool = False) -> float:
    """Mean free energy of the pasted (anomaly) pixels minus that of the inlier pixels."""
    energies, labels = [], []
    for batch in DataLoader(dataset, batch_size=4):
        logits = model(batch["image"])
        logits = logits[:, :-1] if abstention else logits
        energies.append(-torch.logsumexp(logits, 1).flatten())
        labels.append(batch["label"].flatten())
    energy, label = torch.cat(energies), torch.cat(labels)
    return float(energy[label == 1].mean() - energy[label == 0].mean())


def run_seed(root: Path, seed: int, pebal_epochs: int) -> dict[str, float]:
    from actors.pebal_train import pebal_train_epoch

    train = SegmentationDataset(
        cityscapes_manifest(root, "train"), CITYSCAPES, SampleTransform(SIZE, augment=True)
    )
    val = SegmentationDataset(cityscapes_manifest(root, "val"), CITYSCAPES, SampleTransform(SIZE))
    torch.manual_seed(seed)
    pretrained = UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=8, depth=3))
    fit(
        pretrained,
        DataLoader(
            train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
        ),
        DataLoader(val, batch_size=4),
        TrainConfig(epochs=30, batch_size=4, lr=0.01, device="cpu"),
        CITYSCAPES.class_names,
    )
    pretrained.eval()
    config = PebalConfig(
        m_in=-4.0,
        m_out=-2.0,
        lam=1.0,
        trainable=("decoder.2", "head"),
        anomalymix=AnomalyMixConfig(fraction=1.0),
        finetune=FinetuneConfig(epochs=pebal_epochs, batch_size=4, lr=1e-2),
    )
    torch.manual_seed(seed)
    model = prepare_pebal_model(pretrained, config.trainable)
    optimizer = make_optimizer(model.parameters(), config.finetune)
    loader = DataLoader(
        train,
        batch_size=4,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    mixer = AnomalyMix(config.anomalymix, CITYSCAPES.num_classes)
    losses = []
    for epoch in range(pebal_epochs):
        stats = pebal_train_epoch(
            model,
            loader,
            optimizer,
            mixer,
            config,
            np.random.default_rng([seed, 0, epoch]),
            torch.device("cpu"),
            epoch,
        )
        losses.append(stats["loss"])
    model.eval()
    benchmark = anomaly_benchmark(root / "anomaly")
    models = {PEBAL: model, ORIGINAL: pretrained}
    synthetic = evaluate_anomaly(
        models, benchmark.dataset(SampleTransform(SIZE)), benchmark.name
    ).metrics
    mixed = evaluate_anomaly(
        models, MixedValidationSet(val, config.anomalymix, CITYSCAPES.num_classes, seed=0), "mixed"
    ).metrics
    mixed_set = MixedValidationSet(val, config.anomalymix, CITYSCAPES.num_classes, seed=0)
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "gap_before": energy_gap(pretrained, mixed_set),
        "gap_after": energy_gap(model, mixed_set, abstention=True),
        "synthetic_pebal_ap": synthetic[PEBAL]["ap"],
        "synthetic_energy_ap": synthetic["energy"]["ap"],
        "synthetic_pebal_auroc": synthetic[PEBAL]["auroc"],
        "synthetic_energy_auroc": synthetic["energy"]["auroc"],
        "mixed_pebal_ap": mixed[PEBAL]["ap"],
        "mixed_energy_ap": mixed["energy"]["ap"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pebal-epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels = (
        os.environ.get("ATEN_CPU_CAPABILITY", "default")
        + f" ({torch.backends.cpu.get_cpu_capability()})"
    )
    print(f"kernels: {kernels}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as folder:
        root = generate_synthetic(Path(folder), DATA)
        rows = []
        for seed in args.seeds:
            row = run_seed(root, seed, args.pebal_epochs)
            rows.append(row)
            print(f"seed {seed}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    for key in rows[0]:
        values = np.array([r[key] for r in rows])
        print(f"{key}: min {values.min():.4f} mean {values.mean():.4f} max {values.max():.4f}")
    ratio = np.array([r["mixed_pebal_ap"] / r["mixed_energy_ap"] for r in rows])
    print(f"mixed AP ratio pebal/energy: min {ratio.min():.2f} mean {ratio.mean():.2f}")


if __name__ == "__main__":
    main()
