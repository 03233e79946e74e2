#!/usr/bin/env python3
"""PyTorch reference for troupe's GPT: builds the same model and writes parity fixtures.

The model is the Megatron / GPT-2 architecture troupe implements (pre-LayerNorm blocks, learned
positions, fused QKV, 4h MLP with tanh-GELU, final LayerNorm, LM head tied to the token
embedding, vocabulary padded to a multiple with padded logits excluded from the loss). Parameter
names and layouts are troupe's (`h.{i}.attn.qkv.weight` is [3C, C], nn.Linear style).

The reference runs in float64 so that the fixtures are the exact answer and troupe's float32
result is compared against the truth, not against another float32 rounding.

Fixture format (versioned): a safetensors file whose `__metadata__` holds
  format = "troupe-gpt-fixture", version = "1", config (JSON), train (JSON)
and tensors
  param.<name>  initial weights (F32)      grad.<name>  gradients of the first loss (F32)
  tokens, targets [B, T] (I64)             logits [B, T, V] (F32, padding dropped)
  loss [1] (F32)                           step_losses [10] (F32): loss before each AdamW step

Usage: python3 tools/reference/gpt_reference.py --out tests/fixtures
Needs: torch, safetensors (pip install torch safetensors). Only needed to regenerate fixtures.
"""

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

FORMAT, VERSION = "troupe-gpt-fixture", "1"

CONFIGS = {
    # name: model config, batch, seq
    "tiny": dict(cfg=dict(vocab_size=64, make_vocab_size_divisible_by=64, seq_length=16,
                          num_layers=2, hidden_size=32, num_attention_heads=4), batch=2, seq=16),
    "odd": dict(cfg=dict(vocab_size=53, make_vocab_size_divisible_by=16, seq_length=13,
                         num_layers=3, hidden_size=20, num_attention_heads=5), batch=3, seq=11),
}
TRAIN = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, clip_grad=1.0, steps=10)


def padded_vocab(cfg):
    m = cfg["make_vocab_size_divisible_by"]
    return (cfg["vocab_size"] + m - 1) // m * m


def param_specs(cfg):
    c, vp, t = cfg["hidden_size"], padded_vocab(cfg), cfg["seq_length"]
    specs = [("wte", [vp, c]), ("wpe", [t, c])]
    for i in range(cfg["num_layers"]):
        p = f"h.{i}."
        specs += [(p + "ln_1.weight", [c]), (p + "ln_1.bias", [c]),
                  (p + "attn.qkv.weight", [3 * c, c]), (p + "attn.qkv.bias", [3 * c]),
                  (p + "attn.proj.weight", [c, c]), (p + "attn.proj.bias", [c]),
                  (p + "ln_2.weight", [c]), (p + "ln_2.bias", [c]),
                  (p + "mlp.fc.weight", [4 * c, c]), (p + "mlp.fc.bias", [4 * c]),
                  (p + "mlp.proj.weight", [c, 4 * c]), (p + "mlp.proj.bias", [c])]
    specs += [("ln_f.weight", [c]), ("ln_f.bias", [c])]
    return specs


def init_params(cfg, gen):
    """Random (not zero/one) values everywhere so every gradient path is exercised."""
    params = {}
    for name, shape in param_specs(cfg):
        if name.endswith("weight") and len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            t = 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)
        params[name] = t.float().double().requires_grad_(True)  # exactly representable in f32
    return params


def forward(cfg, p, tokens):
    b, t = tokens.shape
    c, nh, v = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    hs = c // nh
    x = p["wte"][tokens] + p["wpe"][:t]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg["num_layers"]):
        q = lambda s: p[f"h.{i}.{s}"]  # noqa: E731
        h = F.layer_norm(x, (c,), q("ln_1.weight"), q("ln_1.bias"), eps=1e-5)
        qkv = F.linear(h, q("attn.qkv.weight"), q("attn.qkv.bias"))
        qq, kk, vv = qkv.split(c, dim=-1)
        qq, kk, vv = (z.view(b, t, nh, hs).transpose(1, 2) for z in (qq, kk, vv))
        att = (qq @ kk.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ vv).transpose(1, 2).reshape(b, t, c)
        x = x + F.linear(y, q("attn.proj.weight"), q("attn.proj.bias"))
        h = F.layer_norm(x, (c,), q("ln_2.weight"), q("ln_2.bias"), eps=1e-5)
        h = F.gelu(F.linear(h, q("mlp.fc.weight"), q("mlp.fc.bias")), approximate="tanh")
        x = x + F.linear(h, q("mlp.proj.weight"), q("mlp.proj.bias"))
    x = F.layer_norm(x, (c,), p["ln_f.weight"], p["ln_f.bias"], eps=1e-5)
    logits = x @ p["wte"].t()
    return logits[..., :v]  # padded logits are excluded from the loss


def loss_fn(cfg, p, tokens, targets):
    logits = forward(cfg, p, tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), logits


def make_fixture(name, spec, seed):
    cfg, b, t = spec["cfg"], spec["batch"], spec["seq"]
    gen = torch.Generator().manual_seed(seed)
    params = init_params(cfg, gen)
    tokens = torch.randint(0, cfg["vocab_size"], (b, t), generator=gen)
    targets = torch.randint(0, cfg["vocab_size"], (b, t), generator=gen)
    out = {f"param.{k}": v.detach().float().contiguous() for k, v in params.items()}
    loss, logits = loss_fn(cfg, params, tokens, targets)
    loss.backward()
    out.update({f"grad.{k}": v.grad.detach().float().contiguous() for k, v in params.items()})
    out["tokens"], out["targets"] = tokens.contiguous(), targets.contiguous()
    out["logits"] = logits.detach().float().contiguous()
    out["loss"] = loss.detach().float().reshape(1)
    # 10 AdamW steps on the same batch: decay on matrices and embeddings, not on biases/norms.
    for v in params.values():
        v.grad = None
    decay = [v for k, v in params.items() if v.dim() == 2]
    no_decay = [v for k, v in params.items() if v.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=TRAIN["weight_decay"]),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=TRAIN["lr"], betas=(TRAIN["beta1"], TRAIN["beta2"]), eps=TRAIN["eps"])
    losses = []
    for _ in range(TRAIN["steps"]):
        opt.zero_grad()
        loss, _ = loss_fn(cfg, params, tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), TRAIN["clip_grad"])
        opt.step()
        losses.append(loss.item())
    out["step_losses"] = torch.tensor(losses, dtype=torch.float32)
    meta = dict(format=FORMAT, version=VERSION, config=json.dumps(cfg),
                train=json.dumps(dict(TRAIN, batch=b, seq=t, seed=seed)))
    return out, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for i, (name, spec) in enumerate(CONFIGS.items()):
        tensors, meta = make_fixture(name, spec, seed=1000 + i)
        path = os.path.join(args.out, f"gpt_{name}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(f"wrote {path} ({os.path.getsize(path)} bytes), loss {tensors['loss'].item():.6f}")


if __name__ == "__main__":
    main()
