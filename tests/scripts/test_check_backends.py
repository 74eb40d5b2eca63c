"""scripts/check_backends_gpu.py's checker, run on the CPU with small cases: a backend equal to the
reference passes, one that is wrong in its output, log-sum-exp or a gradient fails with the reason,
one that does not take a case is listed as unsupported (not failed)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import check_backends_gpu as checker  # noqa: E402
from longctx.ops.attention import backends as seam  # noqa: E402

SMALL = [("dense causal", (1, 32, 32, 4, 2, 16, True, None)),
         ("block full", (1, 16, 32, 2, 2, 16, False, None)),
         ("packed causal", (1, None, None, 4, 2, 16, True, [1, 13, 1, 7]))]


def _variant(name, forward=None, backward=None, supports=None):
    torch_backend = seam.backends()["torch"]
    return seam.Backend(name=name, summary="test", available=lambda: (True, ""),
                        supports=supports or torch_backend.supports, forward=forward or torch_backend.forward,
                        backward=backward or torch_backend.backward)


def test_checker_passes_the_reference_and_fails_wrong_backends(monkeypatch):
    plain = seam.backends()["torch"]

    def bad_lse(*args, **kwargs):
        out, lse = plain.forward(*args, **kwargs)
        return out, lse + 0.1

    def bad_dq(*args, **kwargs):
        dq, dk, dv = plain.backward(*args, **kwargs)
        return dq * 1.05, dk, dv

    for name, backend in (("same", _variant("same")), ("bad_lse", _variant("bad_lse", forward=bad_lse)),
                          ("bad_dq", _variant("bad_dq", backward=bad_dq)),
                          ("dense_only", _variant("dense_only", supports=lambda d, t, h, c, g, varlen:
                                                  (not varlen, "no packed documents")))):
        monkeypatch.setitem(seam._BACKENDS, name, backend)
    rows = checker.run_checks(["same", "bad_lse", "bad_dq", "dense_only"], cases=SMALL, device="cpu")
    status = {(r["backend"], r["case"]): r for r in rows}
    assert all(status["same", case]["status"] == "ok" for case, _ in SMALL)
    assert all(status["bad_lse", case]["status"] == "FAIL" and "lse" in status["bad_lse", case]["reason"]
               for case, _ in SMALL)
    assert all(status["bad_dq", case]["status"] == "FAIL" and status["bad_dq", case]["reason"].startswith("dq ")
               for case, _ in SMALL)
    assert status["dense_only", "packed causal"] == {**status["dense_only", "packed causal"],
                                                     "status": "unsupported", "reason": "no packed documents"}
    summary = checker.summary(rows)
    assert summary["same"]["ok"] == 3 and summary["bad_dq"]["FAIL"] == 3 and summary["dense_only"]["unsupported"] == 1
