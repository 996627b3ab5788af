"""PyTorch reference for MTCNN (tests, benchmark_align): facenet-pytorch's state_dict layout, a plain detector.

The nets are written from the published state_dict layout (conv + PReLU, ceil-mode max-pools,
dense layers reading the NCHW activations permuted to (N, W, H, C)). `detect` is the reference
procedure of facenet-pytorch's `detect_face` written the simple way: one image, one pyramid level
at a time, torch `interpolate(mode="area")` for every resize, candidates cropped one by one, and
an NMS that builds the full overlap matrix. It shares no code with vitnt_jax.mtcnn.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def facenet_data() -> Path | None:
    """Returns facenet-pytorch's data folder (pnet.pt, rnet.pt, onet.pt) if the package is installed."""
    try:
        folder = Path(importlib.metadata.distribution("facenet-pytorch").locate_file("facenet_pytorch/data"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return folder if (folder / "onet.pt").is_file() else None


class _Stack(nn.Module):
    """conv/PReLU/pool layers named as in the Caffe port; `spec` = (name, kind, args) rows."""

    def __init__(self, spec):
        super().__init__()
        self.order = []
        for name, kind, args in spec:
            if kind == "conv":
                setattr(self, name, nn.Conv2d(*args))
            elif kind == "prelu":
                setattr(self, name, nn.PReLU(args))
            elif kind == "pool":
                setattr(self, name, nn.MaxPool2d(*args, ceil_mode=True))
            self.order.append(name)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        return x


class PNet(_Stack):
    def __init__(self):
        super().__init__(
            [
                ("conv1", "conv", (3, 10, 3)),
                ("prelu1", "prelu", 10),
                ("pool1", "pool", (2, 2)),
                ("conv2", "conv", (10, 16, 3)),
                ("prelu2", "prelu", 16),
                ("conv3", "conv", (16, 32, 3)),
                ("prelu3", "prelu", 32),
            ]
        )
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        """Returns (regression (B, 4, h, w), softmax (B, 2, h, w))."""
        x = self.trunk(x)
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


def _flatten_wh(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(_Stack):
    def __init__(self):
        super().__init__(
            [
                ("conv1", "conv", (3, 28, 3)),
                ("prelu1", "prelu", 28),
                ("pool1", "pool", (3, 2)),
                ("conv2", "conv", (28, 48, 3)),
                ("prelu2", "prelu", 48),
                ("pool2", "pool", (3, 2)),
                ("conv3", "conv", (48, 64, 2)),
                ("prelu3", "prelu", 64),
            ]
        )
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        """Returns (regression (B, 4), softmax (B, 2))."""
        x = self.prelu4(self.dense4(_flatten_wh(self.trunk(x))))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(_Stack):
    def __init__(self):
        super().__init__(
            [
                ("conv1", "conv", (3, 32, 3)),
                ("prelu1", "prelu", 32),
                ("pool1", "pool", (3, 2)),
                ("conv2", "conv", (32, 64, 3)),
                ("prelu2", "prelu", 64),
                ("pool2", "pool", (3, 2)),
                ("conv3", "conv", (64, 64, 3)),
                ("prelu3", "prelu", 64),
                ("pool3", "pool", (2, 2)),
                ("conv4", "conv", (64, 128, 2)),
                ("prelu4", "prelu", 128),
            ]
        )
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        """Returns (regression (B, 4), landmarks (B, 10), softmax (B, 2))."""
        x = self.prelu5(self.dense5(_flatten_wh(self.trunk(x))))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def load_nets(folder: Path) -> tuple[PNet, RNet, ONet]:
    """Returns the three nets with facenet-pytorch's weights from `folder`, loaded strictly."""
    nets = (PNet(), RNet(), ONet())
    for net, name in zip(nets, ("pnet", "rnet", "onet"), strict=True):
        net.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True), strict=True)
        net.eval()
    return nets


# ------------------------------------------------------------------------------------------- procedure


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str) -> list[int]:
    """Greedy NMS over the full overlap matrix; highest score first, ties by position."""
    n = len(scores)
    if n == 0:
        return []
    b = boxes.astype(np.float32)
    plus = np.float32(1 if mode == "min" else 0)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + plus) * (y2 - y1 + plus)
    iw = np.maximum(np.float32(0), np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]) + plus)
    ih = np.maximum(np.float32(0), np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]) + plus)
    inter = iw * ih
    if mode == "min":
        overlap = inter / np.minimum(area[:, None], area[None])
    else:
        overlap = inter / (area[:, None] + area[None] - inter)
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    removed = np.zeros(n, bool)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        removed |= overlap[i] > threshold
    return keep


