"""Deterministic synthetic corpus for `troupe bench preprocess` (no download needed).

Writes JSON lines {"id": i, "text": ...} until the file reaches --mb megabytes. Words are built
from syllables and drawn from a Zipf-like distribution, with sentence punctuation, digits and
some non-ASCII, so byte-level BPE has realistic work to do.

    python3 bench/gen_corpus.py --mb 64 --out /tmp/corpus.jsonl
"""
import argparse
import json
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    syll = ["ka", "to", "ri", "en", "an", "the", "ing", "ver", "son", "mo", "la", "qu", "é", "ß",
            "ion", "al", "ex", "pre", "st", "ou", "ar", "ed", "er", "in", "is", "on", "re"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(30000)]
    weights = [1.0 / (r + 1) ** 1.05 for r in range(len(words))]
    target = int(args.mb * 1e6)
    written = 0
    i = 0
    with open(args.out, "w", encoding="utf-8") as f:
        while written < target:
            n = int(rng.lognormvariate(5.5, 1.0)) + 1
            toks = rng.choices(words, weights, k=n)
            out = []
            for k, w in enumerate(toks):
                if k == 0 or out[-1].endswith("."):
                    w = w.capitalize()
                out.append(w)
                r = rng.random()
                if r < 0.06:
                    out[-1] += "."
                elif r < 0.1:
                    out[-1] += ","
                elif r < 0.11:
                    out.append(str(rng.randint(0, 9999)))
            line = json.dumps({"id": i, "text": " ".join(out)}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            i += 1


if __name__ == "__main__":
    main()
