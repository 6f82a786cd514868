"""timm-style optimizers: timm's factory (and the HF Trainer's) builds weight
decay groups that list biases and norm weights apart from the other weights,
in another order than the model and without names. ASAM given
``model.named_parameters()`` and such a base optimizer must treat exactly the
tensors named *weight* as weights (it zipped the names in the base's order).

The split is tested without timm (a split built here the way those factories
build it) and, when timm imports, with timm's own factory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from integration_common import as_batches, make_batches, make_net

from presam_kernels import ASAM

TIMM_REASON = "timm needs torchvision, whose only available build does not import beside the CPU torch here"
try:
    import timm
    import timm.optim
except Exception as error:  # ImportError, or torchvision failing to import
    timm, TIMM_ERROR = None, f"{type(error).__name__}: {error}"


def decay_split(model, weight_decay=1e-2):
    """No decay for tensors of ndim <= 1 (biases, norm weights), listed first."""
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    decay = [p for p in model.parameters() if p.ndim > 1]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def named_split_in_model_order(model, weight_decay=1e-2):
    """The same groups as (name, tensor) pairs in the model's order."""
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if p.ndim <= 1], "weight_decay": 0.0},
        {"params": [(n, p) for n, p in named if p.ndim > 1], "weight_decay": weight_decay},
    ]


def train_asam(model, opt, steps=3):
    model.train()
    for x, y in as_batches(*make_batches())[:steps]:
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def test_asam_with_a_reordered_weight_decay_split_trains_as_with_names_in_model_order():
    model, twin = make_net(), make_net()
    base = torch.optim.SGD(decay_split(model), lr=0.1, momentum=0.9)
    opt = ASAM(model.named_parameters(), base, rho=0.5)
    opt_twin = ASAM(named_split_in_model_order(twin), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    train_asam(model, opt)
    train_asam(twin, opt_twin)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(timm is None, reason=TIMM_REASON + ("" if timm else f" ({TIMM_ERROR})"))
def test_asam_with_timms_optimizer_factory_trains_as_with_names_in_model_order():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    twin = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    twin.load_state_dict(model.state_dict())
    base = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = ASAM(model.named_parameters(), base, rho=0.5)
    # The twin says which tensors are weights by identity, from its own names.
    base_twin = timm.optim.create_optimizer_v2(twin, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-2)
    names = {id(p): n for n, p in twin.named_parameters()}
    opt_twin = ASAM(base_twin.param_groups, base_twin, rho=0.5, is_weight=lambda _, p: "weight" in names[id(p)])
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 32, 32, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    for m, o in ((model, opt), (twin, opt_twin)):
        m.train()
        for _ in range(2):
            F.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
