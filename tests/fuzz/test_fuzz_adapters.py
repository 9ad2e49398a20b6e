"""Property-based fuzzing of the adapter readers: ``dt.load_adapter`` (our format) and
``dt.import_peft`` (Hugging Face PEFT).

Each example starts from real files (adapters saved / exported from a trained tiny model),
then mutates them: config JSON fields deleted, replaced by random JSON values (wrong types,
NaN, huge ints), keys added, non-UTF-8 bytes, truncation, garbage; safetensors with tensors
dropped, renamed, re-typed (integer, bool, complex, float8, float16...), reshaped, poisoned
with NaN/Inf, extra tensors, and byte-level damage (truncation, flipped header bytes, a header
length past the end, random bytes). The property: every input either loads, and then the
loaded adapter holds exactly the file's tensors, or raises a ``DeltatuneError``; never any
other exception, and on an error the model is unchanged (state_dict, module tree, flags).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import struct
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save
from torch import nn

import deltatune as dt
from deltatune.core.engine import active_adapters, adapters, wrappers
from deltatune.core.io import adapter_state
from fuzzing import FUZZ, counted

PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- the model

class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8, bias=False)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()
        self.ff = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)


class Tiny(nn.Module):
    """Two blocks with containers (``attn``), a bias-less layer, a norm, an embedding (also the
    host of prompt tuning) and a head; a few hundred parameters, so one example takes ~ms."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(8, 3)

    def get_input_embeddings(self):
        return self.emb


def tiny() -> Tiny:
    torch.manual_seed(0)
    m = Tiny().eval()
    m.requires_grad_(False)     # what a load leaves (it freezes the base), so a load + delete is a no-op
    return m


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()], dict(adapters(model)),
            active_adapters(model))


def assert_unchanged(model, snap):
    sd, tree, grads, names, active = snapshot(model)
    assert tree == snap[1], "the module tree changed"
    assert grads == snap[2], "requires_grad flags changed"
    assert names == snap[3] and active == snap[4], "adapters registered"
    assert sd.keys() == snap[0].keys() and all(torch.equal(sd[k], snap[0][k]) for k in sd), "weights changed"


# ----------------------------------------------------------------------------- the real files

CONFIGS = {
    "lora": ("lora", dict(r=2, alpha=4, targets=["q", "v", "emb"], trainable_modules=["classifier"],
                          rank_pattern={"layers.1.attn.v": 1}, alpha_pattern={"q": 3.0})),
    "lora-bias": ("lora", dict(r=2, targets=["ff"], bias="all")),
    "lora-only-bias": ("lora", dict(r=2, targets=["q"], bias="lora_only")),
    "pissa": ("lora", dict(r=2, targets=["ff"], init="pissa")),
    "dora": ("dora", dict(r=2, targets=["q", "down"])),
    "ia3": ("ia3", dict(targets=["q", "down"], feedforward=["down"], trainable_modules=["classifier"])),
    "prompt": ("prompt_tuning", dict(num_virtual_tokens=3, init="random")),
}


def _trained(method, kw):
    m = tiny()
    dt.attach(m, dt.config(method, **kw), name="a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(m):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


@functools.lru_cache(maxsize=None)
def real_files(kind: str) -> dict[str, tuple[bytes, dict[str, torch.Tensor]]]:
    """name -> (config bytes, tensors) of real adapters, saved (``ours``) or exported (``peft``)."""
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, kw) in CONFIGS.items():
            m, d = _trained(method, kw), Path(tmp) / name
            if kind == "ours":
                dt.save_adapter(m, d, name="a")
                files[name] = ((d / "adapter_config.json").read_bytes(), load_file(d / "adapter.safetensors"))
            else:
                dt.export_peft(m, d, name="a")
                files[name] = ((d / "adapter_config.json").read_bytes(), load_file(d / "adapter_model.safetensors"))
    return files


# ----------------------------------------------------------------------------- mutations

NAMES = ["q", "v", "emb", "classifier", "layers.0.attn", "layers.0.attn.q", "layers.0.attn.v", "layers.1.ff",
         "layers.0.norm", "lora", "dora", "ia3", "prompt_tuning", "none", "all", "lora_only", "default", "pissa",
         "re:(", "re:.*", "type:Linear", "all-linear", "", "method", "bias", "delta", "LORA", "IA3",
         "PROMPT_TUNING", "deltatune", "weight_shape", "a", "no such", "r", "lora_alpha", "targets"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NAMES),
                    st.text(max_size=6))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=4)), inner,
                                                 max_size=3)), max_leaves=5)
