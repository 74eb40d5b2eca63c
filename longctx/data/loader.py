"""The distributed, resumable loader of packed sequences.

    loader = build_loader(cfg, seq_len=2048, micro_batch=1, dp_rank=0, dp_size=1, pad_multiple=1, seed=0,
                          grad_accum=1)
    batch = next(iter(loader))   # input_ids, labels, position_ids [micro_batch, seq_len] int64;
                                 # cu_seqlens int32 over the flattened micro_batch * seq_len tokens;
                                 # num_tokens: how many of them are data, not padding (0-d int64)

Epoch e packs the pieces anew, shuffled by a generator seeded with (seed, e), into a list of
sequences that is the same on every rank. Step s of the epoch (its global batch) takes the
sequences [s * G, (s + 1) * G), G = dp_size * micro_batch * grad_accum; its micro-batch i on
data-parallel rank r is the run of micro_batch sequences starting at s * G + (i * dp_size + r) *
micro_batch: the shares of the ranks are disjoint, the sequence-parallel ranks of one group (same
dp_rank) get the same sequences, and the last len % G sequences of an epoch are left over (every
rank must take the same number of steps). The loader is endless.

The state is global: the epoch and the number of its sequences consumed, the same on every rank,
taken between steps. So `state_dict()` of any rank resumes all of them, on any number of ranks:
after a restart with the same global batch (dp_size x micro_batch x grad_accum, in any split) the
next step's global batch is exactly the one the uninterrupted run would have taken; other sizes
go on from the same point of the same epoch.

cu_seqlens: one entry per document start over the flattened rows, then the total. The padding at
the end of a row is documents of its own (pad ids, labels -100, positions from 0, none longer than
the row's longest document), so attention never mixes it with real tokens. Rows are always
exactly seq_len tokens, so `pad_multiple` (the sequence-parallel divisor, 2 x ring size for ring
attention) only has to divide seq_len: checked.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import DataConfig
from .long_examples import LongExampleMaker, example_count
from .packing import TokenStore, assemble, cut_documents, pack_rows
from .sharegpt import DataError
from .text import cut_text_documents


class PackedLoader:
    def __init__(self, store: TokenStore, seq_len: int, micro_batch: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, packing: str = "best_fit", overlong: str = "split",
                 pad_id: int = 0, pad_multiple: int = 1, key: str = "", report: dict | None = None,
                 max_token_id: int | None = None, grad_accum: int = 1, format: str = "sharegpt",
                 attention_span: str = "document", long_examples: LongExampleMaker | None = None):
        if seq_len < 1 or micro_batch < 1 or dp_size < 1 or pad_multiple < 1 or grad_accum < 1:
            raise ValueError(f"seq_len={seq_len}, micro_batch={micro_batch}, dp_size={dp_size}, grad_accum="
                             f"{grad_accum} and pad_multiple={pad_multiple} must all be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if seq_len % pad_multiple:
            raise ValueError(f"seq_len={seq_len} must be a multiple of pad_multiple={pad_multiple} (the "
                             f"sequence-parallel divisor, 2 x ring size for ring attention); use seq_len="
                             f"{-(-seq_len // pad_multiple) * pad_multiple}")
        self.store, self.seq_len, self.micro_batch = store, seq_len, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.packing = dp_rank, dp_size, seed, packing
        self.grad_accum, self._micro_step = grad_accum, 0   # micro-batches taken of the current step
        self.pad_id, self.key, self.max_token_id = pad_id, key, max_token_id
        self.attention_span, self.long_examples = attention_span, long_examples
        if format == "text":
            self.pieces, overlong_counts = cut_text_documents(store, seq_len)
        else:
            self.pieces, overlong_counts = cut_documents(store, seq_len, overlong)
        if len(self.pieces) == 0:
            raise DataError(f"no sample with loss tokens fits seq_len={seq_len}")
        self.long_count = 0
        if long_examples is not None:
            config = long_examples.cfg
            self.long_count = example_count(config.ratio, int(self.pieces.lengths.sum()), seq_len,
                                            config.mean_length(seq_len))
        self.epoch, self.consumed = 0, 0
        self._plan_epoch, self._plan, self._plan_long, self._long_lengths = None, None, None, None
        sequences = self._sequences(0)
        used = int(self.pieces.lengths.sum()) - self._left_out_tokens + int(self._long_lengths.sum())
        self.report = dict(report or {})
        self.report["packing"] = {
            "method": packing, "seq_len": seq_len, "pieces": len(self.pieces), "sequences": len(sequences),
            "padding_fraction": 1.0 - used / (len(sequences) * seq_len),
            "sequences_per_step": self.sequences_per_step, "steps_per_epoch": self.steps_per_epoch,
            "dropped_sequences": len(sequences) % self.sequences_per_step, "overlong": overlong_counts,
            "attention_span": attention_span, "long_examples": self.long_count,
            "pieces_left_out": self._left_out}
        if self.steps_per_epoch == 0:
            raise DataError(f"the data packs into {len(sequences)} sequences of {seq_len} tokens, fewer "
                            f"than one step needs (dp_size {dp_size} x micro_batch {micro_batch} x grad_accum "
                            f"{grad_accum}); use more data, a shorter seq_len or fewer ranks")

    @property
    def sequences_per_step(self) -> int:
        return self.dp_size * self.micro_batch * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        """Steps in the current epoch (packing, so the count, may differ slightly by epoch)."""
        return len(self._sequences(self.epoch)) // self.sequences_per_step

    def _sequences(self, epoch: int) -> list[np.ndarray]:
        """The epoch's rows as piece indices; _plan_long[row]: the long example it opens, or -1."""
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            lengths = np.zeros(0, dtype=np.int64)
            if self.long_count:
                lengths = self.long_examples.lengths(self.long_count, self.seq_len, epoch)
            ratio_one = self.long_examples is not None and self.long_examples.cfg.ratio >= 1
            self._plan, self._plan_long, self._left_out = pack_rows(
                self.pieces.lengths, self.seq_len, self.packing, rng, reserved=lengths, overflow=not ratio_one)
            kept = np.ones(len(self.pieces), dtype=bool)
            if self._left_out:
                placed = np.concatenate(self._plan) if self._plan else np.zeros(0, dtype=np.int64)
                kept[:] = False
                kept[placed] = True
            self._left_out_tokens = int(self.pieces.lengths[~kept].sum())
            self._long_lengths, self._plan_epoch = lengths, epoch
        return self._plan

    def row(self, epoch: int, row: int) -> dict:
        """The arrays of row `row` of `epoch` (see packing.assemble), with `long_example` when it
        opens with one."""
        sequences = self._sequences(epoch)
        long_index = int(self._plan_long[row])
        example = None
        if long_index >= 0:
            example = self.long_examples.make(epoch, long_index, int(self._long_lengths[long_index]))
        out = assemble(self.store, self.pieces, sequences[row], self.seq_len, self.pad_id, self.attention_span,
                       lead=None if example is None else (example.tokens, example.loss_mask))
        out["long_example"] = example
        return out

    def batch_of(self, sequence_ids: list[np.ndarray] | list[int], epoch: int | None = None) -> dict[str, torch.Tensor]:
        """The batch of rows: row numbers of `epoch` (default: the current one)."""
        rows = [self.row(self.epoch if epoch is None else epoch, int(i)) for i in sequence_ids]
        doc_lengths = np.concatenate([row["doc_lengths"] for row in rows])
        cu_seqlens = np.zeros(len(doc_lengths) + 1, dtype=np.int32)
        np.cumsum(doc_lengths, out=cu_seqlens[1:])
        batch = {name: torch.from_numpy(np.stack([row[name] for row in rows]))
                 for name in ("input_ids", "labels", "position_ids")}
        batch["cu_seqlens"] = torch.from_numpy(cu_seqlens)
        batch["num_tokens"] = torch.tensor(sum(row["tokens"] for row in rows), dtype=torch.int64)
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        sequences = self._sequences(self.epoch)
        # a step's global batch never spans two epochs, whatever its split into micro-batches
        if self._micro_step == 0 and self.consumed + self.sequences_per_step > len(sequences):
            self.epoch, self.consumed = self.epoch + 1, 0
            sequences = self._sequences(self.epoch)
            if len(sequences) < self.sequences_per_step:  # packing differs by epoch; barely ever this much
                raise RuntimeError(f"epoch {self.epoch} packs into {len(sequences)} sequences, fewer than "
                                   f"one step needs ({self.sequences_per_step}); use more data")
        first = self.consumed + self.dp_rank * self.micro_batch
        batch = self.batch_of(range(first, first + self.micro_batch))
        self.consumed += self.dp_size * self.micro_batch
        self._micro_step = (self._micro_step + 1) % self.grad_accum
        return batch

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                 "packing": self.packing, "data_key": self.key, "pieces": len(self.pieces)}
        if self.layout is not None:   # absent for today's layout, so older checkpoints resume
            state["layout"] = self.layout
        return state

    @property
    def layout(self) -> str | None:
        """The options that shape rows beyond the data and packing: attention span, long examples."""
        if self.attention_span == "document" and self.long_examples is None:
            return None
        long = self.long_examples.cfg.signature() if self.long_examples is not None else None
        return f"attention_span={self.attention_span} long_examples={long}"

    def load_state_dict(self, state: dict, strict: bool = True) -> bool:
        """Go on where `state` left the data. A state of other data, data settings, seq_len or seed
        cannot be resumed exactly: strict raises DataError (one line); otherwise this run's data
        starts from its beginning, and False says so."""
        mine = self.state_dict()
        changed = [name for name in ("seed", "seq_len", "packing", "data_key", "pieces", "layout")
                   if state.get(name) != mine.get(name)]
        if changed and strict:
            name = changed[0]
            raise DataError(f"cannot resume the data exactly: the checkpoint's {name} is {state.get(name)!r}, "
                            f"this run's is {mine.get(name)!r}; resume with the same data, tokenizer and data "
                            "settings, seq_len and seed (or train.resume_force=true to start the data over)")
        if changed:
            return False
        self.epoch, self.consumed, self._micro_step = int(state["epoch"]), int(state["consumed"]), 0
        return True


