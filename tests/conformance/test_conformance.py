"""The conformance suite (DESIGN.md, Conformance): every registered method, with each of its
variants, on every model of ``cases.MODELS`` it applies to. A method is covered by being
registered.

Each case's lifecycle runs once (``run_case``, cached): build, attach, calibrate, train a few
steps, save, merge, unmerge, reload, unload both ways, mix adapters per sample. Its parts are
asserted by separate tests, each against something computed here independently of the code
under test: the wrapped modules from the test's statement of the method's targets
(expected_targets.py), the trainable count from the paper's formula (formulas.py), the file
against the live model's trainable tensors and persistent buffers, merged and mixed outputs
against the plain unmerged, single-adapter ones, unloaded models against a pristine copy.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import traceback

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltatune as dt
from cases import MODELS, NOT_APPLICABLE, REFUSED_CASES, RUN_CASES, STEPS, Case, config_kwargs, fresh_model, loss, model_input, output
from deltatune.core import wrapper
from deltatune.core.wrapper import DeltaLayer, ModuleCopies
from expected_targets import SHARED_CHILD, NoSemantics, expected_targets, matches, walk, wrapped_by
from formulas import FORMULAS

ADAPTER = "a"


class Record(dict):
    """What one case's lifecycle produced, by name; ``stopped`` says where it failed, if it did."""

    def need(self, *keys: str):
        if self.get("skip"):
            pytest.skip(self["skip"])
        for key in keys:
            if key not in self:
                pytest.fail(f"the lifecycle stopped before {key!r} could be measured: {self.get('stopped')}",
                            pytrace=False)
        return [self[k] for k in keys] if len(keys) > 1 else self[keys[0]]


# ----------------------------------------------------------------------------- reading the live model

def adapter_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The file key each of the adapter's trainable tensors and persistent buffers should have, per
    the file format (core/io.py docstring): ``deltas.<module>.<tensor>`` for a wrapped module,
    ``modules.<module>.<tensor>`` for a trainable module copy, ``shared.<tensor>`` for the
    adapter-level module. Aliases (one tensor under two names) are all listed."""
    owners = []
    for _, logical, m in walk(model):
        if isinstance(m, DeltaLayer) and adapter in m.deltas:
            owners.append((f"deltas.{logical}.", m.deltas[adapter]))
        if isinstance(m, ModuleCopies) and adapter in m.copies:
            owners.append((f"modules.{logical}.", m.copies[adapter]))
    holder = getattr(model, SHARED_CHILD, None)
    if holder is not None and adapter in holder:
        owners.append(("shared.", holder[adapter]))
    found = {}
    for prefix, owner in owners:
        for sub_name, sub in owner.named_modules(remove_duplicate=False):
            dot = f"{sub_name}." if sub_name else ""
            for n, p in sub._parameters.items():
                if p is not None and p.requires_grad:
                    found[prefix + dot + n] = p
            for n, b in sub._buffers.items():
                if b is not None and n not in sub._non_persistent_buffers_set:
                    found[prefix + dot + n] = b
    return found


def outside_trainable(model: nn.Module, adapter: str) -> list[str]:
    """Trainable parameters that are not the adapter's own (a frozen tensor left trainable)."""
    own = {id(t) for t in adapter_tensors(model, adapter).values()}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in own]


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors (parameters, persistent buffers) under their pre-wrapping names,
    leaving the adapters out: what ``pristine.state_dict()`` holds for an unadapted model."""
    state = {}
    for _, logical, m in walk(model):
        if isinstance(m, (DeltaLayer, ModuleCopies)):
            continue
        dot = f"{logical}." if logical else ""
        for n, p in m._parameters.items():
            if p is not None:
                state[dot + n] = p.detach()
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                state[dot + n] = b
    return state


def differences(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are absent, extra or not bit-for-bit equal."""
    diff = sorted(set(state) ^ set(reference))
    diff += [k for k in sorted(set(state) & set(reference)) if not (
        state[k].shape == reference[k].shape and state[k].dtype == reference[k].dtype
        and torch.equal(state[k], reference[k]))]
    return diff


