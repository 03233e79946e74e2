"""Fixtures for troupe's data order: NumPy's RandomState shuffles and Megatron-LM's GPT dataset
indices (and its blends' indices), written to tests/fixtures/megatron_gpt_indices.json.

troupe reproduces Megatron's sample order for the same seed: one numpy.random.RandomState(seed)
per dataset makes the document shuffle(s) and then the sample shuffle(s). This script takes the
shuffles from NumPy itself and builds the three index arrays the way Megatron-Core's
GPTDataset._build_document_sample_shuffle_indices and its C++ helper build_sample_idx do
(written out here in Python), for small synthetic datasets.

Usage: python3 tools/reference/megatron_gpt_indices.py   (needs numpy)
"""

import json
import math
import pathlib

import numpy


def shuffled(seed, n):
    a = numpy.arange(n, dtype=numpy.int64)
    numpy.random.RandomState(seed).shuffle(a)
    return a.tolist()


def document_index(documents, num_epochs, rng, separate_final_epoch):
    if not separate_final_epoch or num_epochs == 1:
        idx = numpy.mgrid[0:num_epochs, 0 : len(documents)][1]
        idx[:] = documents
        idx = idx.reshape(-1).astype(numpy.int32)
        rng.shuffle(idx)
        return idx
    first = document_index(documents, num_epochs - 1, rng, False)
    last = document_index(documents, 1, rng, False)
    return numpy.concatenate((first, last))


def sample_index(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, extra):
    num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    out = [[0, 0]]
    pos, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + extra
        while remaining != 0:
            doc_length = int(sizes[doc_idx[pos]]) - offset
            remaining -= doc_length
            if remaining <= 0:
                offset += remaining + doc_length - extra
                remaining = 0
            else:
                pos += 1
                offset = 0
        out.append([pos, offset])
    return numpy.array(out, dtype=numpy.int64)


def shuffle_index(num_samples, total_size, rng):
    dtype = numpy.uint32 if total_size < numpy.iinfo(numpy.uint32).max - 1 else numpy.int64
    first = numpy.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = numpy.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return numpy.concatenate((first, last))


def gpt_indices(sizes, start, stop, seq_length, num_samples, seed, extra=1):
    documents = numpy.arange(start, stop, dtype=numpy.int32)
    tokens_per_epoch = int(numpy.sum(numpy.array(sizes)[start:stop]))
    num_epochs, tokens = 1, tokens_per_epoch
    while tokens < num_samples * seq_length + extra:
        tokens += tokens_per_epoch
        num_epochs += 1
    separate = False
    sans_final = None
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        from_final = num_samples - sans_final
        per_epoch = (tokens_per_epoch - extra) // seq_length
        assert 0 <= from_final <= per_epoch + 1
        separate = from_final < int(0.80 * per_epoch)
    rng = numpy.random.RandomState(seed)
    doc_idx = document_index(documents, num_epochs, rng, separate)
    samples = sample_index(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, extra)
    total = samples.shape[0] - 1
    shuf = shuffle_index(sans_final if separate else total, total, rng)
    return {
        "num_epochs": num_epochs,
        "separate_final_epoch": separate,
        "document_index": doc_idx.tolist(),
        "sample_index": samples.reshape(-1).tolist(),
        "shuffle_index": shuf.tolist(),
    }


def blending_indices(weights, size):
    """Megatron's C++ build_blending_indices, written out in Python (the same double arithmetic)."""
    taken = [0] * len(weights)
    dataset_index, dataset_sample_index = [], []
    for sample_idx in range(size):
        target = max(float(sample_idx), 1.0)
        best, best_error = 0, weights[0] * target - float(taken[0])
        for d in range(1, len(weights)):
            error = weights[d] * target - float(taken[d])
            if error > best_error:
                best, best_error = d, error
        dataset_index.append(best)
        dataset_sample_index.append(taken[best])
        taken[best] += 1
    return dataset_index, dataset_sample_index


def blend(weights, size):
    """A blend's normalised weights (numpy float64, as Megatron's normalize), the samples each
    dataset is asked for (Megatron's ceil(ceil(size * w) * 1.005)) and the blending indices."""
    w = numpy.array(weights, dtype=numpy.float64)
    w = (w / numpy.sum(w)).tolist()
    per_dataset = [int(math.ceil(math.ceil(size * x) * 1.005)) for x in w]
    dataset_index, dataset_sample_index = blending_indices(w, size)
    return {"weights": weights, "size": size, "normalized": w, "per_dataset": per_dataset,
            "dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


def main():
    sizes_rng = numpy.random.RandomState(7)
    sizes = (sizes_rng.randint(1, 40, size=60)).tolist()
    cases = []
    # One epoch; several epochs with the final one shuffled apart; several without (it supplies
    # at least 80% of an epoch); a split in the middle of the documents; other seeds.
    for name, start, stop, seq, n, seed in [
        ("one_epoch", 0, 60, 16, 50, 1234),
        ("separate_final_epoch", 0, 20, 8, 90, 1234),
        ("whole_final_epoch", 0, 20, 8, 75, 1234),
        ("middle_split", 25, 41, 10, 40, 42),
        ("seed_zero", 0, 60, 32, 20, 0),
        ("largest_seed", 3, 9, 4, 33, 4294967295),
    ]:
        case = {"name": name, "sizes": sizes, "start": start, "stop": stop, "seq_length": seq,
                "num_samples": n, "seed": seed}
        case.update(gpt_indices(sizes, start, stop, seq, n, seed))
        cases.append(case)
    shuffles = [{"seed": s, "n": n, "permutation": shuffled(s, n)}
                for s, n in [(1234, 10), (0, 1), (1, 2), (42, 1000), (4294967295, 37), (5489, 5000)]]
    # Two shuffles from one state, as the document and sample shuffles share one.
    rng = numpy.random.RandomState(99)
    a, b = numpy.arange(50), numpy.arange(7)
    rng.shuffle(a)
    rng.shuffle(b)
    # Many datasets too: NumPy sums eight or more weights pairwise, not in order.
    many = numpy.random.RandomState(11).uniform(0.01, 3.0, size=150).tolist()
    blends = [blend(w, n) for w, n in [([0.3, 0.7], 200), ([1, 1, 1], 100), ([5, 2, 1e-3], 321),
                                        ([0.25, 0.25, 0.5], 64), (many[:10], 500), (many, 2000)]]
    out = {
        "numpy": numpy.__version__,
        "blends": blends,
        "shuffles": shuffles,
        "one_state": {"seed": 99, "first": a.tolist(), "second": b.tolist()},
        "gpt_indices": cases,
    }
    path = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/megatron_gpt_indices.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes, numpy {numpy.__version__})")


if __name__ == "__main__":
    main()
