"""Train a small DeepLab-style segmenter on a seediff output, then score it on a held-out labelled set: one command.

    python examples/train_segmenter.py OUT_ROOT --val ROOT --layout voc [--split val] [--steps 2000] [--size 256]

Training reads OUT_ROOT (a ``seediff generate`` or ``annotate`` output) with ``seediff.segmentation_dataset(...,
dtype="uint8")`` (shard shuffle, sample shuffle buffer), resizes each sample to ``--size`` x ``--size`` (bilinear
image, nearest labels), and minimises pixel cross-entropy with ``ignore_index=255`` (seediff's ignore band and
borders teach nothing). The model is a plain-torch DeepLabV3-style network: a small residual backbone at output
stride 8 (dilated last stage), an ASPP head (1x1, three dilated 3x3 branches, image pooling) and a 1x1 classifier,
logits upsampled to the input. Evaluation is ``seediff eval``'s protocol: every image of the labelled set
(``voc`` or ``labels`` layout, read by ``seediff.pipeline.layouts``) is predicted at ``--size`` and upsampled to its
own size, and one confusion matrix (ground-truth 255 excluded) gives mIoU, pixel accuracy and per-class IoU
(``seediff.pipeline.metrics``), printed and written to ``--out`` (metrics.json). The manifest's class ids must be
the labelled set's label values (for VOC: aeroplane 1 ... tvmonitor 20).

This is a recipe and a smoke-testable baseline, not the published protocol: for numbers comparable to the
literature (DeepLabV3 with a ResNet-101 backbone, trained on the synthetic set, scored on VOC 2012 val) see the
README's mmsegmentation command.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import seediff
from seediff.pipeline.layouts import IGNORE, iter_labelled, open_labelled_dataset
from seediff.pipeline.metrics import ConfusionMatrix, format_table

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics, as DeepLab trainers normalise
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ---- the model ----------------------------------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """A basic ResNet block (two 3x3 convolutions); a 1x1 projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride=stride, dilation=dilation),
                                  nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ASPP(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling: parallel 1x1, dilated 3x3 and image-pooling branches."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(cin, cout, 1), *(conv_bn(cin, cout, dilation=r) for r in rates)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = conv_bn(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))


class DeepLabLite(nn.Module):
    """Backbone at output stride 8 (stem /4, stage /8, dilated stage), ASPP, classifier, bilinear upsampling."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn(3, width, stride=2), conv_bn(width, width, stride=2),  # /4
            Residual(width, width), Residual(width, 2 * width, stride=2),  # /8
            Residual(2 * width, 4 * width, dilation=2), Residual(4 * width, 4 * width, dilation=4),
        )
        self.head = ASPP(4 * width, 4 * width)
        self.classifier = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.head(self.backbone(image)))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


# ---- data ---------------------------------------------------------------------------------------------------------


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float, ImageNet-normalised (on the training device)."""
    return (images.float().div_(255) - MEAN.to(images.device)) / STD.to(images.device)


def resized(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (uint8 [3,H,W], uint8 [H,W]) sample at size x size: bilinear image, nearest labels (never blended ids)."""
    image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0]
    return image.round().clamp(0, 255).to(torch.uint8), mask.to(torch.uint8)


def batches(out_root: str, size: int, batch_size: int, workers: int, shuffle_buffer: int):
    """Endless (images uint8 [B,3,S,S], masks int64 [B,S,S]) from the seediff output, one pass after another."""

    def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [resized(image, mask, size) for image, mask, _ in samples]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]).long()

    for _ in itertools.count():
        dataset = seediff.segmentation_dataset(out_root, shuffle_shards=True, shuffle_buffer=shuffle_buffer,
                                               dtype="uint8")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        yield from loader


# ---- train and evaluate -------------------------------------------------------------------------------------------


def train(model: nn.Module, args: argparse.Namespace, device: torch.device) -> list[float]:
    optimiser = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: (1 - step / args.steps) ** 0.9)  # "poly"
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    losses: list[float] = []
    model.train()
    start = time.monotonic()
    stream = batches(args.out_root, args.size, args.batch_size, args.workers, args.shuffle_buffer)
    for step, (images, masks) in enumerate(itertools.islice(stream, args.steps), start=1):
        images, masks = images.to(device), masks.to(device)
        labelled = masks[masks != IGNORE]
        if labelled.numel() and labelled.max() >= args.num_classes:
            raise SystemExit(f"{args.out_root}: label {int(labelled.max())} is not a class of the labelled set "
                             f"({args.num_classes} classes); give the manifest the labelled set's class ids")
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(normalise(images)), masks)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  ({time.monotonic() - start:.0f} s)", flush=True)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """seediff eval's scoring: one confusion matrix over the labelled set, each prediction at the image's size."""
    dataset = open_labelled_dataset(args.val, args.layout, split=args.split, classes_file=args.classes_file)
    matrix = ConfusionMatrix(len(dataset.class_names))
    model.eval()
    for item, truth in iter_labelled(dataset):
        with Image.open(item.image) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        small, _ = resized(image, torch.zeros(image.shape[1:], dtype=torch.uint8), args.size)
        logits = model(normalise(small[None].to(device)))
        logits = F.interpolate(logits, size=truth.shape, mode="bilinear", align_corners=False)
        matrix.update(truth, logits.argmax(1)[0].cpu().numpy().astype(np.uint8), where=item.image)
    return matrix.summary(dataset.class_names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_root", metavar="OUT_ROOT", help="seediff output root to train on")
    parser.add_argument("--val", required=True, metavar="ROOT", help="held-out labelled dataset to score on")
    parser.add_argument("--layout", choices=["voc", "labels"], default="voc", help="layout of --val")
    parser.add_argument("--split", default=None, help="VOC image set of --val (default: val)")
    parser.add_argument("--classes-file", default=None, help="class list of --val (default: its own / VOC's)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="training and inference side in pixels")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--width", type=int, default=32, help="backbone channels of the first stage")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default="segmenter-out", help="folder for metrics.json and model.pt")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    classes = open_labelled_dataset(args.val, args.layout, split=args.split, classes_file=args.classes_file).class_names
    args.num_classes = len(classes)
    model = DeepLabLite(args.num_classes, args.width).to(device)
    losses = train(model, args, device)
    metrics = evaluate(model, args, device)
    print(format_table(metrics, f"{args.val} ({args.layout})"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    report = {"train": args.out_root, "steps": args.steps, "losses": losses, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
