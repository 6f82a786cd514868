"""state_dict / load_state_dict: one {state, param_groups} dict with the base
optimizer's entries and ours side by side, per-parameter tensors (never the
flat buffers, never the backup), loading into the live buffers, bit-identical
resume, and loading a checkpoint of the common SAM wrapper.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from helpers import (
    MODES, TRAINING_STATE_KEYS, TRAINING_VARIANTS, assert_params_close, assert_same, loss_of, make_model, snapshot,
)
from helpers import batch as batch_of
from presam_kernels import SAM, InfoSAM


def batch(k: int, n: int = 16):
    return batch_of(k, n, first_seed=4000)


def two_step(model, opt, b):
    loss_of(model, b).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, b).backward()
    opt.second_step(zero_grad=True)


VARIANTS = TRAINING_VARIANTS
WITH_EMA = [v for v in VARIANTS if v.startswith("InfoSAM")]


def through_disk(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def owns_its_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


# ---------------------------------------------------------------------------
# layout of the saved dict
# ---------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_holds_base_entries_and_ours_side_by_side_per_parameter(variant, flatten):
    build, keys = VARIANTS[variant], TRAINING_STATE_KEYS[variant]
    model = make_model()
    opt = build(model.parameters(), flatten)
    for k in range(2):
        two_step(model, opt, batch(k))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    params = list(model.parameters())
    assert sorted(sd["state"]) == list(range(len(params)))
    assert [i for g in sd["param_groups"] for i in g["params"]] == list(range(len(params)))
    assert sd["param_groups"][0]["rho"] == 0.05 and "lr" in sd["param_groups"][0]
    for i, p in enumerate(params):
        entry = sd["state"][i]
        assert keys <= set(entry), f"state[{i}] lacks {keys - set(entry)}"
        assert not any("backup" in k or k in ("old_p", "e_w") for k in entry), f"transient entry saved: {sorted(entry)}"
        for k, v in entry.items():
            if torch.is_tensor(v):
                assert owns_its_storage(v), f"state[{i}][{k!r}] is a view of a bigger buffer"
                if k in opt.state[p]:
                    assert torch.equal(v, opt.state[p][k])
        if "grad_ema" in entry:
            assert entry["grad_ema"].shape == p.shape
            assert torch.count_nonzero(entry["grad_ema"]) > 0


@MODES
@pytest.mark.parametrize("variant", WITH_EMA)
def test_saved_grad_ema_is_a_copy_not_the_live_buffer(variant, flatten):
    build = VARIANTS[variant]
    model = make_model()
    opt = build(model.parameters(), flatten)
    two_step(model, opt, batch(0))
    live = [opt.state[p]["grad_ema"].clone() for p in model.parameters()]
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["grad_ema"].fill_(123.0)
    for p, v in zip(model.parameters(), live):
        assert torch.equal(opt.state[p]["grad_ema"], v)


@MODES
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_leaves_the_live_state_untouched(variant, flatten):
    build = VARIANTS[variant]
    model, twin_model = make_model(), make_model()
    opt, twin = build(model.parameters(), flatten), build(twin_model.parameters(), flatten)
    two_step(model, opt, batch(0))
    two_step(twin_model, twin, batch(0))
    keys = [set(opt.state[p]) for p in model.parameters()]
    live = [opt.state[p].get("grad_ema") for p in model.parameters()]
    opt.state_dict()
    assert [set(opt.state[p]) for p in model.parameters()] == keys, "state_dict() added or removed live entries"
    for p, view in zip(model.parameters(), live):
        assert opt.state[p].get("grad_ema") is view, "state_dict() replaced the live grad_ema view"
    two_step(model, opt, batch(1))
    two_step(twin_model, twin, batch(1))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p.detach(), q.detach())
        for key, value in twin.state[q].items():
            assert torch.equal(opt.state[p][key], value), f"after state_dict(), state[...][{key!r}] is stale"


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("variant", WITH_EMA)
def test_load_state_dict_copies_into_the_live_grad_ema_buffers(variant, flatten):
    build = VARIANTS[variant]
    src_model = make_model()
    src = build(src_model.parameters(), flatten)
    for k in range(2):
        two_step(src_model, src, batch(k))
    sd = through_disk(src.state_dict())

    model = make_model(seed=1)
    model.load_state_dict(src_model.state_dict())
    opt = build(model.parameters(), flatten)
    two_step(model, opt, batch(7))  # our buffers exist and hold something else
    model.load_state_dict(src_model.state_dict())
    views_before = [opt.state[p]["grad_ema"] for p in model.parameters()]
    opt.load_state_dict(sd)
    views_after = [opt.state[p]["grad_ema"] for p in model.parameters()]
    for i, (before, after) in enumerate(zip(views_before, views_after)):
        assert torch.equal(after, sd["state"][i]["grad_ema"])
        assert torch.equal(before, after), "a view taken before load_state_dict went stale"

    # Continue, and compare with a run that never saved anything.
    twin_model = make_model()
    twin = build(twin_model.parameters(), flatten)
    for k in range(3):
        two_step(twin_model, twin, batch(k))
    two_step(model, opt, batch(2))
    for p, q, after in zip(model.parameters(), twin_model.parameters(), views_after):
        assert torch.equal(after, opt.state[p]["grad_ema"]), "state['grad_ema'] is not the live buffer"
        assert torch.equal(opt.state[p]["grad_ema"], twin.state[q]["grad_ema"])
        assert torch.equal(p.detach(), q.detach())


@MODES
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_from_state_dict_is_bit_identical_to_an_uninterrupted_run(variant, flatten):
    build = VARIANTS[variant]
    steps, cut = 5, 2

    model = make_model()
    opt = build(model.parameters(), flatten)
    for k in range(steps):
        two_step(model, opt, batch(k))

    first = make_model()
    first_opt = build(first.parameters(), flatten)
    for k in range(cut):
        two_step(first, first_opt, batch(k))
    ckpt = through_disk({"model": first.state_dict(), "opt": first_opt.state_dict()})
    del first, first_opt

    resumed = make_model(seed=123)  # a different init: everything must come from the checkpoint
    resumed_opt = build(resumed.parameters(), flatten)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    for k in range(cut, steps):
        two_step(resumed, resumed_opt, batch(k))

    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"{name} differs after resuming"
        assert set(opt.state[p]) == set(resumed_opt.state[q])
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, resumed_opt.state[q][key]), f"state[{name}][{key!r}] differs"
            else:
                assert value == resumed_opt.state[q][key]


# ---------------------------------------------------------------------------
# copies of the whole optimizer
# ---------------------------------------------------------------------------
@MODES
@pytest.mark.parametrize("variant", WITH_EMA[:1] + ["SAM+SGD"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_model_and_optimizer_continues_like_the_original(variant, flatten, how):
    """copy.deepcopy / pickle of (model, optimizer) mid-training: the copy
    steps on, bit for bit like the original, and leaves the original alone
    (flat buffers and parameter views stay shared within the copy)."""
    build = VARIANTS[variant]
    model = make_model()
    opt = build(model.parameters(), flatten)
    for k in range(2):
        two_step(model, opt, batch(k))
    if how == "deepcopy":
        twin, twin_opt = copy.deepcopy((model, opt))
    else:
        twin, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    frozen = [p.detach().clone() for p in model.parameters()]
    for k in range(2, 5):
        two_step(twin, twin_opt, batch(k))
    for p, q in zip(model.parameters(), frozen):
        assert torch.equal(p.detach(), q), "stepping the copy moved the original"
    for k in range(2, 5):
        two_step(model, opt, batch(k))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"{name}: the copy diverged from the original"


@MODES
def test_an_infosam_pickled_before_ema_ready_unpickles_and_continues_bit_for_bit(flatten):
    """An optimizer pickled before the EMA's ready flag became one EmaReady
    object held the flags as a {device: flag} dict beside _host_ema_started:
    it unpickles into the same flags and steps on like the original."""
    build = VARIANTS[WITH_EMA[0]]
    model = make_model()
    opt = build(model.parameters(), flatten)
    for k in range(2):
        two_step(model, opt, batch(k))
    twin, twin_opt = copy.deepcopy((model, opt))
    legacy = twin_opt.__getstate__()  # as the earlier code pickled it
    legacy["_ema_ready"], legacy["_host_ema_started"] = dict(legacy["_ema_ready"].flags), True
    legacy.update(_first_found_inf=None, _switched=[], _pending_perturbed=None, _pending_storage=None)
    old_opt = type(opt).__new__(type(opt))
    old_opt.__setstate__(legacy)
    twin, old_opt = pickle.loads(pickle.dumps((twin, old_opt)))
    for k in range(2, 5):
        two_step(model, opt, batch(k))
        two_step(twin, old_opt, batch(k))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"{name}: the unpickled optimizer diverged"


# ---------------------------------------------------------------------------
# a checkpoint of the common SAM wrapper
# ---------------------------------------------------------------------------
class CommonSAM(torch.optim.Optimizer):
    """A minimal copy of the SAM wrapper most PyTorch code carries."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