def structure(model: nn.Module) -> list[tuple]:
    """Every module's name and type, and how many hooks it carries."""
    return [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
            for n, m in model.named_modules()]


def head_parameters(pristine: nn.Module, cfg) -> int:
    """The trainable modules' parameters (a new head), counted on the pristine model."""
    seen, total = set(), 0
    for name, module in pristine.named_modules():
        if name and any(matches(name, p) for p in cfg.trainable_modules):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def file_report(path: str, live: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The saved tensors against the live adapter's: every live tensor saved once (aliases count
    as one tensor), nothing else saved, and each saved value equal to the live one."""
    with safe_open(path, framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}

    def identity(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))

    groups: dict[tuple, list[str]] = {}
    for k, t in live.items():
        groups.setdefault(identity(t), []).append(k)
    report = {"foreign": sorted(set(saved) - set(live)), "missing": [], "twice": [], "unequal": []}
    for names in groups.values():
        held = [k for k in names if k in saved]
        if not held:
            report["missing"].append(names[0])
        elif len(held) > 1:
            report["twice"].append(" = ".join(held))
    for k in set(saved) & set(live):
        if saved[k].shape != live[k].shape or not torch.equal(saved[k].to(live[k].dtype), live[k].detach()):
            report["unequal"].append(k)
    return report


@contextlib.contextmanager
def fast_paths(enabled: bool):
    previous = wrapper.FAST_PATHS
    wrapper.FAST_PATHS = enabled
    try:
        yield
    finally:
        wrapper.FAST_PATHS = previous


def _model_type(model: nn.Module) -> str | None:
    return next((m.config.model_type for m in model.modules()
                 if getattr(getattr(m, "config", None), "model_type", None)), None)


def _scaled(diff: float, scale: float) -> float:
    return diff / max(1.0, scale)


# ----------------------------------------------------------------------------- the lifecycle

@functools.lru_cache(maxsize=None)
def run_case(case: Case) -> Record:
    r = Record()
    try:
        _lifecycle(case, r)
    except Exception:       # recorded, so that each test reports what it could not measure
        r["stopped"] = traceback.format_exc(limit=-6)
    return r


def _lifecycle(case: Case, r: Record) -> None:
    name, key = case.method, case.key
    mc = MODELS[key]
    if mc.needs and not hasattr(dt, mc.needs):
        r["skip"] = f"dt.{mc.needs} does not exist yet (another engineer is adding it)"
        return
    refused = [why for (m, v, k), why in NOT_APPLICABLE.items()
               if m == name and k == key and (v in [f"{f}={x}" for f, x in case.variant_dict.items()]
                                              or (v == "defaults" and not case.variant_dict))]
    if refused:
        r["skip"] = refused[0]
        return
    method = dt.get_method(name)
    kw = config_kwargs(name, case.variant_dict, key)
    batch, target = mc.batch()
    pristine = fresh_model(key)
    model = fresh_model(key)
    with torch.no_grad():
        ref = output(model, key, batch)
    cfg = dt.config(name, **kw)
    try:
        targets = expected_targets(name, cfg, mc.family, pristine)
        r["expected_wrapped"] = set(targets)
    except NoSemantics as e:
        targets, r["no_semantics"] = None, str(e)
    formula = FORMULAS.get(name)
    if formula is None:
        r["no_formula"] = (f"tests/conformance/formulas.py has no parameter-count formula for {name!r}: add a function "
                           f"{name}(model, cfg, targets) with the paper's count and list it in FORMULAS")
    elif targets is not None:
        r["expected_trainable"] = formula(pristine, cfg, targets) + head_parameters(pristine, cfg)

    torch.manual_seed(0)
    dt.attach(model, cfg, name=ADAPTER)
    r["wrapped"] = wrapped_by(model, ADAPTER)
    r["trainable"] = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    r["trainable_outside"] = outside_trainable(model, ADAPTER)
    if method.calibrate is not None:    # the case's own loss: classifiers' outputs carry none
        dt.calibrate(model, [batch], loss_fn=lambda m, b: loss(m, key, b, target))
    with torch.no_grad():
        r["init_diff"] = (output(model, key, batch) - ref).abs().max().item()
        loss_before = loss(model, key, batch, target).item()

    model.train()
    lr = method.lr_by_model.get(_model_type(model), method.default_lr)
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=lr))
    got_grad: dict[str, bool] = {}
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        total = loss(model, key, batch, target) + dt.auxiliary_loss(model)
        total.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                got_grad[n] = got_grad.get(n, False) or (p.grad is not None and bool(p.grad.abs().sum() > 0))
        opt.step()
        dt.step_hook(model, step)
    model.eval()
    with torch.no_grad():
        r["losses"] = (loss_before, loss(model, key, batch, target).item())
        unmerged = output(model, key, batch)
    r["no_grad"] = [n for n, ok in got_grad.items() if not ok]
    r["trained_diff"] = (unmerged - ref).abs().max().item()

    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp, name=ADAPTER)
        r["file"] = file_report(f"{tmp}/adapter.safetensors", adapter_tensors(model, ADAPTER))

        pristine_state = pristine.state_dict()
        r["base_before_merge"] = differences(base_state(model), pristine_state)
        if method.foldable:
            dt.merge(model, **mc.merge_options)
            with torch.no_grad():
                merged = output(model, key, batch)
            r["merge_diff"] = _scaled((merged - unmerged).abs().max().item(), unmerged.abs().max().item())
            r["weights_changed"] = bool(differences(base_state(model), pristine_state))
            dt.unmerge(model)
            r["after_unmerge"] = differences(base_state(model), pristine_state)
        else:
            with pytest.raises(dt.DeltatuneError) as refused:
                dt.merge(model, **mc.merge_options)
            r["merge_refusal"] = str(refused.value)
            r["after_refusal"] = differences(base_state(model), pristine_state)

        fresh = fresh_model(key)
        dt.load_adapter(fresh, tmp, name="b")
        with torch.no_grad():
            r["reload_diff"] = (output(fresh, key, batch) - unmerged).abs().max().item()

        dt.unload(fresh, merge=False)
        with torch.no_grad():
            r["unload_plain_output"] = (output(fresh, key, batch) - ref).abs().max().item()
        r["unload_plain_state"] = differences(fresh.state_dict(), pristine_state)
        r["unload_plain_structure"] = structure(fresh) == structure(pristine)

        if method.foldable:
            dt.unload(model, merge=True, **mc.merge_options)
            with torch.no_grad():
                r["unload_merged_diff"] = _scaled((output(model, key, batch) - unmerged).abs().max().item(),
                                                  unmerged.abs().max().item())
            # names and hooks as the pristine model's; a dequantised layer may change its type
            r["unload_merged_structure"] = [(n, *hooks) for n, _, *hooks in structure(model)] == [
                (n, *hooks) for n, _, *hooks in structure(pristine)] and not any(
                isinstance(m, (DeltaLayer, ModuleCopies)) for m in model.modules())
        else:
            with pytest.raises(dt.DeltatuneError):
                dt.unload(model, merge=True, **mc.merge_options)
            r["unload_merged_refused"] = True

        _mixed_batches(case, method, kw, tmp, batch, r)


def _mixed_batches(case: Case, method, kw: dict, tmp: str, batch: dict, r: Record) -> None:
    """Sample i runs adapter names[i]: each row must equal that adapter run alone on the whole
    batch (plain path, FAST_PATHS off), None rows the base model."""
    key = case.key
    model = fresh_model(key)
    dt.load_adapter(model, tmp, name="a")
    n = next(iter(batch.values())).shape[0]
    names = (["a", "b", None] * n)[:n]
    if not method.per_sample_safe:
        with pytest.raises(dt.DeltatuneError) as refused:
            with dt.per_sample_adapters(model, [x if x != "b" else "a" for x in names]):
                output(model, key, batch)
        r["mixed_refusal"] = str(refused.value)
        return
    torch.manual_seed(1)
    dt.attach(model, dt.config(case.method, **kw), name="b")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():       # b away from its initialisation, so that a, b and the base all differ
        for _, p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    alone = {}
    with torch.no_grad(), fast_paths(False):
        for adapter in ("a", "b"):
            dt.set_active(model, [adapter])
            alone[adapter] = output(model, key, batch)
        with dt.disabled(model):
            alone[None] = output(model, key, batch)
        expected = torch.stack([alone[x][i] for i, x in enumerate(names)])
    with torch.no_grad(), dt.per_sample_adapters(model, names):
        mixed = output(model, key, batch)
    scale = expected.abs().max().item()
    r["mixed_diff"] = _scaled((mixed - expected).abs().max().item(), scale)
    r["mixed_distinct"] = min((alone["a"] - alone["b"]).abs().max().item(),
                              (alone["a"] - alone[None]).abs().max().item())


# ----------------------------------------------------------------------------- the checks

def _record(case: Case) -> Record:
    r = run_case(case)
    if r.get("skip"):
        pytest.skip(r["skip"])
    return r


@pytest.mark.parametrize("case", RUN_CASES)
def test_wraps_the_modules_its_targets_name(case):
    r = _record(case)
    if "no_semantics" in r:
        pytest.fail(r["no_semantics"], pytrace=False)
    expected, wrapped = r.need("expected_wrapped", "wrapped")
    assert wrapped == expected, (f"missing {sorted(expected - wrapped)[:6]}, not expected "
                                 f"{sorted(wrapped - expected)[:6]}")


@pytest.mark.parametrize("case", RUN_CASES)
def test_only_the_adapter_trains_and_its_count_is_the_papers_formula(case):
    r = _record(case)
    assert not r.need("trainable_outside"), f"trainable tensors outside the adapter: {r['trainable_outside'][:6]}"
    if "no_formula" in r:
        pytest.fail(r["no_formula"], pytrace=False)
    if "no_semantics" in r:
        pytest.fail(r["no_semantics"], pytrace=False)
    trainable, expected = r.need("trainable", "expected_trainable")
    assert trainable == expected, f"{trainable} trainable, the formula says {expected}"


@pytest.mark.parametrize("case", RUN_CASES)
def test_the_file_holds_exactly_the_trainable_tensors_and_saved_buffers(case):
    report = _record(case).need("file")
    assert not report["foreign"], f"saved but not the adapter's trainable tensors or buffers: {report['foreign'][:6]}"
    assert not report["missing"], f"not saved: {report['missing'][:6]}"
    assert not report["twice"], f"one tensor saved under several keys: {report['twice'][:6]}"
    assert not report["unequal"], f"saved values differ from the live ones: {report['unequal'][:6]}"


@pytest.mark.parametrize("case", RUN_CASES)
def test_init_gradients_and_training(case):
    r = _record(case)
    method = dt.get_method(case.method)
    init_diff, no_grad, (before, after), trained = r.need("init_diff", "no_grad", "losses", "trained_diff")
    if method.identity_at_init:
        assert init_diff < 1e-4, f"the output changed at initialisation by {init_diff}"
    else:
        assert init_diff > 1e-4, "a method that changes the output at init changed nothing: is it attached?"
    assert not no_grad, f"no gradient reached {no_grad[:6]}"
    assert after < before, f"loss {before} -> {after} after {STEPS} steps"
    assert trained > 1e-4, "training did not change the output"


@pytest.mark.parametrize("case", RUN_CASES)
def test_merge_equals_unmerged_and_unmerge_restores_the_base(case):
    r = _record(case)
    assert not r.need("base_before_merge"), f"the frozen base changed before merging: {r['base_before_merge'][:6]}"
    if dt.get_method(case.method).foldable:
        merge_diff, changed, after = r.need("merge_diff", "weights_changed", "after_unmerge")
        assert changed, "merge changed no base weight"
        assert merge_diff <= 1e-5, f"merged output differs from unmerged by {merge_diff} (relative)"
        assert not after, f"unmerge did not restore bit-for-bit: {after[:6]}"
    else:
        assert r.need("merge_refusal")
        assert not r.need("after_refusal"), "a refused merge changed the base"


@pytest.mark.parametrize("case", RUN_CASES)
def test_unload_returns_the_original_or_the_merged_model(case):
    r = _record(case)
    output_diff, state, same = r.need("unload_plain_output", "unload_plain_state", "unload_plain_structure")
    assert same, "unload(merge=False) left other modules or hooks than the pristine model's"
    assert not state, f"unload(merge=False): tensors differ from the pristine model's: {state[:6]}"
    assert output_diff == 0, f"unload(merge=False) output differs from the base by {output_diff}"
    if dt.get_method(case.method).foldable:
        diff, same = r.need("unload_merged_diff", "unload_merged_structure")
        assert same, "unload(merge=True) left other modules or hooks than the pristine model's"
        assert diff <= 1e-5, f"unload(merge=True) output differs from the unmerged adapter's by {diff}"
    else:
        assert r.need("unload_merged_refused")


@pytest.mark.parametrize("case", RUN_CASES)
def test_save_then_load_into_a_fresh_model_reproduces_the_outputs(case):
    diff = _record(case).need("reload_diff")
    assert diff < 1e-6, diff


@pytest.mark.parametrize("case", RUN_CASES)
def test_mixed_batches_equal_each_adapter_alone(case):
    r = _record(case)
    if not dt.get_method(case.method).per_sample_safe:
        assert r.need("mixed_refusal")
        return
    diff, distinct = r.need("mixed_diff", "mixed_distinct")
    assert distinct > 1e-4, "adapters a, b and the base give the same output: the check could not fail"
    assert diff <= 1e-5, f"mixed batch differs from each adapter run alone by {diff} (relative)"


@pytest.mark.parametrize("case", REFUSED_CASES)
def test_attach_is_refused_where_the_method_does_not_apply(case):
    """The test's statement of the method's targets selects nothing here: attach must say so, and
    leave the model as it was."""
    mc = MODELS[case.key]
    if mc.needs and not hasattr(dt, mc.needs):
        pytest.skip(f"dt.{mc.needs} does not exist yet")
    model = fresh_model(case.key)
    before = structure(model)
    with pytest.raises(dt.DeltatuneError):
        dt.attach(model, dt.config(case.method, **config_kwargs(case.method, case.variant_dict, case.key)))
    assert structure(model) == before and not wrapped_by(model, "default"), "a refused attach changed the model"


# ----------------------------------------------------------------------------- layer kinds

class EveryKind(nn.Module):
    """One layer of each kind a method may or may not support."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.embedding = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.conv1d_gpt2 = Conv1D(8, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())      # a whole sub-layer


