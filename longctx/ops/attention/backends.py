"""The attention seam: one record per softmax-attention backend, the one merge of partial results,
and `select`, which picks a backend by name or, for "auto", by shape.

Every caller of softmax attention (the model's layers, ring, Ulysses, USP, all-gather-KV, decoding)
goes through a `Backend` record:

    forward(q, k, v, *, causal, softmax_scale, cu_seqlens, max_seqlen, out_dtype=None) -> (out, lse)
    backward(dout, q, k, v, out, lse, *, causal, softmax_scale, cu_seqlens, max_seqlen,
             delta=None, grad_dtype=None) -> (dq, dk, dv)

in the layouts of the Triton kernels (`longctx.ops.attention`): dense q (B, Sq, H, D), k/v (B, Sk,
Hkv, D), lse (B, H, Sq); packed q/k/v (T, H|Hkv, D) with int32 `cu_seqlens` (the same documents for
queries and keys), lse (H, T). The lse is the natural log, fp32 (float64 from the torch backend on
float64 inputs). Causal masks are bottom-right aligned when Sq != Sk; rows that see nothing give
output 0 and lse -inf. `out_dtype`, `delta` (rowsum(dout * out), lse's shape) and `grad_dtype` are
hints a backend may use natively (Triton) or by conversion (the others). The backward takes the
final out and lse of its rows (ring attention passes the merged ones), not necessarily its own.

Backends: `triton` (the FlashAttention-2 kernels beside this file), `torch` (plain PyTorch in any
dtype, float64 included: the reference and what CPUs run), `cudnn` (PyTorch's private cuDNN
attention ops, fp16/bf16 on sm80+; `cudnn.py`). `LONGCTX_ATTENTION_OFF=cudnn,triton` turns backends off.
cuDNN's packed (varlen) path is trusted only where its backward is known good: PyTorch sized the
varlen backward's dQ buffer by the head dim before pytorch#186142 (June 2026), an illegal address as
soon as a document is longer than the head dim, so varlen needs torch >= 2.13 or
LONGCTX_CUDNN_VARLEN=1 after `scripts/check_backends_gpu.py` passed (=0 turns it off everywhere).
FlashAttention-4 (`flash_attn.cute`) is not a backend yet: nothing here could verify it.

Names: a backend's name, "auto" (the measured table `auto_table.json`, written by
`scripts/bench_attention.py --write-auto-table`; without an entry for the shape, the first backend of
AUTO_ORDER that supports the call) and the aliases of the names configs used before the seam:
`flash` is `triton`; `sdpa` is `cudnn` where cuDNN takes the call, else `triton` (CUDA) or `torch`.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import cudnn, naive
from .cudnn import CUDNN_VARLEN_ENV, capability, cudnn_varlen_trusted  # noqa: F401 (part of the seam's API)

log = logging.getLogger("longctx.attention")

OFF_ENV = "LONGCTX_ATTENTION_OFF"
AUTO_ORDER = ("triton", "cudnn", "torch")     # "auto" without a table entry: the first that supports
# the names configs used before the seam: (candidates on CUDA, elsewhere); the first that supports
# the call runs. Off CUDA "sdpa" is plain PyTorch, never the interpreted kernels.
ALIASES = {"flash": (("triton",), ("triton",)), "sdpa": (("cudnn", "triton", "torch"), ("torch",))}
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    available: Callable[[], tuple]     # () -> (ok, reason): installed, and not turned off
    supports: Callable[..., tuple]     # (device, dtype, head_dim, causal, gqa, varlen) -> (ok, reason)
    forward: Callable
    backward: Callable

    def usable(self, device, dtype, head_dim, causal=True, gqa=False, varlen=False) -> tuple:
        ok, reason = self.available()
        if not ok:
            return ok, reason
        return self.supports(torch.device(device), dtype, head_dim, causal, gqa, varlen)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def names() -> list[str]:
    """Every name `model.attention` may take: "auto", the backends, the aliases."""
    return ["auto", *_BACKENDS, *ALIASES]


def _turned_off(name: str) -> bool:
    return name in {n.strip() for n in os.environ.get(OFF_ENV, "").split(",") if n.strip()}


# ------------------------------------------------------------------------------------------------
# the merge of partial results: the one copy (ring, all-gather-KV and decoding call it)
# ------------------------------------------------------------------------------------------------
def merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor):
    """Fold a partial result (attention of the same queries to other keys) into the running (out,
    lse), in place, in their dtype (keep them fp32 or float64: no rounding between merges).

    out (B, S, H, D) with lse (B, H, S), or out (S, H, D) with lse (H, S); part_* alike. Rows no key
    has been seen for yet (lse -inf on both sides) stay 0 with lse -inf. Returns (out, lse)."""
    o, l, po, pl = out, lse, part_out, part_lse
    if o.dim() == 3:
        o, l, po, pl = o[None], l[None], po[None], pl[None]
    merged = torch.logaddexp(l, pl.to(l.dtype))
    finite = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)
    keep = torch.exp(l - finite).transpose(1, 2)[..., None]
    take = torch.exp(pl.to(l.dtype) - finite).transpose(1, 2)[..., None]
    o.mul_(keep.to(o.dtype)).add_(po.to(o.dtype) * take.to(o.dtype))
    l.copy_(merged)
    return out, lse


# ------------------------------------------------------------------------------------------------
# torch: plain PyTorch (ops/attention/naive.py), any dtype; materialises each document's scores
# ------------------------------------------------------------------------------------------------
def _varlen_args(cu_seqlens, max_seqlen):
    if cu_seqlens is None:
        return {}
    return dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)


def _torch_forward(q, k, v, *, causal, softmax_scale=None, cu_seqlens=None, max_seqlen=None, out_dtype=None):
    # autocast would run the fp32 (or float64) products in bf16 again
    with torch.autocast(q.device.type, enabled=False):
        return naive.attention_forward(q, k, v, softmax_scale=softmax_scale, causal=causal, out_dtype=out_dtype,
                                       **_varlen_args(cu_seqlens, max_seqlen))


def _torch_backward(dout, q, k, v, out, lse, *, causal, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                    delta=None, grad_dtype=None):
    with torch.autocast(q.device.type, enabled=False):
        return naive.attention_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                                        delta=delta, grad_dtype=grad_dtype, **_varlen_args(cu_seqlens, max_seqlen))


def _torch_supports(device, dtype, head_dim, causal, gqa, varlen):
    if not dtype.is_floating_point:
        return False, f"torch attention takes floating-point inputs, got {dtype}"
    return True, ""


register_backend(Backend(
    name="torch", summary="plain PyTorch, any device and float dtype (the reference; scores materialised)",
    available=lambda: (False, f"turned off by {OFF_ENV}") if _turned_off("torch") else (True, ""),
    supports=_torch_supports, forward=_torch_forward, backward=_torch_backward))


# ------------------------------------------------------------------------------------------------
# triton: the FlashAttention-2 kernels of this package
# ------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available():
    if _turned_off("triton"):
        return False, f"turned off by {OFF_ENV}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return True, ""


def _triton_supports(device, dtype, head_dim, causal, gqa, varlen):
    if device.type != "cuda" and not (device.type == "cpu" and _interpreted()):
        return False, f"the Triton kernels run on CUDA (or a CPU under TRITON_INTERPRET=1), not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"the Triton kernels take fp16/bf16/fp32, not {dtype}"
    if head_dim > 256:
        return False, f"the Triton kernels take head dims up to 256, not {head_dim}"
    return True, ""


def _triton_forward(q, k, v, *, causal, softmax_scale=None, cu_seqlens=None, max_seqlen=None, out_dtype=None):
    from . import attention_forward
    return attention_forward(q, k, v, softmax_scale=softmax_scale, causal=causal, out_dtype=out_dtype,
                             **_varlen_args(cu_seqlens, max_seqlen))


def _triton_backward(dout, q, k, v, out, lse, *, causal, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                     delta=None, grad_dtype=None):
    from . import attention_backward
    lse = lse if lse.dtype == torch.float32 else lse.float()
    return attention_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal, delta=delta,
                              grad_dtype=grad_dtype, **_varlen_args(cu_seqlens, max_seqlen))


register_backend(Backend(
    name="triton", summary="longctx's Triton FlashAttention-2 (CUDA; CPU under TRITON_INTERPRET=1)",
    available=_triton_available, supports=_triton_supports, forward=_triton_forward, backward=_triton_backward))


# ------------------------------------------------------------------------------------------------
# cudnn: PyTorch's private cuDNN attention ops (cudnn.py)
# ------------------------------------------------------------------------------------------------
def _cudnn_available():
    if _turned_off("cudnn"):
        return False, f"turned off by {OFF_ENV}"
    return cudnn.cudnn_available()


register_backend(Backend(
    name="cudnn", summary="PyTorch's cuDNN attention ops (CUDA sm80+, fp16/bf16, head dims to 128)",
    available=_cudnn_available, supports=cudnn.cudnn_supports, forward=cudnn.cudnn_forward,
    backward=cudnn.cudnn_backward))


# ------------------------------------------------------------------------------------------------
# select: by name, alias, or the measured table
# ------------------------------------------------------------------------------------------------
def length_bucket(seqlen: Optional[int]) -> int:
    """The table's length bucket: the power of two at or above `seqlen` (at least 1024)."""
    if not seqlen or seqlen <= 1024:
        return 1024
    return 1 << (int(seqlen) - 1).bit_length()


