"""Training hooks (core.hooks): parameter groups, auxiliary losses, the per-step hook and
calibration, called the same way by ``deltatune train`` and a user's own loop; the optimizer
factory of ``deltatune train --optimizer``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneError
from deltatune.optim import build_optimizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))


def lora_net():
    model = Net()
    dt.attach(model, dt.config("lora", r=2, targets=["body"], trainable_modules=["classifier"]))
    return model


def rate_of(groups, param):
    return next(g["lr"] for g in groups if any(p is param for p in g["params"]))


def test_parameter_groups_apply_method_multipliers_and_module_rates(monkeypatch):
    model = lora_net()
    A = model.body.deltas["default"].lora_A
    B = model.body.deltas["default"].lora_B
    head = next(p for n, p in model.named_parameters() if n.startswith("classifier") and p.requires_grad)
    groups = dt.parameter_groups(model, lr=1e-3, rates={"classifier": 3e-2})
    assert rate_of(groups, A) == rate_of(groups, B) == 1e-3 and rate_of(groups, head) == 3e-2
    assert sum(len(g["params"]) for g in groups) == len(dt.trainable_parameters(model))
    monkeypatch.setattr(dt.get_method("lora"), "lr_multipliers", lambda cfg: {"lora_B": 16.0})
    groups = dt.parameter_groups(model, lr=1e-3)
    assert rate_of(groups, B) == pytest.approx(1.6e-2) and rate_of(groups, A) == 1e-3
    monkeypatch.setattr(dt.get_method("lora"), "lr_multipliers", lambda cfg: {"lora_B": 0.0})
    with pytest.raises(DeltatuneError, match="must be positive"):
        dt.parameter_groups(model, lr=1e-3)


def test_auxiliary_loss_step_hook_and_calibrate_reach_the_method(monkeypatch):
    model = lora_net()
    assert dt.auxiliary_loss(model) == 0.0
    seen = []
    lora = dt.get_method("lora")
    monkeypatch.setattr(lora, "auxiliary_loss", lambda m, name: m.body.deltas[name].lora_A.pow(2).sum())
    monkeypatch.setattr(lora, "on_step", lambda m, name, step: seen.append(("step", name, step)))
    monkeypatch.setattr(lora, "calibrate", lambda m, name, batches, loss_fn: seen.append(("calibrate", name, len(batches))))
    aux = dt.auxiliary_loss(model)
    assert torch.allclose(aux, model.body.deltas["default"].lora_A.pow(2).sum())
    aux.backward()
    assert model.body.deltas["default"].lora_A.grad is not None
    dt.step_hook(model, 7)
    assert dt.calibrate(model, (torch.randn(2, 8) for _ in range(3))) == ["default"]
    assert seen == [("step", "default", 7), ("calibrate", "default", 3)]
    with dt.disabled(model):
        assert dt.auxiliary_loss(model) == 0.0          # only the active adapters' terms
    with pytest.raises(DeltatuneError, match="at least one batch"):
        dt.calibrate(model, [])


def test_build_optimizer_names_the_choices():
    params = [nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer("sgd", [{"params": params}], 0.1, 0.0), torch.optim.SGD)
    assert isinstance(build_optimizer("adamw", [{"params": params}], 0.1, 0.0), torch.optim.AdamW)
    with pytest.raises(DeltatuneError, match="available: adam, adamw, .*sgd"):
        build_optimizer("lion", [{"params": params}], 0.1, 0.0)


def test_trainer_with_deltatune_calls_every_hook(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from deltatune.train.hf import with_deltatune

    class Model(Net):
        def forward(self, x, labels=None):
            logits = super().forward(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    model = Model()
    dt.attach(model, dt.config("lora", r=2, targets=["body"], trainable_modules=["classifier"]))
    lora, seen = dt.get_method("lora"), []
    monkeypatch.setattr(lora, "on_step", lambda m, name, step: seen.append(step))
    monkeypatch.setattr(lora, "auxiliary_loss", lambda m, name: seen.append("aux") or torch.zeros(()))
    monkeypatch.setattr(lora, "lr_multipliers", lambda cfg: {"lora_B": 4.0})
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(8, generator=g), "labels": torch.tensor(i % 3)} for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          lr_scheduler_type="constant", logging_strategy="no")
    trainer = with_deltatune(transformers.Trainer)(model=model, args=args, train_dataset=data)
    trainer.train()
    assert [s for s in seen if s != "aux"] == [1, 2] and seen.count("aux") == 2
    B = model.body.deltas["default"].lora_B
    assert rate_of(trainer.optimizer.param_groups, B) == pytest.approx(4e-3)


def test_loraplus_trains_B_at_the_ratio_in_deltatune_train_groups():
    """LoRA+ through the real registration: B's group rate is ratio x lr, A's is lr."""
    for method in ("lora", "dora"):
        model = Net()
        dt.attach(model, dt.config(method, r=2, targets=["body"], loraplus_lr_ratio=16.0))
        d = model.body.deltas["default"]
        groups = dt.parameter_groups(model, lr=2e-4)
        assert rate_of(groups, d.lora_B) == pytest.approx(3.2e-3) and rate_of(groups, d.lora_A) == 2e-4
    with pytest.raises(DeltatuneError, match="loraplus_lr_ratio"):
        dt.config("lora", loraplus_lr_ratio=0.0)
