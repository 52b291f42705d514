"""EEM scoring throughput: batched ``score_batch`` against the peer a user would pick (a captum
``LayerGradCam`` loop) and against a hand-written full-backward loop, same run.

    python bench/eem_throughput.py [--size 256 512] [--width 16] [--depth 4] [--batch-sizes 1 2 4 8 16] [--rounds 2]
                                   [--precision fp32|bf16] [--device cpu|cuda]

- ``captum``: the usual captum recipe for segmentation, per batch of the same size, parameters frozen: a
  no-grad forward (prediction, entropy), then ``LayerGradCam`` on the depth-informed image with a region
  target (the summed logits of the predicted class over the near region), upsampled, gated and fused as
  the EEM does.
- ``full_backward_loop``: per image, hooks on the target layer and ``backward()`` of the near-region
  score through every parameter of the network (what a hand-rolled Grad-CAM does; no library does it).
- ``score_batch``: one forward and one backward per batch that stops at the target layer.

All score the same images (synthetic scenes with their disparity, the ``dataset`` depth backend) and must
agree: to 1e-4 in fp32, to 2e-2 with ``--precision bf16`` (``score_batch`` then runs the segmenter under
bfloat16 autocast; the peers stay fp32), and the bench reports whether the images rank in the same order.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from segxal.data.cityscapes import cityscapes_manifest
from segxal.data.dataset import SegmentationDataset
from segxal.data.labels import CITYSCAPES
from segxal.data.synthetic import SyntheticConfig, generate_synthetic
from segxal.eem.config import EEMConfig
from segxal.eem.entropy import normalized_entropy
from segxal.eem.fusion import fuse_eem, image_scores
from segxal.eem.pipeline import score_batch
from segxal.eem.proximity import depth_informed_image, near_region
from segxal.models.depth import DatasetDepth
from segxal.models.unet import UNet, UNetConfig


def first_pass(model: UNet, image, depth, config: EEMConfig):
    """What every method computes before Grad-CAM: logits, entropy, prediction, proximity, near."""
    with torch.no_grad():
        logits = model(image)
    proximity = DatasetDepth().proximity(image, depth)
    near = near_region(proximity, config.threshold, config.quantile, config.fixed, config.otsu_bins)
    return logits, normalized_entropy(logits), logits.argmax(1), proximity, near


def _gated_eem(cam, near, entropy, config: EEMConfig, image_size, multiple: int) -> torch.Tensor:
    """Image scores from a raw (B, h, w) Grad-CAM at the target layer, as the EEM builds them."""
    height, width = image_size
    padded = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    cam = F.interpolate(cam[:, None], size=padded, mode="bilinear", align_corners=False)[
        :, 0, :height, :width
    ]
    peak = cam.clamp(min=0).amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)
    cam = cam.clamp(min=0) / peak * near  # gate_cam
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)
    return image_scores(
        fuse_eem(cam, entropy, config.alpha, config.beta), config.reduction, config.topk_percent
    )


def captum_scores(
    model: UNet, images, disparity, config: EEMConfig, batch_size: int
) -> torch.Tensor:
    """EEM scores with captum's ``LayerGradCam`` on the depth-informed images, a batch at a time, the
    parameters frozen as a user who only explains would (autograd then records no weight gradients:
    about 10 % faster than leaving them trainable)."""
    from captum.attr import LayerGradCam

    model.requires_grad_(False)
    layer = model.layer(model.last_decoder_layer)
    scores = []
    for i in range(0, images.shape[0], batch_size):
        image, depth = images[i : i + batch_size], disparity[i : i + batch_size]
        logits, entropy, prediction, proximity, near = first_pass(model, image, depth, config)
        target = F.one_hot(prediction, logits.shape[1]).permute(0, 3, 1, 2) * near[:, None]

        def region_score(x, target=target):
            return (model(x) * target).sum(dim=(1, 2, 3))

        informed = depth_informed_image(image, proximity, near, config.mask)
        cam = LayerGradCam(region_score, layer).attribute(informed, relu_attributions=True)[:, 0]
        scores.append(
            _gated_eem(cam.detach(), near, entropy, config, image.shape[-2:], 2**model.config.depth)
        )
    model.requires_grad_(True)
    return torch.cat(scores)


def full_backward_loop_scores(
    model: UNet, images: torch.Tensor, disparity: torch.Tensor, config: EEMConfig
) -> torch.Tensor:
    """Per-image EEM scores, one image at a time, Grad-CAM by hooks and a full backward."""
    layer = model.layer(model.last_decoder_layer)
    multiple = 2**model.config.depth
    scores = []
    for index in range(images.shape[0]):
        image, depth = images[index : index + 1], disparity[index : index + 1]
        logits, entropy, prediction, proximity, near = first_pass(model, image, depth, config)
        informed = depth_informed_image(image, proximity, near, config.mask)
        saved = {}

        def keep(module, inputs, output, saved=saved):
            saved["activation"] = output
            output.register_hook(lambda grad, saved=saved: saved.update(gradient=grad))

        hook = layer.register_forward_hook(keep)
        try:
            logits = model(informed)
            target = F.one_hot(prediction, logits.shape[1]).permute(0, 3, 1, 2) * near[:, None]
            (logits * target).sum().backward()
        finally:
            hook.remove()
        model.zero_grad(set_to_none=True)
        activation, gradient = saved["activation"].detach(), saved["gradient"]
        cam = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(1))
        scores.append(_gated_eem(cam, near, entropy, config, image.shape[-2:], multiple))
    return torch.cat(scores)


def batched_scores(
    model: UNet, images, disparity, config: EEMConfig, batch_size: int
) -> torch.Tensor:
    backend = DatasetDepth()
    return torch.cat(
        [
            score_batch(
                model, images[i : i + batch_size], config, backend, disparity[i : i + batch_size]
            ).score
            for i in range(0, images.shape[0], batch_size)
        ]
    )


def best_times(functions: dict, rounds: int) -> tuple[dict, dict, dict]:
    """Best wall and CPU (process) time of each function over ``rounds`` interleaved rounds, so a busy
    shared machine slows every candidate alike, and each function's last result. CPU time is the steadier
    figure on a loaded machine, wall time the one a user waits for."""
    wall = {name: float("inf") for name in functions}
    cpu = dict(wall)
    results = {}
    for _ in range(rounds):
        for name, function in functions.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            results[name] = function()
            wall[name] = min(wall[name], time.perf_counter() - start_wall)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return wall, cpu, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--images", type=int, default=16, help="images scored per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=(1, 2, 4, 8, 16))
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved timing rounds; the best counts"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="EEMConfig.precision of the batched path (fp16: CUDA only)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    height, width = args.size
    with tempfile.TemporaryDirectory() as root:
        generate_synthetic(
            root,
            SyntheticConfig(
                num_train=args.images,
                num_val=0,
                num_anomaly=0,
                height=height,
                width=width,
                workers=1,
            ),
        )
        dataset = SegmentationDataset(
            cityscapes_manifest(root, "train"), CITYSCAPES, load_depth=True
        )
        items = [dataset[i] for i in range(len(dataset))]
    device = torch.device(args.device)
    images = torch.stack([item["image"] for item in items]).to(device)
    disparity = torch.stack([item["depth"] for item in items]).to(device)
    torch.manual_seed(0)
    model = (
        UNet(UNetConfig(num_classes=CITYSCAPES.num_classes, width=args.width, depth=args.depth))
        .eval()
        .to(device)
    )
    config = EEMConfig()
    batched_config = EEMConfig(precision=args.precision)
    tolerance = 1e-4 if args.precision == "fp32" else 2e-2
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    functions = {
        "full_backward_loop": lambda: full_backward_loop_scores(model, images, disparity, config)
    }
    for batch_size in args.batch_sizes:
        functions[f"captum_{batch_size}"] = lambda b=batch_size: captum_scores(
            model, images, disparity, config, b
        )
        functions[batch_size] = lambda b=batch_size: batched_scores(
            model, images, disparity, batched_config, b
        )
    wall, cpu, scores = best_times(
        {name: (lambda f=f: (f(), synchronize())[0]) for name, f in functions.items()}, args.rounds
    )
    reference = scores["full_backward_loop"]
    rows = []
    for batch_size in args.batch_sizes:
        captum = f"captum_{batch_size}"
        for name in (batch_size, captum):
            difference = float((scores[name] - reference).abs().max())
            limit = tolerance if name == batch_size else 1e-4
            if difference > limit:
                raise SystemExit(
                    f"{name}: scores differ from the full-backward loop by {difference}"
                )
        rows.append(
            {
                "batch_size": batch_size,
                "images_per_s": round(args.images / wall[batch_size], 3),
                "captum_images_per_s": round(args.images / wall[captum], 3),
                "vs_captum_wall": round(wall[captum] / wall[batch_size], 2),
                "vs_captum_cpu": round(cpu[captum] / cpu[batch_size], 2),
                "vs_full_backward_loop_cpu": round(cpu["full_backward_loop"] / cpu[batch_size], 2),
                "max_score_diff": float((scores[batch_size] - scores[captum]).abs().max()),
                "same_ranking_as_captum": bool(
                    torch.equal(scores[batch_size].argsort(), scores[captum].argsort())
                ),
            }
        )
    result = {
        "size": [height, width],
        "images": args.images,
        "model": f"UNet width {args.width} depth {args.depth}, {sum(p.numel() for p in model.parameters())} parameters",
        "full_backward_loop_images_per_s": round(args.images / wall["full_backward_loop"], 3),
        "rounds": args.rounds,
        "precision": args.precision,
        "batched": rows,
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu x{torch.get_num_threads()} threads ({platform.machine()})"
        )
        + f", torch {torch.__version__}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