def table_key(device, dtype, head_dim, causal, gqa_ratio, varlen, seqlen) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = capability(device)
        where = f"sm{major}{minor}"
    else:
        where = device.type
    return "|".join([where, str(dtype).replace("torch.", ""), f"d{head_dim}", "causal" if causal else "full",
                     f"g{gqa_ratio}", "packed" if varlen else "dense", f"s{length_bucket(seqlen)}"])


@functools.lru_cache(maxsize=4)
def load_table(path: str = TABLE_PATH) -> dict:
    """{key: backend name} from the measured table (empty without the file)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return {key: entry["backend"] for key, entry in data.get("entries", {}).items()}


def _from_table(key: str, table: dict) -> Optional[str]:
    """The table's backend for `key`, or for the nearest measured length bucket of the same shape."""
    if key in table:
        return table[key]
    stem, bucket = key.rsplit("|s", 1)
    near = [(abs(math.log2(int(k.rsplit("|s", 1)[1])) - math.log2(int(bucket))), name)
            for k, name in table.items() if k.rsplit("|s", 1)[0] == stem]
    return min(near)[1] if near else None


def check_name(name: str) -> None:
    """A one-line ValueError for a name that is neither a backend, an alias nor "auto"."""
    if name not in names():
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(names())} "
                         f"(flash = triton; sdpa = cudnn where it runs, else triton on CUDA, torch elsewhere)")


