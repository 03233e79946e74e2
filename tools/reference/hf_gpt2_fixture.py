#!/usr/bin/env python3
"""A tiny Hugging Face GPT-2, saved by `transformers`, and its float64 logits: the fixture of
`troupe import` / `troupe export` (tests/hf_gpt2.rs).

Writes DIR/hf_gpt2_tiny/ with
  config.json, model.safetensors   as GPT2LMHeadModel.save_pretrained writes them (float32)
  expected.safetensors             tokens [B, T] (I64), logits [B, T, V] and loss [1] (F32),
                                   computed by the same model in float64 (the exact answer for
                                   the stored float32 weights)
The weights are random everywhere (LayerNorm gains and every bias too, which transformers
initialises to 1 and 0), so a transposition or a swapped tensor changes the logits.

Also: `--check DIR` loads an exported directory (from `troupe export`) with transformers, and
prints one JSON line: the loss of the token ids given with --tokens (comma-separated), the keys
transformers found missing, unexpected or mismatched, and, when the directory has a tokenizer, the
ids AutoTokenizer gives --text.

Usage: python3 tools/reference/hf_gpt2_fixture.py --out tests/fixtures
       python3 tools/reference/hf_gpt2_fixture.py --check EXPORTED_DIR --tokens 1,2,3 [--text "ROMEO:"]
Needs: torch, transformers, safetensors. Only needed to regenerate the fixture or to check an export.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

CONFIG = dict(vocab_size=53, n_positions=16, n_embd=32, n_layer=2, n_head=4,
              activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              layer_norm_epsilon=1e-5)
BATCH, SEQ, SEED = 2, 13, 1234


def make(out):
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("ln" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    d = os.path.join(out, "hf_gpt2_tiny")
    model.save_pretrained(d, safe_serialization=True)
    tokens = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))
    model = model.double()
    with torch.no_grad():
        res = model(tokens, labels=tokens)
    save_file({"tokens": tokens.contiguous(),
               "logits": res.logits.float().contiguous(),
               "loss": res.loss.float().reshape(1)},
              os.path.join(d, "expected.safetensors"),
              metadata={"format": "troupe-hf-gpt2-fixture", "version": "1"})
    print(f"wrote {d}")


def check(d, tokens, text):
    model, info = GPT2LMHeadModel.from_pretrained(d, output_loading_info=True)
    model = model.float().eval()
    ids = torch.tensor([[int(t) for t in tokens.split(",")]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    out = dict(loss=loss, dtype=str(next(model.parameters()).dtype),
               tied=model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(),
               missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"]),
               mismatched=[str(k) for k in info["mismatched_keys"]])
    if text is not None and os.path.exists(os.path.join(d, "tokenizer.json")):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(d)
        out["text_ids"] = tok(text)["input_ids"]
        out["eos_token"] = tok.eos_token
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--check")
    ap.add_argument("--tokens")
    ap.add_argument("--text")
    a = ap.parse_args()
    if a.check:
        check(a.check, a.tokens, a.text)
    else:
        make(a.out or "tests/fixtures")


if __name__ == "__main__":
    main()