def build_loader(cfg: DataConfig, seq_len: int, micro_batch: int = 1, dp_rank: int = 0, dp_size: int = 1,
                 pad_multiple: int = 1, seed: int = 0, grad_accum: int = 1) -> PackedLoader:
    """Prepare (or load the cached) data of `cfg` and return this rank's endless loader.

    Call it on every rank; in a distributed run one process per node tokenizes while the others
    wait (see longctx.data.prepare). Prints the data report on global rank 0 when cfg.verbose.
    """
    from .cache import _rank, format_report, prepare

    cfg = DataConfig.of(cfg)
    prepared = prepare(cfg)
    loader = loader_of(prepared, cfg, seq_len, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size,
                       pad_multiple=pad_multiple, seed=seed, grad_accum=grad_accum)
    if cfg.verbose and _rank()[0] == 0:
        print(format_report(loader.report), flush=True)
    return loader


def loader_of(prepared, cfg: DataConfig, seq_len: int, seed: int = 0, **kwargs) -> PackedLoader:
    """The loader of prepared data with every data option of `cfg` (PackedLoader's other
    arguments as keywords)."""
    maker = None
    if cfg.long_examples.ratio > 0:
        try:   # the lengths against seq_len, known only here
            cfg.long_examples.length_range(seq_len)
        except ValueError as error:
            raise DataError(str(error)) from None
        maker = long_example_maker(prepared, cfg, seed)
    return PackedLoader(prepared.store, seq_len, seed=seed, packing=cfg.packing, overlong=cfg.overlong,
                        pad_id=prepared.pad_id, key=prepared.key, report=prepared.report,
                        max_token_id=prepared.max_token_id, format=cfg.format,
                        attention_span=cfg.attention_span, long_examples=maker, **kwargs)


def long_example_maker(prepared, cfg: DataConfig, seed: int) -> LongExampleMaker:
    from transformers import AutoTokenizer

    from .long_examples import load_first_user
    from .sharegpt import resolve_path

    if cfg.format != "sharegpt":
        raise DataError(f"data.long_examples are made of conversations: set data.format=sharegpt (not "
                        f"{cfg.format}) or data.long_examples.ratio=0")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(cfg.tokenizer_path, "data.tokenizer")))
    chat_template = prepared.report.get("chat_template") or cfg.chat_template
    return LongExampleMaker(prepared.store, load_first_user(prepared.path), tokenizer, chat_template,
                            cfg.long_examples, seed)