KINDS = ("linear", "conv", "embedding", "norm", "conv1d_gpt2", "block")


@pytest.mark.parametrize("name,kind", [pytest.param(n, k, id=f"{n}-{k}") for n in dt.available_methods()
                                       for k in KINDS if k not in dt.get_method(n).kinds])
def test_attaching_to_a_layer_kind_the_method_does_not_support_raises(name, kind):
    model = EveryKind()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the message names the layer, or (input methods) that the toy has no input embedding to use
    with pytest.raises(dt.DeltatuneError, match=f"{kind}|input embedding"):
        dt.attach(model, dt.config(name, targets=[kind]))
    assert not wrapped_by(model, "default") and not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert not differences(model.state_dict(), before)


# ----------------------------------------------------------------------------- fast paths

FAST = ("fused_forward", "grouped_forward")
FAST_MODELS = ("llama", "gpt2", "bert")


def _fast_classes(model: nn.Module) -> set[type]:
    return {type(d) for _, _, m in walk(model) if isinstance(m, DeltaLayer) for d in m.deltas.values()
            if any(callable(getattr(type(d), a, None)) for a in FAST)}


def _count_fast_calls(monkeypatch, classes: set[type]) -> list[int]:
    """Count the fast-path calls that returned an output (rather than declining with None)."""
    calls = [0]
    for cls in classes:
        for attr in FAST:
            raw = cls.__dict__.get(attr)
            original = getattr(cls, attr, None)
            if original is None:
                continue
            if isinstance(raw, staticmethod) or (raw is None and isinstance(
                    next((c.__dict__[attr] for c in cls.__mro__ if attr in c.__dict__), None), staticmethod)):
                def counted(*args, _f=original, **kwargs):
                    out = _f(*args, **kwargs)
                    calls[0] += out is not None
                    return out
                monkeypatch.setattr(cls, attr, staticmethod(counted))
            else:
                def counted_method(self, *args, _f=original, **kwargs):
                    out = _f(self, *args, **kwargs)
                    calls[0] += out is not None
                    return out
                monkeypatch.setattr(cls, attr, counted_method)
    return calls


