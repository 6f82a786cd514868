"""Lightning (lightning.pytorch) with SharpnessAwareModule: automatic and
manual optimization give the README's two-step loop's parameters (and
BatchNorm statistics) on the same batches, count their steps, and resume from
a checkpoint bit-identically."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from integration_common import BATCH, as_batches, assert_same_state, make_batches, make_net, readme_loop

from presam_kernels import SAM, InfoSAM

pl = pytest.importorskip("lightning.pytorch", reason="lightning is pinned in requirements-test.txt")
from presam_kernels.integrations.lightning import SharpnessAwareModule  # noqa: E402

OPTIMIZERS = {
    "sam": lambda params: SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "infosam": lambda params: InfoSAM(params, torch.optim.SGD, rho=2.0, lr=0.1, momentum=0.9),
}


class Net(SharpnessAwareModule):
    def __init__(self, kind="sam", manual=False, scheduler=False):
        super().__init__()
        self.net = make_net()
        self.kind = kind
        self.automatic_optimization = not manual
        self.with_scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return F.cross_entropy(self(x), y)
        opt = self.optimizers()
        self.manual_backward(F.cross_entropy(self(x), y))
        opt.first_step(zero_grad=True)
        self.freeze_second_pass_norms(True)
        self.manual_backward(F.cross_entropy(self(x), y))
        self.freeze_second_pass_norms(False)
        opt.second_step(zero_grad=True)
        if self.with_scheduler:
            self.lr_schedulers().step()

    def freeze_second_pass_norms(self, on):
        from presam_kernels import disable_running_stats, enable_running_stats

        (disable_running_stats if on else enable_running_stats)(self)

    def configure_optimizers(self):
        opt = OPTIMIZERS[self.kind](self.parameters())
        if not self.with_scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


def loader():
    x, y = make_batches()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False), num_sanity_val_steps=0,
        default_root_dir=tmp_path, **kw,
    )


def reference(kind, accumulate=1, clip=None, autocast_dtype=None, epochs=1, scheduler=False):
    model = make_net()
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9) if scheduler else None
    for _ in range(epochs):
        readme_loop(model, opt, as_batches(*make_batches()), accumulate, clip, autocast_dtype, sched)
    return model, opt


CASES = {
    "sam-fp32": dict(kind="sam"),
    "sam-accumulate2-clip": dict(kind="sam", accumulate=2, clip=0.5),
    "infosam-accumulate2": dict(kind="infosam", accumulate=2),
    "sam-bf16-clip": dict(kind="sam", clip=0.5, precision="bf16-mixed"),
    "infosam-bf16-accumulate2": dict(kind="infosam", accumulate=2, precision="bf16-mixed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_automatic_optimization_equals_the_readme_loop(case, tmp_path):
    spec = CASES[case]
    precision = spec.get("precision", "32-true")
    module = Net(spec["kind"])
    t = trainer(
        tmp_path, accumulate_grad_batches=spec.get("accumulate", 1), gradient_clip_val=spec.get("clip"),
        precision=precision,
    )
    t.fit(module, loader())
    ref, ref_opt = reference(
        spec["kind"], spec.get("accumulate", 1), spec.get("clip"),
        torch.bfloat16 if precision == "bf16-mixed" else None,
    )
    assert t.global_step == len(make_batches()[0]) // BATCH // spec.get("accumulate", 1)
    assert_same_state(module.net, ref)
    real = t.optimizers[0]
    torch.testing.assert_close(real.last_perturbation_norm, ref_opt.last_perturbation_norm, atol=1e-6, rtol=1e-6)


def test_manual_optimization_counts_steps_and_schedules_without_warning(tmp_path):
    """second_step() on Lightning's wrapper is the optimizer step: global_step
    advances, max_steps stops training, the scheduler does not warn, and the
    optimizer's attributes are on trainer.optimizers[0]."""
    module = Net("sam", manual=True, scheduler=True)
    t = trainer(tmp_path, max_steps=5, max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        t.fit(module, loader())
    assert t.global_step == 5
    ref = make_net()
    opt = OPTIMIZERS["sam"](ref.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    readme_loop(ref, opt, as_batches(*make_batches())[:5], scheduler=sched)
    assert_same_state(module.net, ref)
    real = t.optimizers[0]
    assert real.last_perturbation_norm is not None and int(real.skipped_steps) == 0
    torch.testing.assert_close(real.last_perturbation_norm, opt.last_perturbation_norm, atol=1e-6, rtol=1e-6)
    assert real.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


@pytest.mark.parametrize("kind", ["infosam"])
def test_checkpoint_resume_at_epoch_boundary_is_bit_identical(kind, tmp_path):
    straight = Net(kind)
    trainer(tmp_path / "a", max_epochs=2).fit(straight, loader())

    first = Net(kind)
    t = trainer(tmp_path / "b", max_epochs=1)
    t.fit(first, loader())
    ckpt = tmp_path / "epoch1.ckpt"
    t.save_checkpoint(ckpt)
    resumed = Net(kind)
    with torch.no_grad():  # another starting point: everything must come from the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    trainer(tmp_path / "c", max_epochs=2).fit(resumed, loader(), ckpt_path=ckpt)
    assert_same_state(resumed.net, straight.net, atol=0, rtol=0)
    ema = [s["grad_ema"] for s in copy.deepcopy(resumed.trainer.optimizers[0].state_dict())["state"].values()]
    ema_straight = [s["grad_ema"] for s in straight.trainer.optimizers[0].state_dict()["state"].values()]
    for a, b in zip(ema, ema_straight):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class PlainNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return OPTIMIZERS["sam"](self.parameters())


def test_plain_lightning_module_step_closure_runs_both_passes(tmp_path):
    """Without SharpnessAwareModule, Lightning calls step(closure) with the last
    step's gradients still present: they must not be taken as the first pass
    (they were, and the update used them). Parameters equal the loop's
    (BatchNorm statistics are updated in both passes there: not compared)."""
    module = PlainNet()
    trainer(tmp_path).fit(module, loader())
    ref, _ = reference("sam")
    for (name, p), q in zip(module.net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_plain_lightning_module_with_accumulation_refuses_before_touching(tmp_path):
    """accumulate_grad_batches=2 with a plain LightningModule: the gradients of
    micro-batch 1 are present when Lightning calls step(closure); they were taken
    as the first pass and the update used micro-batch 2 alone. Now a clear error,
    the parameters unchanged."""
    module = PlainNet()
    before = copy.deepcopy(module.net.state_dict())
    with pytest.raises(RuntimeError, match="SharpnessAwareModule"):
        trainer(tmp_path, accumulate_grad_batches=2).fit(module, loader())
    for name, p in module.net.named_parameters():
        torch.testing.assert_close(p, before[name], atol=0, rtol=0)