KEYS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.complex64]
POISON = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0]


# tensor names built from the model's own module names (containers, layers without a bias or a
# weight, the root) and the suffixes both formats use: where the readers' name handling breaks
MODULES = [n for n, _ in Tiny().named_modules()] + ["nowhere", "layers.9.ff"]
PEFT_SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector", ".base_layer.bias", ".base_layer.weight", ".bias", ".weight", ".ia3_l"]
OUR_SUFFIXES = [".lora_A", ".lora_B", ".magnitude", ".lora_bias", ".prompt", ".A0", ".B0", ".ia3_l", ".bias", ".weight"]


def structured(prefixes: list[str], suffixes: list[str]):
    return st.builds(lambda prefix, mod, suffix: prefix + mod + suffix, st.sampled_from(prefixes),
                     st.sampled_from(MODULES), st.sampled_from(suffixes))


def tensor_names(pool: list[str], mostly, sometimes):
    """Names for renamed and added tensors: mostly built in the reader's own format, sometimes in
    the other one, plus names of the real files and arbitrary strings."""
    return st.one_of(mostly, mostly, mostly, sometimes, st.sampled_from(pool), KEYS)


OUR_NAMES = structured(["deltas.", "deltas.", "modules.", ""], OUR_SUFFIXES)
PEFT_NAMES_ = structured([PREFIX, PREFIX, ""], PEFT_SUFFIXES)


EDGE_NUMBERS = [math.nan, math.inf, -math.inf, 0, -1, 0.5, 1.0, 2 ** 31, 2 ** 63, 2 ** 70, 10 ** 12, 1e300, -0.0,
                True, False, None, "8", [8]]


def fresh(draw, strategy):
    """A drawn value never shared with another place: later edits inside it must not reach a
    module constant (hypothesis would see different data on a replay) or the document itself."""
    return copy.deepcopy(draw(strategy))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


# What one example damages. Mostly one thing at a time, so that the damage reaches the deep
# checks (a foreign tensor name, a wrong dtype) instead of being stopped at the first gate by a
# second, unrelated one; "mixed" stacks everything.
# "hollow": no tensors at all and an emptied part of the config (an adapter that would do nothing).
FOCI = ["config", "config", "tensors", "tensors", "tensors", "bytes", "files", "hollow", "mixed", "mixed"]


def edits(focus: str, mine: str) -> tuple[int, int]:
    """The range of the number of edits for the stage ``mine``."""
    return (1, 3) if focus == mine else (0, 3) if focus == "mixed" else (0, 0)


def mutate_json(draw, obj, count: tuple[int, int] = (0, 3), hollow: bool = False):
    """Edits at random places of a JSON document: delete, replace by a random value, add;
    ``hollow``: one object or array emptied."""
    obj = copy.deepcopy(obj)
    containers = [p for p in _paths(obj) if p and isinstance(_get(obj, p), (dict, list))]
    if hollow and containers:
        path = draw(st.sampled_from(containers))
        _get(obj, path[:-1])[path[-1]] = type(_get(obj, path))()
    for _ in range(draw(st.integers(*count))):
        numbers = [p for p in _paths(obj) if p and isinstance(_get(obj, p), (int, float))]
        if numbers and draw(st.integers(0, 3)) == 0:
            # a number (r, alpha, a shape, an epoch) becomes an edge value of it or of its type
            path = draw(st.sampled_from(numbers))
            _get(obj, path[:-1])[path[-1]] = fresh(draw, st.sampled_from(EDGE_NUMBERS))
            continue
        path = draw(st.sampled_from(list(_paths(obj))))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:
            if op == "replace":
                obj = fresh(draw, JSON)
            continue
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        if op == "delete":
            del parent[path[-1]]
        elif op == "replace":
            parent[path[-1]] = fresh(draw, JSON)
        elif isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=4)))] = fresh(draw, JSON)
        else:
            parent.insert(path[-1], fresh(draw, JSON))
    return obj


