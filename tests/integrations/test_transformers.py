"""Hugging Face Trainer with SharpnessAwareTrainer: a 2-layer GPT-2 built from
a config (random weights, random tokens, no download) trained with gradient
accumulation, max_grad_norm clipping and the Trainer's linear LR schedule
gives the README loop's parameters on the same batches, and
resume_from_checkpoint continues bit-identically."""
from __future__ import annotations

import pytest
import torch

from presam_kernels import SAM

transformers = pytest.importorskip("transformers", reason="transformers is pinned in requirements-test.txt")
from presam_kernels.integrations.transformers import SharpnessAwareTrainer  # noqa: E402

SEQ, VOCAB, N_SAMPLES, BATCH = 8, 64, 24, 4


def make_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def make_samples():
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (N_SAMPLES, SEQ), generator=gen)
    return [{"input_ids": t, "labels": t} for t in tokens]


def make_sam(model):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


class InOrderTrainer(SharpnessAwareTrainer):
    """The samples in order, so that the reference loop sees the same batches."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def train(tmp_path, max_steps, accumulate, clip, resume=None, save_steps=None):
    model = make_gpt2()
    if resume:  # another starting point: everything must come from the checkpoint
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulate,
        max_steps=max_steps, max_grad_norm=clip, lr_scheduler_type="linear", learning_rate=0.1,
        logging_strategy="no", save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = InOrderTrainer(model=model, args=args, train_dataset=make_samples(), optimizers=(make_sam(model), None))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def reference(max_steps, accumulate, clip):
    model = make_gpt2()
    model.train()
    opt = make_sam(model)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, max_steps)
    samples = make_samples()
    batches = [samples[i : i + BATCH] for i in range(0, len(samples), BATCH)]
    ids = [torch.stack([s["input_ids"] for s in b]) for b in batches]
    for step in range(max_steps):
        window = ids[step * accumulate : (step + 1) * accumulate]
        # The Trainer's loss: summed over the window's tokens, divided by the
        # number of label tokens in the window (num_items_in_batch).
        tokens = torch.tensor(sum(x.numel() for x in window))
        for x in window:
            model(input_ids=x, labels=x, num_items_in_batch=tokens).loss.backward()
        opt.first_step(zero_grad=True)
        for x in window:
            model(input_ids=x, labels=x, num_items_in_batch=tokens).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)
        sched.step()
    return model


def assert_same_params(model, ref, atol=1e-6, rtol=1e-6):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("accumulate,clip", [(1, 0.0), (2, 0.5)], ids=["plain", "accumulate2-clip"])
def test_trainer_equals_the_readme_loop(accumulate, clip, tmp_path):
    model, trainer = train(tmp_path, 3, accumulate, clip)
    assert trainer.state.global_step == 3
    assert_same_params(model, reference(3, accumulate, clip))


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    straight, _ = train(tmp_path / "a", 3, 2, 0.5)
    train(tmp_path / "b", 3, 2, 0.5, save_steps=2)
    resumed, _ = train(tmp_path / "c", 3, 2, 0.5, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert_same_params(resumed, straight, atol=0, rtol=0)
