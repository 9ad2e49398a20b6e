"""deltatune: parameter- and memory-efficient fine-tuning of pretrained PyTorch models.

The public API (see DESIGN.md)::

    import deltatune as dt
    cfg = dt.config("lora", r=8, alpha=16, targets=["query", "value"])
    dt.attach(model, cfg)
"""

from . import methods as _methods  # noqa: F401  (registers every method)
from .core.config import BaseConfig
from .core.engine import (active_adapters, attach, count_parameters, delete_adapter, disabled, merge,
                          per_sample_adapters, set_active, summary, trainable_parameters, unload, unmerge)
from .core.errors import AdapterFileError, DeltatuneError
from .core.hooks import auxiliary_loss, calibrate, parameter_groups, step_hook
from .core.io import load_adapter, save_adapter
from .core.registry import available_methods, config, get_method
from .diagnostics import Diagnosis, LayerDiagnosis, diagnose, diagnose_weights, scale_intruders
from .interop.peft import export_peft, import_peft
from .memory import MemoryReport, memory_report
from .methods.lowrank._nested_rank import truncate_rank
from .methods.lowrank.dora import DoraConfig
from .methods.lowrank.lora import LoraConfig
from .methods.prompts.prompt_tuning import PromptTuningConfig
from .methods.scaling.ia3 import IA3Config
from .quant import qfx, qfx_export, quantize

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError", "BaseConfig", "DeltatuneError", "DoraConfig", "IA3Config", "LoraConfig",
    "PromptTuningConfig", "active_adapters", "attach", "auxiliary_loss", "available_methods", "calibrate", "config",
    "count_parameters", "parameter_groups", "step_hook", "Diagnosis", "LayerDiagnosis", "diagnose", "diagnose_weights",
    "scale_intruders", "truncate_rank",
    "delete_adapter", "disabled", "export_peft", "MemoryReport", "memory_report", "import_peft", "get_method", "load_adapter", "merge", "per_sample_adapters", "quantize", "save_adapter", "set_active",
    "summary", "trainable_parameters", "unload", "unmerge",
]
