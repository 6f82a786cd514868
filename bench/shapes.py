"""Parameter sets for the benchmarks, as (name, shape) lists in named_parameters() order.

Written out from each architecture's published configuration (no downloads, no
torchvision): the counts are checked below against the well-known totals.
``make_params`` turns a list into tensors; ``tiny`` shrinks a list for the CI
smoke run.
"""
from __future__ import annotations

import math

import torch


def resnet50():
    """torchvision resnet50: 161 tensors, 25,557,032 elements."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            convs = [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            for k, shape in enumerate(convs, start=1):
                shapes += [(f"{pre}conv{k}.weight", shape), (f"{pre}bn{k}.weight", (shape[0],)), (f"{pre}bn{k}.bias", (shape[0],))]
            if b == 0:
                shapes += [
                    (f"{pre}downsample.0.weight", (planes * 4, inplanes, 1, 1)),
                    (f"{pre}downsample.1.weight", (planes * 4,)),
                    (f"{pre}downsample.1.bias", (planes * 4,)),
                ]
            inplanes = planes * 4
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def vit_b16():
    """torchvision vit_b_16: 152 tensors, 86,567,656 elements."""
    d, mlp, layers = 768, 3072, 12
    shapes = [
        ("class_token", (1, 1, d)),
        ("conv_proj.weight", (d, 3, 16, 16)),
        ("conv_proj.bias", (d,)),
        ("encoder.pos_embedding", (1, 197, d)),
    ]
    for i in range(layers):
        pre = f"encoder.layers.encoder_layer_{i}."
        shapes += [
            (pre + "ln_1.weight", (d,)), (pre + "ln_1.bias", (d,)),
            (pre + "self_attention.in_proj_weight", (3 * d, d)), (pre + "self_attention.in_proj_bias", (3 * d,)),
            (pre + "self_attention.out_proj.weight", (d, d)), (pre + "self_attention.out_proj.bias", (d,)),
            (pre + "ln_2.weight", (d,)), (pre + "ln_2.bias", (d,)),
            (pre + "mlp.0.weight", (mlp, d)), (pre + "mlp.0.bias", (mlp,)),
            (pre + "mlp.3.weight", (d, mlp)), (pre + "mlp.3.bias", (d,)),
        ]
    shapes += [("encoder.ln.weight", (d,)), ("encoder.ln.bias", (d,)),
               ("heads.head.weight", (1000, d)), ("heads.head.bias", (1000,))]
    return shapes


def gpt2_medium():
    """GPT-2 medium (lm_head tied to wte): 292 tensors, 354,823,168 elements."""
    d, layers, vocab, ctx = 1024, 24, 50257, 1024
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        pre = f"h.{i}."
        shapes += [
            (pre + "ln_1.weight", (d,)), (pre + "ln_1.bias", (d,)),
            (pre + "attn.c_attn.weight", (d, 3 * d)), (pre + "attn.c_attn.bias", (3 * d,)),
            (pre + "attn.c_proj.weight", (d, d)), (pre + "attn.c_proj.bias", (d,)),
            (pre + "ln_2.weight", (d,)), (pre + "ln_2.bias", (d,)),
            (pre + "mlp.c_fc.weight", (d, 4 * d)), (pre + "mlp.c_fc.bias", (4 * d,)),
            (pre + "mlp.c_proj.weight", (4 * d, d)), (pre + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def llama_1b():
    """A Llama-3.2-1B-like set (tied embedding, grouped-query attention with 8
    KV heads of 64): 146 tensors, 1,235,814,400 elements."""
    d, layers, vocab, ffn, kv = 2048, 16, 128256, 8192, 512
    shapes = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        pre = f"layers.{i}."
        shapes += [
            (pre + "self_attn.q_proj.weight", (d, d)), (pre + "self_attn.k_proj.weight", (kv, d)),
            (pre + "self_attn.v_proj.weight", (kv, d)), (pre + "self_attn.o_proj.weight", (d, d)),
            (pre + "mlp.gate_proj.weight", (ffn, d)), (pre + "mlp.up_proj.weight", (ffn, d)),
            (pre + "mlp.down_proj.weight", (d, ffn)),
            (pre + "input_layernorm.weight", (d,)), (pre + "post_attention_layernorm.weight", (d,)),
        ]
    shapes += [("norm.weight", (d,))]
    return shapes


def uniform(total: int, count: int = 64):
    """``count`` equal 1-D tensors summing to ``total`` elements (the kernel table's sets)."""
    return [(f"t{i}", (total // count,)) for i in range(count)]


SETS = {
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "gpt2_medium": gpt2_medium,
    "llama_1b": llama_1b,
}

# (tensors, elements) of each set, checked by test_shapes_match_the_published_counts.
EXPECTED = {
    "resnet50": (161, 25_557_032),
    "vit_b16": (152, 86_567_656),
    "gpt2_medium": (292, 354_823_168),
    "llama_1b": (146, 1_235_814_400),
}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def numel(shapes) -> int:
    return sum(math.prod(s) for _, s in shapes)


def tiny(shapes, count: int = 10, cap: int = 16):
    """The first ``count`` tensors with every dimension capped at ``cap``: the
    CI smoke run's stand-in for a set (same ranks, same names)."""
    return [(n, tuple(min(d, cap) for d in s)) for n, s in shapes[:count]]


def make_params(shapes, device="cpu", dtype=torch.float32, seed=0):
    """One leaf tensor per shape, requires_grad=True, values ~ N(0, 0.02^2) as
    transformer initialisations use (norm-layer weights at 1, as models start)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for name, shape in shapes:
        if len(shape) == 1 and (name.endswith("weight") and ("bn" in name or "ln" in name or "norm" in name
                                                            or "downsample.1" in name)):
            t = torch.ones(shape, device=device)
        else:
            t = torch.randn(shape, generator=gen, device=device).mul_(0.02)
        params.append(t.to(dtype=dtype).requires_grad_(True))
    return params


def make_grads(params, seed=1):
    """Gradients of the parameters' shapes and dtypes, ~ N(0, 1e-2^2): far from
    fp32's subnormal range (subnormals would slow the CPU down for no reason)."""
    grads = []
    for p in params:
        gen = torch.Generator(device=p.device).manual_seed(seed + len(grads))
        grads.append(torch.randn(p.shape, generator=gen, device=p.device).mul_(1e-2).to(p.dtype))
    return grads