def _rerec(b: torch.Tensor) -> torch.Tensor:
    b = b.clone()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = torch.maximum(w, h)
    b[:, 0] = b[:, 0] + w * 0.5 - side * 0.5
    b[:, 1] = b[:, 1] + h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _bbreg(b: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    b = b.clone()
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    b[:, 0], b[:, 1] = b[:, 0] + reg[:, 0] * w, b[:, 1] + reg[:, 1] * h
    b[:, 2], b[:, 3] = b[:, 2] + reg[:, 2] * w, b[:, 3] + reg[:, 3] * h
    return b


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, list[int]]:
    """Returns the normalised size x size area-resized crops of the boxes, and which boxes had one."""
    h, w = image.shape[2:]
    out, rows = [], []
    for k, box in enumerate(boxes):
        x, y, ex, ey = (int(v) for v in torch.trunc(box[:4]).tolist())
        x, y, ex, ey = max(x, 1), max(y, 1), min(ex, w), min(ey, h)
        if ex > x - 1 and ey > y - 1:
            crop = image[:, :, y - 1 : ey, x - 1 : ex]
            out.append(F.interpolate(crop, size=(size, size), mode="area"))
            rows.append(k)
    if not out:
        return torch.zeros(0, 3, size, size), rows
    return (torch.cat(out) - 127.5) * 0.0078125, rows


@torch.no_grad()
def detect(image: np.ndarray, nets, min_face: float = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
    """Returns (boxes (n, 4), scores (n,), landmarks (n, 5, 2)) for one uint8 RGB image."""
    pnet, rnet, onet = nets
    img = torch.as_tensor(image.copy()).permute(2, 0, 1)[None].float()
    h, w = image.shape[:2]
    scale, short = 12.0 / min_face, min(h, w) * 12.0 / min_face
    proposals = []
    while short >= 12:
        level = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
        reg, prob = pnet((level - 127.5) * 0.0078125)
        face = prob[0, 1]
        found = (face >= thresholds[0]).nonzero()  # (y, x) rows in raster order
        cell = found.flip(1).float()
        q1 = torch.floor((2 * cell + 1) / scale)
        q2 = torch.floor((2 * cell + 12) / scale)
        rows = torch.cat([q1, q2, face[found[:, 0], found[:, 1]][:, None], reg[0][:, found[:, 0], found[:, 1]].T], 1)
        keep = _nms(rows[:, :4].numpy(), rows[:, 4].numpy(), 0.5, "iou")
        proposals.append(rows[keep])
        scale, short = scale * factor, short * factor
    boxes = torch.cat(proposals) if proposals else torch.zeros(0, 9)
    boxes = boxes[_nms(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7, "iou")]
    rw, rh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack(
        [
            boxes[:, 0] + boxes[:, 5] * rw,
            boxes[:, 1] + boxes[:, 6] * rh,
            boxes[:, 2] + boxes[:, 7] * rw,
            boxes[:, 3] + boxes[:, 8] * rh,
            boxes[:, 4],
        ],
        1,
    )
    boxes = _rerec(boxes)

    crops, rows = _crops(img, boxes, 24)
    boxes = boxes[rows]
    reg, prob = rnet(crops) if len(rows) else (torch.zeros(0, 4), torch.zeros(0, 2))
    ok = prob[:, 1] > thresholds[1]
    boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], 1)
    reg = reg[ok]
    keep = _nms(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7, "iou")
    boxes = _rerec(_bbreg(boxes[keep], reg[keep]))

    crops, rows = _crops(img, boxes, 48)
    boxes = boxes[rows]
    if not rows:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
    reg, points, prob = onet(crops)
    ok = prob[:, 1] > thresholds[2]
    boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], 1)
    reg, points = reg[ok], points[ok]
    bw = boxes[:, 2] - boxes[:, 0] + 1
    bh = boxes[:, 3] - boxes[:, 1] + 1
    xs = bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1
    ys = bh[:, None] * points[:, 5:] + boxes[:, 1:2] - 1
    landmarks = torch.stack([xs, ys], -1)
    boxes = _bbreg(boxes, reg)
    keep = _nms(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7, "min")
    return boxes[keep, :4].numpy(), boxes[keep, 4].numpy(), landmarks[keep].numpy()
