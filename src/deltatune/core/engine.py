"""The engine, in parts named for what they do; this module gathers their public names.

- ``matching``: the model's modules before wrapping, target patterns, default targets;
- ``lifecycle``: plan, install, attach and delete adapters (and their adapter-level state);
- ``activation``: which adapters run, per model or per sample;
- ``merging``: merge, unmerge, unload;
- ``summary``: parameter counts and the table of wrapped modules.

Methods never do any of this themselves; they only build a delta for one layer.
"""

from .activation import active_adapters, disabled, per_sample_adapters, set_active  # noqa: F401
from .lifecycle import (Plan, adapter_parameters, attach, delete_adapter, install, plan,  # noqa: F401
                        shared_state)
from .matching import (Entry, adapters, copies, layer_index, match_modules, match_pattern,  # noqa: F401
                       model_type, pattern_value, resolve_targets, unwrap, walk, wrappers)
from .merging import merge, unload, unmerge  # noqa: F401
from .summary import count_parameters, summary, trainable_parameters  # noqa: F401