def _damage(draw, mode: str, ops: list[str]) -> str:
    """One damage op: none ("off"), maybe none ("maybe"), or surely one ("force")."""
    if mode == "off":
        return "keep"
    return draw(st.sampled_from(ops if mode == "force" else ["keep"] * len(ops) + ops))


def mutate_bytes(draw, data: bytes, mode: str = "maybe") -> bytes:
    op = _damage(draw, mode, ["truncate", "flip", "insert", "random", "empty"])
    if op == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if op == "flip" and data:
        b = bytearray(data)
        b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
        return bytes(b)
    if op == "insert":
        pos = draw(st.integers(0, len(data)))
        return data[:pos] + draw(st.binary(min_size=1, max_size=4)) + data[pos:]
    if op == "random":
        return draw(st.binary(max_size=64))
    if op == "empty":
        return b""
    return data


def config_bytes(draw, raw: bytes, focus: str = "mixed") -> bytes:
    obj = mutate_json(draw, json.loads(raw), edits(focus, "config"), hollow=focus == "hollow")
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    # a lone surrogate from st.text, written as UTF-8 anyway: one more way to be non-UTF-8
    data = text.encode("utf-8", errors="surrogatepass")
    mode = "maybe" if focus == "mixed" else "off" if focus != "bytes" else draw(st.sampled_from(["force", "off"]))
    return mutate_bytes(draw, data, mode)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # complex -> real drops the imaginary part: intended here
        return t.to(dtype)


def mutate_tensors(draw, tensors: dict[str, torch.Tensor], names,
                   count: tuple[int, int] = (0, 3)) -> dict[str, torch.Tensor]:
    """Edits of a file's tensors: drop (one or all), rename, re-type, reshape, poison, add, new
    values. ``names``: the strategy for new tensor names."""
    t = {k: v.clone() for k, v in tensors.items()}
    # values from a drawn seed, not torch's global RNG (which earlier tests move): replays match
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    for _ in range(draw(st.integers(*count))):
        op = draw(st.sampled_from(["drop", "rename", "rename", "dtype", "all-dtype", "shape", "poison", "poison",
                                   "extra", "extra", "values", "clear"]))
        if op == "clear":
            t = {}
            continue
        if op == "extra" or not t:
            # mostly the shape of a tensor of the file, so the new one gets past the shape checks
            like = t[draw(st.sampled_from(sorted(t)))] if t and draw(st.integers(0, 2)) else None
            shape = like.shape if like is not None else draw(st.lists(st.integers(0, 9), max_size=3))
            t[draw(names)] = torch.randn(shape, generator=g)
            continue
        key = draw(st.sampled_from(sorted(t)))
        if op == "drop":
            del t[key]
        elif op == "rename":
            new = draw(st.one_of(names, names, st.just(key + ".x"), st.just(key.rsplit(".", 1)[0]),
                                 st.just(key.replace(PREFIX, "")), st.just("deltas." + key)))
            t[new] = t.pop(key)
        elif op == "dtype":
            t[key] = _cast(t[key], draw(st.sampled_from(DTYPES)))
        elif op == "all-dtype":        # a whole file in another float dtype: loads with a notice
            dtype = draw(st.sampled_from(DTYPES[:3]))
            t = {k: _cast(v, dtype) for k, v in t.items()}
        elif op == "shape":
            old = t[key]
            new_shape = draw(st.lists(st.integers(0, 9), max_size=4))
            t[key] = draw(st.sampled_from([torch.randn(new_shape, generator=g), old.reshape(-1),
                                           old.t() if old.dim() == 2 else old[None], old[:1] if old.dim() else old[None]]))
        elif op == "poison" and t[key].is_floating_point() and t[key].numel():
            v = t[key].contiguous().clone()
            v.view(-1)[draw(st.integers(0, v.numel() - 1))] = draw(st.sampled_from(POISON))
            t[key] = v
        elif op == "values" and t[key].is_floating_point():
            t[key] = torch.randn(t[key].shape, generator=g).to(t[key].dtype)
    return t


