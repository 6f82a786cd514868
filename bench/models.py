"""Two small models for the whole-step benchmark, with a batch maker each.

``SmallResNet``: a ResNet-style CNN with BatchNorm (basic blocks, three
stages), on 32x32 images. ``SmallGPT``: a GPT-style decoder (pre-norm blocks,
causal attention, tied embedding) on token sequences. ``size="smoke"`` gives
versions small enough for CI.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths=(32, 64, 128), blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class SmallGPT(nn.Module):
    def __init__(self, vocab=2048, ctx=128, d=256, layers=4, heads=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied output embedding


# name -> (model factory, batch factory(device, generator), loss)
def _cnn(size):
    batch, width = (4, (8, 16, 16)) if size == "smoke" else (32, (32, 64, 128))
    return (
        lambda: SmallResNet(widths=width, blocks=1 if size == "smoke" else 2),
        lambda device, gen: (torch.randn(batch, 3, 32, 32, generator=gen).to(device),
                             torch.randint(0, 10, (batch,), generator=gen).to(device)),
        F.cross_entropy,
    )


def _gpt(size):
    vocab, ctx, d, layers, batch = (128, 16, 32, 1, 2) if size == "smoke" else (2048, 128, 256, 4, 8)

    def loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def make_batch(device, gen):
        idx = torch.randint(0, vocab, (batch, ctx + 1), generator=gen)
        return idx[:, :-1].contiguous().to(device), idx[:, 1:].contiguous().to(device)

    return (lambda: SmallGPT(vocab, ctx, d, layers, heads=4), make_batch, loss)


MODELS = {"small_resnet": _cnn, "small_gpt": _gpt}
