#!/usr/bin/env python3
"""The PyTorch peer of `troupe bench train`: the same GPT (pre-LN blocks, learned positions, fused
QKV, tanh-GELU 4h MLP, final LN, tied head, padded vocabulary), AdamW, fp32, random tokens, the
same steps and warm-up, printing one JSON line with the same fields.

Usage: python3 bench/pytorch_gpt.py --config config/cpu-small.toml --steps 20 --threads 2
       [--compile] [--attn sdpa|manual] [--fused-adamw]
"""

import argparse
import json
import math
import os
import resource
import statistics
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, nh, attn):
        super().__init__()
        self.nh, self.attn = nh, attn
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.fc_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.nh)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, m, attn):
        super().__init__()
        div = m.get("make_vocab_size_divisible_by", 128)
        self.v = m["vocab_size"]
        vp = (self.v + div - 1) // div * div
        c = m["hidden_size"]
        self.wte, self.wpe = nn.Embedding(vp, c), nn.Embedding(m["seq_length"], c)
        self.h = nn.ModuleList(Block(c, m["num_attention_heads"], attn) for _ in range(m["num_layers"]))
        self.ln_f = nn.LayerNorm(c)
        for mod in self.modules():  # GPT-2 init, as troupe does (speed does not depend on it)
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
            if isinstance(mod, nn.Linear):
                nn.init.zeros_(mod.bias)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        logits = logits[..., : self.v]
        return F.cross_entropy(logits.reshape(-1, self.v), targets.reshape(-1))


def flops_per_token(m):
    div = m.get("make_vocab_size_divisible_by", 128)
    vp = (m["vocab_size"] + div - 1) // div * div
    l, h, s = m["num_layers"], m["hidden_size"], m["seq_length"]
    return 72 * l * h * h + 12 * l * s * h + 6 * vp * h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--attn", choices=["sdpa", "manual"], default="sdpa")
    ap.add_argument("--fused-adamw", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="compute type (default: fp32 on cpu, bf16 autocast on cuda)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense TFLOP/s for MFU (H100 SXM bf16: 989)")
    args = ap.parse_args()
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dev = torch.device(args.device)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(1234)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    m, tr = cfg["model"], cfg.get("train", {})
    b, t = args.micro_batch_size or tr.get("micro_batch_size", 8), m["seq_length"]
    accum = tr.get("global_batch_size", b) // b
    model = GPT(m, args.attn).to(dev)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=args.fused_adamw or None)
    fwd = torch.compile(model) if args.compile else model
    data = [torch.randint(0, m["vocab_size"], (b, t + 1), device=dev) for _ in range(accum)]
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for seq in data:
            with autocast:
                loss = fwd(seq[:, :-1], seq[:, 1:]) / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return total

    for _ in range(args.warmup):
        step()
    times, loss = [], 0.0
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tps = accum * b * t / med
    name = os.path.splitext(os.path.basename(args.config))[0]
    print(json.dumps(dict(
        impl="pytorch" + ("-compile" if args.compile else "-eager"), config=name, threads=args.threads,
        params=sum(p.numel() for p in model.parameters()), tokens_per_step=accum * b * t, steps=args.steps,
        tokens_per_s=round(tps, 1), step_ms_median=round(med * 1e3, 2),
        model_gflops_per_s=round(flops_per_token(m) * tps / 1e9, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        final_loss=loss, torch=torch.__version__, attn=args.attn, device=args.device, dtype=dtype,
        device_memory_peak_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device == "cuda" else None,
        mfu=round(flops_per_token(m) * tps / (args.peak_tflops * 1e12), 4) if args.device == "cuda" else None)))


if __name__ == "__main__":
    main()
