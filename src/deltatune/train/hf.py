"""deltatune's training hooks inside transformers' ``Trainer``.

``Trainer`` owns the loop, so the hooks of ``core.hooks`` reach it two ways:

- ``DeltatuneCallback``: after every optimizer step, ``dt.step_hook`` (rank and trainable-set
  schedules);
- ``with_deltatune(Trainer)``: a subclass whose loss adds ``dt.auxiliary_loss`` and whose
  optimizer takes ``dt.parameter_groups`` (per-parameter rates such as LoRA+), with the callback
  installed::

      trainer = with_deltatune(transformers.Trainer)(model=model, args=args, train_dataset=data)
      trainer.train()
"""

from __future__ import annotations

from typing import Any

from ..core.errors import DeltatuneError


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DeltatuneError("deltatune.train.hf needs transformers: `pip install 'deltatune[transformers]'`") from None
    return transformers


def _callback_class():
    transformers = _transformers()

    class DeltatuneCallback(transformers.TrainerCallback):
        """Calls ``dt.step_hook(model, step)`` after each optimizer step of a ``Trainer``."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            from ..core.hooks import step_hook
            if model is not None:
                step_hook(model, state.global_step)
            return control

    return DeltatuneCallback


def __getattr__(name: str) -> Any:       # the class needs transformers: built on first use
    if name == "DeltatuneCallback":
        return _callback_class()
    raise AttributeError(name)


def with_deltatune(trainer_cls: type) -> type:
    """``trainer_cls`` (``transformers.Trainer`` or a subclass) with deltatune's hooks."""
    from ..core.hooks import auxiliary_loss, parameter_groups

    class DeltatuneTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(_callback_class())

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss, outputs = result if return_outputs else (result, None)
            loss = loss + auxiliary_loss(self.model)
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, *args, **kwargs):
            if self.optimizer is None:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                groups = parameter_groups(self.model, self.args.learning_rate)
                for g in groups:
                    g["weight_decay"] = self.args.weight_decay
                optimizer_kwargs.pop("lr", None)
                self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
            return self.optimizer

    DeltatuneTrainer.__name__ = f"Deltatune{trainer_cls.__name__}"
    return DeltatuneTrainer