def canonical(data: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted: safetensors writes its metadata
    from a hash map, in an order that changes from process to process, and a flipped header byte
    must hit the same place when hypothesis replays an example."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def damage_safetensors(draw, data: bytes, mode: str = "maybe") -> bytes:
    """Byte-level damage to a safetensors file, or none: truncation, a flipped byte (in the
    header or anywhere), a header length field pointing anywhere, random bytes, trailing bytes."""
    data = canonical(data)
    op = _damage(draw, mode, ["truncate", "flip-header", "flip-header", "flip", "header-length", "random", "empty",
                              "append"])
    n = int.from_bytes(data[:8], "little")
    if op == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if op in ("flip", "flip-header"):
        b = bytearray(data)
        b[draw(st.integers(8, 8 + n - 1) if op == "flip-header" else st.integers(0, len(b) - 1))] ^= \
            draw(st.integers(1, 255))
        return bytes(b)
    if op == "header-length":
        length = draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(max(n - 8, 0), n + 8)))
        return struct.pack("<Q", length) + data[8:]
    if op == "random":
        return draw(st.binary(max_size=128))
    if op == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if op == "empty":
        return b""
    return data


def weights_bytes(draw, tensors: dict[str, torch.Tensor], names, focus: str = "mixed") -> bytes:
    """A safetensors file of mutated tensors, then maybe byte-level damage."""
    t = {} if focus == "hollow" else mutate_tensors(draw, tensors, names, edits(focus, "tensors"))
    t = {k: v.contiguous() for k, v in t.items()}
    mode = "maybe" if focus == "mixed" else "off" if focus != "bytes" else draw(st.sampled_from(["force", "off"]))
    return damage_safetensors(draw, save(t, metadata={"format": "pt"}), mode)


def write(draw, path: Path, data: bytes, focus: str = "mixed") -> None:
    """The file, or now and then a folder or nothing in its place."""
    if focus not in ("files", "mixed"):
        path.write_bytes(data)
        return
    where = draw(st.sampled_from(["file"] * (20 if focus == "mixed" else 2) + ["dir", "missing"]))
    if where == "file":
        path.write_bytes(data)
    elif where == "dir":
        path.mkdir()


# ----------------------------------------------------------------------------- the properties

@functools.lru_cache(maxsize=None)
def shared_model() -> tuple[Tiny, tuple]:
    m = tiny()
    return m, snapshot(m)


def _pool(files, mostly, sometimes):
    keys = sorted({k for _, t in files.values() for k in t})
    peft = [PREFIX + s for s in ("layers.0.attn.lora_A.weight", "layers.0.attn.v.base_layer.bias",
                                 "emb.base_layer.weight", "layers.0.attn.q.lora_embedding_A", "classifier.weight",
                                 "layers.0.norm.bias", "layers.0.attn.v.bias", "emb.lora_A.weight")]
    pool = keys + peft + ["prompt_embeddings", "deltas.layers.0.attn.q.lora_A", "modules.classifier.weight",
                          "deltas.layers.0.attn", "x", "deltas.", "modules.", "param/x"]
    return tensor_names(pool, mostly, sometimes)


