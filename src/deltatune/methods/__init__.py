"""Every method registers itself on import; importing this package registers them all."""

from .adapters import bottleneck, parallel  # noqa: F401  (houlsby, pfeiffer, parallel_adapter)
from .lowrank import adalora, dora, lora, vera  # noqa: F401
from .prompts import prefix_tuning, prompt_tuning  # noqa: F401
from .scaling import ia3  # noqa: F401
from .selective import bitfit, ln_tuning  # noqa: F401
# Hugging Face PEFT formats, each registered beside its method (deltatune.interop.peft)
from .lowrank import lora_peft  # noqa: F401,E402
from .prompts import prompt_tuning_peft  # noqa: F401,E402
from .scaling import ia3_peft  # noqa: F401,E402