_LOGGED: set = set()


@functools.lru_cache(maxsize=None)
def _select(name, device, dtype, head_dim, causal, gqa_ratio, varlen, bucket, off, table_path) -> Backend:
    check_name(name)
    gqa = gqa_ratio > 1
    why = {}

    def first(candidates):
        for candidate in candidates:
            ok, reason = _BACKENDS[candidate].usable(device, dtype, head_dim, causal, gqa, varlen)
            if ok:
                return _BACKENDS[candidate]
            why[candidate] = reason
        return None

    if name == "auto":
        key = table_key(device, dtype, head_dim, causal, gqa_ratio, varlen, bucket)
        measured = _from_table(key, load_table(table_path))
        # off CUDA: plain PyTorch (the interpreted Triton kernels are for tests that name them)
        order = AUTO_ORDER if device.type == "cuda" else ("torch",)
        chosen = (first([measured]) if measured in _BACKENDS else None) or first(order)
        source = f"table entry {key}" if chosen is not None and chosen.name == measured else "first that supports it"
    else:
        chosen = first(ALIASES[name][device.type != "cuda"] if name in ALIASES else (name,))
        source = f"alias {name}" if name in ALIASES else "named"
    if chosen is None:
        reasons = "; ".join(f"{n}: {r}" for n, r in why.items())
        raise ValueError(f"attention backend {name!r} cannot run {dtype} head_dim={head_dim} on {device} "
                         f"(causal={causal}, gqa={gqa_ratio}, packed={varlen}): {reasons}")
    message = (f"attention {name}: {chosen.name} for {device} {dtype} head_dim={head_dim} causal={causal} "
               f"gqa={gqa_ratio} packed={varlen} ({source})")
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)
    return chosen


def clear_selection() -> None:
    """Forget the choices made so far (after a new table is written, or the environment changed)."""
    _select.cache_clear()
    _LOGGED.clear()


def select(name: str, *, device, dtype, head_dim: int, causal: bool = True, gqa: int = 1,
           varlen: bool = False, seqlen: Optional[int] = None, table_path: str = TABLE_PATH) -> Backend:
    """The backend `name` means for this call; `gqa` is the query-to-key/value head ratio (1: none).
    A named backend (or alias) that cannot run the call raises one line saying why."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _select(name, device, dtype, head_dim, causal, int(gqa), bool(varlen), length_bucket(seqlen),
                   os.environ.get(OFF_ENV, "") + "/" + os.environ.get(CUDNN_VARLEN_ENV, ""), table_path)


def select_for(name: str, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, varlen: bool = False,
               seqlen: Optional[int] = None) -> Backend:
    """`select` with the device, dtype and heads read from q (…, H, D) and k (…, Hkv, D)."""
    return select(name, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], causal=causal,
                  gqa=q.shape[-2] // max(k.shape[-2], 1), varlen=varlen,
                  seqlen=seqlen if seqlen is not None else q.shape[-3])


# ------------------------------------------------------------------------------------------------
# with autograd: what a whole-sequence caller (the model, Ulysses) runs
# ------------------------------------------------------------------------------------------------
class _SeamAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, backend, causal, softmax_scale, cu_seqlens, max_seqlen):
        kwargs = dict(causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        out, lse = backend.forward(q, k, v, **kwargs)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.backend, ctx.kwargs = backend, dict(kwargs, cu_seqlens=None)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse,
                                          **dict(ctx.kwargs, cu_seqlens=cu_seqlens))
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, *, backend: str | Backend = "auto", causal: bool = True, softmax_scale=None,
              cu_seqlens=None, max_seqlen=None):
    """Softmax attention with autograd through the seam: q (B, S, H, D) or packed (T, H, D) with
    `cu_seqlens`; `backend` a name (selected for this call) or a `Backend` record."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if not isinstance(backend, Backend):
        backend = select_for(backend, q, k, causal=causal, varlen=cu_seqlens is not None,
                             seqlen=max_seqlen if cu_seqlens is not None else None)
    return _SeamAttention.apply(q, k, v, backend, causal, softmax_scale, cu_seqlens, max_seqlen)