@MODES
def test_state_dict_of_the_common_sam_wrapper_loads(flatten):
    theirs_model = make_model()
    theirs = CommonSAM(theirs_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05)
    for k in range(2):
        two_step(theirs_model, theirs, batch(k))
    sd = through_disk(theirs.state_dict())
    assert all("old_p" in entry for entry in sd["state"].values())

    model = make_model(seed=5)
    model.load_state_dict(theirs_model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, flatten=flatten)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["lr"] == 0.05
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert not any("old_p" in opt.state[p] for p in model.parameters() if p in opt.state)

    for k in range(2, 4):
        two_step(model, opt, batch(k))
        two_step(theirs_model, theirs, batch(k))
    assert_params_close(model, theirs_model)
    # and ours saves and reloads after that, without their transient entries
    again = SAM(make_model(seed=9).parameters(), torch.optim.SGD, rho=0.05, lr=0.2, flatten=flatten)
    again.load_state_dict(through_disk(opt.state_dict()))
    assert again.param_groups[0]["rho"] == 0.1


# ---------------------------------------------------------------------------
# a checkpoint that does not fit: refused before anything is loaded
# ---------------------------------------------------------------------------
BAD_ENTRIES = {
    "ema_broadcastable": ("grad_ema", lambda v: torch.zeros(1, 1)),
    "ema_wrong_shape": ("grad_ema", lambda v: torch.zeros(3, 3)),
    "ema_integer": ("grad_ema", lambda v: v.to(torch.int64)),
    "ema_ready_two_values": ("grad_ema_ready", lambda v: torch.ones(2)),
    "momentum_wrong_shape": ("momentum_buffer", lambda v: torch.zeros(3, 3)),
}