@FUZZ
@given(st.data())
def test_fuzz_load_adapter(data):
    files = real_files("ours")
    model, clean = shared_model()
    base = data.draw(st.sampled_from(sorted(files)), label="adapter")
    raw_config, tensors = files[base]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        focus = data.draw(st.sampled_from(FOCI), label="focus")
        write(data.draw, d / "adapter_config.json", config_bytes(data.draw, raw_config, focus), focus)
        weights = weights_bytes(data.draw, tensors, _pool(files, OUR_NAMES, PEFT_NAMES_), focus)
        write(data.draw, d / "adapter.safetensors", weights, focus)
        name = data.draw(st.sampled_from([None, "fz"]), label="name")
        loaded = None
        with counted("adapter: deltatune"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = dt.load_adapter(model, d, name=name)
        if loaded is not None:
            try:
                # it loaded: the adapter holds exactly the file's tensors (cast to the model's dtype)
                state, stored = adapter_state(model, loaded), load_file(d / "adapter.safetensors")
                assert all_finite(adapters(model)[loaded].to_dict()), adapters(model)[loaded]
                assert any(loaded in w.deltas for _, w in wrappers(model)), "loaded an adapter that wraps nothing"
                assert state.keys() == stored.keys()
                for k, v in state.items():
                    assert loadable(stored[k]), f"{k}: a {stored[k].dtype} tensor or one with NaN/Inf was loaded"
                    assert torch.equal(v, stored[k].to(v.dtype)), k
            finally:
                dt.delete_adapter(model, loaded)
    assert_unchanged(model, clean)


def all_finite(value) -> bool:
    """No NaN or Inf anywhere in a config's values (alpha, dropout, alpha_pattern, ...)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(all_finite, value.values()))
    if isinstance(value, (list, tuple)):
        return all(map(all_finite, value))
    return True


def loadable(t: torch.Tensor) -> bool:
    """What a loaded file may hold (the model has no integer buffers): finite floating point."""
    return t.is_floating_point() and bool(torch.isfinite(t.float()).all())


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


# PEFT's tensor names -> ours, written out here again (not imported) so the check is independent
PEFT_NAMES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_embedding_A": "lora_A",
              ".lora_embedding_B": "lora_B", ".lora_magnitude_vector": "magnitude", ".ia3_l": "ia3_l",
              ".base_layer.bias": "lora_bias"}


def check_peft_state(state: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """The loaded adapter holds the file's tensors: each PEFT tensor at its place in ours (LoRA
    factors as 2-D views, IA3 vectors flat, PEFT's absolute biases as shifts from the base bias,
    saved modules as module copies), and nothing else but zero bias shifts of layers without a
    bias (where PEFT trains none)."""
    covered = set()
    for k, v in stored.items():
        if k.endswith(".base_layer.weight"):        # must be the base's own weight: nothing to load
            assert torch.equal(v.to(base[k.replace(".base_layer", "")].dtype), base[k.replace(".base_layer", "")])
            continue
        suffix = next((x for x in PEFT_NAMES if k.endswith(x)), None)
        if suffix is not None:
            mod = k[: -len(suffix)]
            key = f"deltas.{mod}.{PEFT_NAMES[suffix]}"
            assert key in state, (k, sorted(state))
            want = v.to(state[key].dtype)
            if suffix == ".base_layer.bias":
                want = want - base[f"{mod}.bias"]
            want = want.reshape(-1) if suffix in (".ia3_l", ".base_layer.bias", ".lora_magnitude_vector") else \
                want.reshape(want.shape[0], -1)
        elif k == "prompt_embeddings":
            (key,) = [n for n in state if n.endswith(".prompt")]
            want = v.to(state[key].dtype)
        elif f"deltas.{k}" in state:                # bias="all": a bias shift of another layer
            key = f"deltas.{k}"
            want = v.to(state[key].dtype) - base[k]
        else:
            key = f"modules.{k}"
            assert key in state, (k, sorted(state))
            want = v.to(state[key].dtype)
        assert torch.equal(state[key], want), key
        covered.add(key)
    for key in set(state) - covered:
        mod = key[len("deltas."):-len(".lora_bias")]
        assert key.endswith(".lora_bias") and f"{mod}.bias" not in base and not state[key].any(), key


@FUZZ
@given(st.data())
def test_fuzz_import_peft(data):
    files = real_files("peft")
    model, clean = shared_model()
    base = data.draw(st.sampled_from(sorted(files)), label="adapter")
    raw_config, tensors = files[base]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "in"
        d.mkdir()
        focus = data.draw(st.sampled_from(FOCI), label="focus")
        write(data.draw, d / "adapter_config.json", config_bytes(data.draw, raw_config, focus), focus)
        weights = weights_bytes(data.draw, tensors, _pool(files, PEFT_NAMES_, OUR_NAMES), focus)
        write(data.draw, d / "adapter_model.safetensors", weights, focus)
        loaded = None
        with counted("adapter: peft"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = dt.import_peft(model, d, name="fz")
        if loaded is not None:
            try:
                stored = {_strip(k): v for k, v in load_file(d / "adapter_model.safetensors").items()}
                assert all(map(loadable, stored.values())), "a non-float tensor or one with NaN/Inf was loaded"
                assert all_finite(adapters(model)[loaded].to_dict()), adapters(model)[loaded]
                assert any(loaded in w.deltas for _, w in wrappers(model)), "loaded an adapter that wraps nothing"
                check_peft_state(adapter_state(model, loaded), stored, clean[0])
            finally:
                dt.delete_adapter(model, loaded)
    assert_unchanged(model, clean)
