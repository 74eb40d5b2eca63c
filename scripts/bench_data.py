"""Batch building on the CPU: our packed loader against transformers' DataCollatorWithFlattening.

    python scripts/bench_data.py [--full] [--iters 20] [--seq-lens 2048,32768,131072,524288] [--cache-dir D]

Both build the same packed sequences (the documents our best-fit plan put together): ours from the
memory-mapped token arrays with numpy, the peer (`hf_flatten`, return_flash_attn_kwargs=True)
from one feature dict per document, as a `datasets` row gives it. The outputs are checked equal
(input_ids, labels, position_ids, document boundaries) before timing. The peer neither packs nor
pads; ours also pads each row to exactly seq_len. Prints a table and writes
bench/results/data_<host>.json.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from longctx.data import DataConfig, PackedLoader, prepare  # noqa: E402
from benchlib import result_head  # noqa: E402
from longctx.data.sharegpt import sharegpt_v3_path  # noqa: E402


def documents_of(loader, sequence):
    """One feature dict per document of a packed sequence, with the loader's labels."""
    store, pieces = loader.store, loader.pieces
    features = []
    for piece in sequence:
        base = store.offsets[pieces.doc[piece]]
        index = np.concatenate([np.arange(base, base + pieces.prefix[piece]),
                                np.arange(base + pieces.start[piece], base + pieces.end[piece])])
        ids = np.asarray(store.tokens[index], dtype=np.int64)
        trained = np.asarray(store.loss_mask[index]) != 0
        trained[:pieces.prefix[piece]] = False
        features.append({"input_ids": ids, "labels": np.where(trained, ids, -100)})
    return features


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="the 125 MB ShareGPT_V3 file (prepared once)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seq-lens", default="2048,32768,131072,524288")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir (default: ~/.cache/longctx/data)")
    args = parser.parse_args()
    from transformers import DataCollatorWithFlattening

    cfg = DataConfig(path=sharegpt_v3_path() if args.full else "data/sharegpt_sample.json",
                     cache_dir=args.cache_dir, verbose=False)
    prepared = prepare(cfg)
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
    rows = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        loader = PackedLoader(prepared.store, seq_len, pad_id=prepared.pad_id, key=prepared.key)
        sequences = loader._sequences(0)
        iters = min(args.iters, len(sequences))
        features = [documents_of(loader, sequences[i]) for i in range(iters)]
        # parity first: the same tokens, labels, positions and boundaries
        for i in range(iters):
            ours = loader.batch_of([i])
            theirs = collator(features[i])
            used = theirs["input_ids"].shape[1]
            for name in ("input_ids", "labels", "position_ids"):
                assert torch.equal(ours[name][:, :used], theirs[name]), name
            assert ours["cu_seqlens"][: len(theirs["cu_seq_lens_q"])].tolist() == theirs["cu_seq_lens_q"].tolist()

        timings = {"longctx": [], "hf_flatten": []}  # after the parity calls above warmed both up
        for i in range(iters):
            started = time.perf_counter()
            loader.batch_of([i])
            timings["longctx"].append(time.perf_counter() - started)
            started = time.perf_counter()
            collator(features[i])
            timings["hf_flatten"].append(time.perf_counter() - started)
        docs = float(np.mean([len(sequences[i]) for i in range(iters)]))
        for impl, times in timings.items():
            ms = 1000 * float(np.median(times))
            rows.append({"bench": "data_batch", "impl": impl, "seq_len": seq_len, "micro_batch": 1,
                         "data": "sharegpt_v3_full" if args.full else "sharegpt_sample",
                         "docs_per_sequence": round(docs, 1), "ms": round(ms, 3),
                         "tok_s": round(seq_len / ms * 1000), "iters": iters})

    print(f"{'seq_len':>8} {'impl':>11} {'docs':>6} {'ms':>9} {'Mtok/s':>8}")
    for row in rows:
        print(f"{row['seq_len']:>8} {row['impl']:>11} {row['docs_per_sequence']:>6} {row['ms']:>9.3f} "
              f"{row['tok_s'] / 1e6:>8.2f}")
    result = {**result_head(f"CPU: {cpu_name()} ({torch.get_num_threads()} threads, shared)"), "rows": rows}
    out = ROOT / "bench" / "results" / f"data_{'full' if args.full else 'sample'}_cpu.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