@MODES
@pytest.mark.parametrize("bad", list(BAD_ENTRIES))
def test_load_state_dict_refuses_a_bad_entry_before_loading_anything(bad, flatten):
    """A grad_ema (or base state) that does not fit its parameter: a ValueError
    naming it, with the live optimizer (base state included) as it was."""
    build = VARIANTS["InfoSAM+SGD"]
    src_model, model = make_model(), make_model(seed=1)
    src = build(src_model.parameters(), flatten)
    opt = build(model.parameters(), flatten)
    for k in range(2):
        two_step(src_model, src, batch(k))
        two_step(model, opt, batch(k + 5))
    sd = src.state_dict()
    key, corrupt = BAD_ENTRIES[bad]
    sd["state"][0] = {**sd["state"][0], key: corrupt(sd["state"][0][key])}
    sd["state"][1] = {**sd["state"][1], "momentum_buffer": sd["state"][1]["momentum_buffer"] + 1}
    before = snapshot(opt, list(model.parameters()))
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, list(model.parameters())))


@MODES
def test_a_checkpoint_without_ema_resets_the_ema_and_its_ready_flag(flatten):
    """InfoSAM loading a checkpoint that has no grad_ema (saved by SAM, say):
    the next step is a first step (plain SAM), as in a fresh InfoSAM."""
    build = VARIANTS["InfoSAM+SGD"]
    model, fresh_model = make_model(), make_model()
    opt = build(model.parameters(), flatten)
    for k in range(3):
        two_step(model, opt, batch(k))
    sd = SAM(make_model().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9).state_dict()
    fresh = build(fresh_model.parameters(), flatten)
    fresh_model.load_state_dict(model.state_dict())
    opt.load_state_dict(sd)
    fresh.load_state_dict(sd)
    for k in range(3, 5):
        two_step(model, opt, batch(k))
        two_step(fresh_model, fresh, batch(k))
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p.detach(), q.detach()), "the previous run's EMA survived the load"


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_common_wrapper_checkpoint_with_another_adaptive_flag_is_refused(adaptive):
    """Their group says adaptive=True: SAM(adaptive=False) would ignore it, so it refuses."""
    theirs_model = make_model()
    theirs = CommonSAM(theirs_model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.05)
    two_step(theirs_model, theirs, batch(0))
    sd = through_disk(theirs.state_dict())
    model = make_model()
    mismatched = SAM(model.parameters(), torch.optim.SGD, adaptive=not adaptive, lr=0.2)
    before = snapshot(mismatched, list(model.parameters()))
    with pytest.raises(ValueError, match="adaptive"):
        mismatched.load_state_dict(sd)
    assert_same(before, snapshot(mismatched, list(model.parameters())))
    matching = SAM(model.parameters(), torch.optim.SGD, adaptive=adaptive, lr=0.2)
    matching.load_state_dict(sd)
    assert matching.param_groups[0]["adaptive"] is adaptive


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_infosam_over_adam_copies_before_its_first_step(how):
    """A state entry holding only our grad_ema (flatten=True creates it at
    construction; a frozen tensor keeps one) broke Adam's __setstate__."""
    model = make_model()
    opt = InfoSAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=0.01, flatten=True)
    twin, twin_opt = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model, opt), (twin, twin_opt)):
        two_step(m, o, batch(0))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_a_grad_ema_entry_for_a_key_no_group_lists_is_refused_before_loading_anything():
    """Found by an adversarial pass: an EMA entry under an unknown key raised a
    KeyError after the base state, the lr and the EMA had been replaced."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = InfoSAM([p], torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        opt.first_step()
        p.grad = torch.randn(4, 3)
        opt.second_step()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = 123.0
    bad["state"][5] = {"grad_ema": torch.zeros(4, 3)}
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="no saved param group lists 5"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert opt.param_groups[0]["lr"] == 0.1 and set(after["state"]) == set(before["state"])
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value), (key, name)
