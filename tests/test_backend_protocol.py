"""The backend contract (backends/protocol.py): every backend implements every
verb with the Protocol's arguments, a backend that does not is refused when
the optimizer resolves it (before anything changes), and the path a backend
reports drives ``opt.last_step_backend`` and the fallback warning."""
import types
import warnings

import pytest
import torch

from presam_kernels import SAM, backends, extension_available
from helpers import step_with_unit_gradients
from presam_kernels.backends import eager, protocol

NAMES = ["eager"] + (["cpp"] if extension_available() else []) + (["triton"] if backends.triton_available() else [])


@pytest.mark.parametrize("name", NAMES)
def test_every_backend_implements_every_verb_of_the_protocol(name):
    backend = backends.get(name)
    protocol.check(backend)
    assert backend.name == name


def _fake(name="fake", path=None, drop=(), **verbs):
    """eager's verbs under another name; ``path``: what perturb reports."""
    def perturb(tables, buckets, spec, rhos, ema_ready, found_inf=None):
        done = eager.perturb(tables, buckets, spec, rhos, ema_ready, found_inf)
        done.path = path or name
        return done

    fake = types.SimpleNamespace()

    def plan_perturb(tables, buckets, spec, rhos, ema_ready):
        # Its perturb as it is when the launch runs: a test swaps it between steps.
        return protocol.PerturbCall(lambda *args: fake.perturb(*args), buckets, spec, rhos, ema_ready)

    impl = dict(name=name, perturb=perturb, restore=eager.restore, restore_and_step=eager.restore_and_step,
                unscale_=eager.unscale_, plan_perturb=plan_perturb, plan_restore_and_step=eager.plan_restore_and_step)
    impl.update(verbs)
    for verb in drop:
        impl.pop(verb)
    fake.__dict__.update(impl)
    return fake


def _model():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=gen)), torch.nn.Parameter(torch.randn(3, generator=gen))]


def _old_perturb(tables, buckets, spec, rhos, first, found_inf=None):
    raise AssertionError("never called")


@pytest.mark.parametrize(("fake", "message"), [
    (_fake(drop=("restore_and_step",)), r"'fake' does not implement restore_and_step\(\)"),
    (_fake(drop=("name",)), "has no name"),
    (_fake(perturb=_old_perturb), r"'fake': perturb\(.*'first'.*\) does not take the Protocol's arguments"),
], ids=["missing_verb", "no_name", "old_signature"])
def test_a_backend_breaking_the_protocol_is_refused_at_construction_before_anything_changes(monkeypatch, fake,
                                                                                               message):
    monkeypatch.setitem(backends.LOADERS, "eager", lambda name: fake)
    params = _model()
    before = [(p.detach().clone(), p.data_ptr()) for p in params]
    with pytest.raises(TypeError, match=message):
        SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, backend="eager", flatten=True)
    for p, (x, ptr) in zip(params, before):
        assert p.data_ptr() == ptr and torch.equal(p.detach(), x)


def test_the_reported_path_drives_last_step_backend_and_the_warning(monkeypatch):
    fake = _fake(name="fake")
    monkeypatch.setitem(backends.LOADERS, "eager", lambda name: fake)
    params = _model()
    opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_with_unit_gradients(opt, params)  # the backend's own path: nothing to tell
    assert opt.backend == "fake" and opt.last_step_backend == "fake"
    fake.perturb = _fake(name="fake", path="eager").perturb  # now it reports a hand-over to eager
    with pytest.warns(RuntimeWarning, match="the step ran on the eager backend"):
        step_with_unit_gradients(opt, params)
    assert opt.last_step_backend == "eager"