def _fast_cases():
    out = []
    for n in dt.available_methods():
        fields = set(dt.get_method(n).config_cls.__dataclass_fields__)
        for v in ({}, {"dropout": 0.2}, {"bias": "lora_only"}):
            if set(v) <= fields:
                for key in FAST_MODELS:
                    out.append(pytest.param(n, v, key, id=f"{n}{v}-{key}"))
    return out


@pytest.mark.parametrize("name,variant,key", _fast_cases())
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fast_paths_equal_the_plain_definition(name, variant, key, autocast, monkeypatch):
    """Outputs and gradients of every fused path equal the plain per-op computation, with the same
    dropout mask (same RNG state). Runs only where the method has a fast path, and only counts if
    that path actually produced outputs (a comparison of the plain path with itself cannot fail)."""
    mc = MODELS[key]
    kw = config_kwargs(name, variant, key)
    probe = fresh_model(key)
    try:
        dt.attach(probe, dt.config(name, **kw))
    except dt.DeltatuneError as e:
        pytest.skip(f"{name} does not attach to {key}: {e}")
    classes = _fast_classes(probe)
    if not classes:
        pytest.skip(f"{name} has no fast path: nothing to compare with its plain definition")
    calls = _count_fast_calls(monkeypatch, classes)
    batch, target = mc.batch()
    results = []
    for fast in (True, False):
        model = fresh_model(key)
        torch.manual_seed(0)        # the same initialisation for both runs
        dt.attach(model, dt.config(name, **kw))
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for _, p in dt.trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.train()
        torch.manual_seed(11)
        with fast_paths(fast), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss(model, key, batch, target)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in dt.trainable_parameters(model)}))
        if fast and calls[0] == 0:
            pytest.skip(f"{name}'s fast path declined every layer of {key} here: nothing to compare")
    (l1, g1), (l2, g2) = results
    assert g1.keys() == g2.keys()
    if not autocast:
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)
        return
    # bfloat16 keeps 8 bits of mantissa: the two paths round in different places
    torch.testing.assert_close(l1, l2, rtol=2e-2, atol=1e-3)
    for n in g1:
        assert g1[n].dtype == torch.float32, n
        err = (g1[n] - g2[n]).norm() / g2[n].norm().clamp_min(1e-12)
        assert err < 0.05, (n, float(err))
