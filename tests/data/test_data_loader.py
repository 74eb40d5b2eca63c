"""The loader on the real sample: batches, caching, exact resume, data-parallel shares, and the
distributed preparation (one builder, the others wait)."""
import shutil
import time

import pytest
import torch

from distributed import run_distributed
from longctx.data import DataConfig, build_loader, prepare
from longctx.data import cache as prepare_module


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("data_cache")), verbose=False)
    prepare(cfg)  # the cold build, once for the module
    return cfg


def rows(batch):
    return [tuple(row.tolist()) for row in batch["input_ids"]]


def test_batches_follow_the_contract(cfg):
    seq_len, micro_batch = 1024, 3
    loader = build_loader(cfg, seq_len=seq_len, micro_batch=micro_batch, pad_multiple=8)
    pad_id = prepare(cfg).pad_id
    for _ in range(4):
        batch = next(loader)
        for name in ("input_ids", "labels", "position_ids"):
            assert batch[name].shape == (micro_batch, seq_len) and batch[name].dtype == torch.int64
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == micro_batch * seq_len
        assert all(r * seq_len in cu.tolist() for r in range(micro_batch))
        ids, labels, positions = (batch[n].reshape(-1) for n in ("input_ids", "labels", "position_ids"))
        starts = cu[:-1].long()
        assert (positions[starts] == 0).all() and (labels[starts] == -100).all()
        restarts = torch.zeros_like(positions, dtype=torch.bool)
        restarts[starts] = True
        steps = positions[1:] - positions[:-1]
        assert ((steps == 1) | restarts[1:]).all()
        counted = labels != -100
        assert (labels[counted] == ids[counted]).all() and counted.any()
        assert not (counted & (ids == pad_id)).any()


def test_num_tokens_counts_the_data_not_the_padding(cfg):
    # over one epoch of one sequence a step, the batches' data tokens add up to every packed piece
    # (none is dropped: a step takes one sequence), and the rest of the rows is the reported padding
    seq_len = 4096
    loader = build_loader(cfg, seq_len=seq_len)
    steps = loader.steps_per_epoch
    counts = [int(next(loader)["num_tokens"]) for _ in range(steps)]
    assert all(0 < c <= seq_len for c in counts) and min(counts) < seq_len
    assert sum(counts) == int(loader.pieces.lengths.sum())
    padding = loader.report["packing"]["padding_fraction"]
    assert abs(1 - sum(counts) / (steps * seq_len) - padding) < 1e-9


def test_cache_is_reused_and_fast(cfg, monkeypatch):
    def no_build(*args):
        raise AssertionError("the cached data was prepared again")
    monkeypatch.setattr(prepare_module, "_build", no_build)
    started = time.perf_counter()
    prepared = prepare(cfg)
    assert time.perf_counter() - started < 2.0
    assert prepared.report["kept"] > 250 and prepared.report["tokens"]["tokens"] == len(prepared.store.tokens)
    # another setting that changes the tokens gets its own cache
    other = DataConfig(cache_dir=cfg.cache_dir, loss_mask="last")
    assert prepare_module.cache_path(cfg) != prepare_module.cache_path(other)


def test_resume_gives_exactly_the_next_batches(cfg):
    kwargs = dict(seq_len=16384, micro_batch=2, seed=3)
    reference = build_loader(cfg, **kwargs)
    per_epoch = reference.steps_per_epoch
    assert 3 < per_epoch < 30
    uninterrupted = [rows(next(reference)) for _ in range(per_epoch + 4)]
    assert reference.epoch == 1
    assert uninterrupted[0] != uninterrupted[per_epoch], "each epoch is shuffled anew"

    stopped = build_loader(cfg, **kwargs)
    stop_at = per_epoch - 2  # resume just before an epoch boundary
    for step in range(stop_at):
        assert rows(next(stopped)) == uninterrupted[step]
    state = torch.load(_saved(stopped.state_dict()), weights_only=True)
    resumed = build_loader(cfg, **kwargs)
    resumed.load_state_dict(state)
    for step in range(stop_at, per_epoch + 4):
        assert rows(next(resumed)) == uninterrupted[step]

    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg, seq_len=16384, micro_batch=2, seed=4).load_state_dict(state)


def _saved(state):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_data_parallel_shares_are_disjoint_and_cover_the_epoch(cfg):
    single = build_loader(cfg, seq_len=4096, seed=5)
    everything = [rows(next(single))[0] for _ in range(single.steps_per_epoch)]
    ranks = [build_loader(cfg, seq_len=4096, dp_rank=r, dp_size=3, seed=5) for r in range(3)]
    steps = ranks[0].steps_per_epoch
    assert steps == len(everything) // 3
    shares = [[rows(next(loader))[0] for _ in range(steps)] for loader in ranks]
    flat = [row for share in shares for row in share]
    assert len(set(flat)) == len(flat) == 3 * steps  # disjoint
    assert set(flat) == set(everything[:3 * steps])  # and all of the epoch but the leftover
    for step in range(steps):  # step s takes sequences 3s, 3s+1, 3s+2 of the epoch
        assert [shares[r][step] for r in range(3)] == everything[3 * step:3 * step + 3]

    # a run resumed with another data-parallel size goes on from the same point of the epoch
    single = build_loader(cfg, seq_len=4096, seed=5)
    for _ in range(4):
        next(single)
    state = single.state_dict()
    wider = [build_loader(cfg, seq_len=4096, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for loader in wider:
        loader.load_state_dict(state)
    assert [rows(next(loader))[0] for loader in wider] == everything[4:6]


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="data.chat_template='vicuna'"):
        DataConfig(chat_template="vicuna").validate()
    with pytest.raises(ValueError, match="data.packing"):
        DataConfig(packing="first_fit").validate()
    with pytest.raises(FileNotFoundError, match="data.tokenizer.*no/such/tokenizer"):
        DataConfig(tokenizer="no/such/tokenizer").validate()
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        DataConfig(tokenizer=str(tmp_path / "empty_dir")).validate()


def test_config_is_a_valid_structured_hydra_schema():
    omegaconf = pytest.importorskip("omegaconf")
    schema = omegaconf.OmegaConf.structured(DataConfig)
    merged = omegaconf.OmegaConf.merge(schema, {"num_proc": 4, "cache_dir": "/tmp/x"})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.num_proc == 4
    # a DictConfig (not converted to the dataclass) is accepted too
    assert DataConfig.of(merged) == cfg and DataConfig.of({"num_proc": 3}).num_proc == 3


def test_inspect_prints_the_masked_sample(cfg, capsys):
    from longctx.data.inspect import main

    main([f"cache_dir={cfg.cache_dir}", "data.sample=2", "seq_len=2048", "tokens=8", "color=never"])
    out = capsys.readouterr().out
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n>>>" in out
    assert "<|eot_id|><<<" in out and "kept" in out and "padding" in out


def _prepare_on_rank(rank, world_size, path, cache_dir, prepared_copy):
    built = []

    def slow_build(cfg, target):
        # the real build runs in the module fixture; here the rank that builds publishes a copy of
        # it after a delay, which the other rank must wait for rather than build too
        built.append(rank)
        time.sleep(1.0)
        tmp = target.with_name(target.name + ".tmp-test")
        shutil.copytree(prepared_copy, tmp)
        prepare_module._publish(tmp, target)
    prepare_module._build = slow_build
    loader = build_loader(DataConfig(path=path, cache_dir=cache_dir, verbose=False), seq_len=2048,
                          dp_rank=rank, dp_size=world_size, seed=11)
    return {"built": len(built), "batches": [rows(next(loader)) for _ in range(3)]}


def test_distributed_ranks_prepare_once_and_read_their_own_shares(cfg, tmp_path):
    results = run_distributed(_prepare_on_rank, 2, cfg.path, str(tmp_path / "fresh_cache"),
                              str(prepare(cfg).path))
    assert [r["built"] for r in results] == [1, 0]
    for rank, result in enumerate(results):
        local = build_loader(cfg, seq_len=2048, dp_rank=rank, dp_size=2, seed=11)
        assert result["batches"] == [rows(next(local)) for _ in range(3)]
    assert not set(map(tuple, results[0]["batches"])) & set(map(tuple, results[1]["batches"]))


def test_command_line_arguments_and_data_groups():
    from longctx.data.config import config_from_args

    cfg, extra = config_from_args(["data=sharegpt_sample", "data.num_proc=3", "cache_dir=null",
                                   "verbose=false", "seq_len=4096"], {"seq_len": 2048, "sample": 0})
    assert cfg.path == "data/sharegpt_sample.json" and cfg.num_proc == 3 and cfg.cache_dir is None
    assert cfg.verbose is False and extra == {"seq_len": 4096, "sample": 0}
    with pytest.raises(SystemExit, match="unknown argument 'shuffle=1'"):
        config_from_args(["shuffle=1"], {})
    with pytest.raises(SystemExit, match="choose one of"):
        config_from_args(["data=nonexistent"], {})


def test_waiting_ranks_stop_on_the_builders_failure_or_a_timeout(tmp_path, monkeypatch):
    cfg = DataConfig(cache_dir=str(tmp_path), prepare_timeout_s=1.0, verbose=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # not the builder: it waits for local rank 0
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="prepare_timeout_s"):
        prepare(cfg)
    assert 1.0 <= time.monotonic() - started < 5
    target = prepare_module.cache_path(cfg)
    target.with_name(target.name + ".failed").write_text("ValueError: no usable conversation")
    with pytest.raises(RuntimeError, match="no usable conversation"):
        prepare(cfg)


def test_the_global_batch_is_the_same_in_any_split_across_epochs_and_resumes(cfg):
    """dp_size x micro_batch x grad_accum sequences a step, however split: 2 ranks x 1 micro-batch and
    1 rank x 2 accumulated micro-batches take the same sequences every step, also where an epoch ends
    (a step never spans two), and a state saved by either resumes the other."""
    def steps(loaders, grad_accum, count):
        return [sorted(row for loader in loaders for _ in range(grad_accum) for row in rows(next(loader)))
                for _ in range(count)]
    two = [build_loader(cfg, seq_len=16384, dp_rank=r, dp_size=2, seed=7) for r in range(2)]
    one = build_loader(cfg, seq_len=16384, seed=7, grad_accum=2)
    assert one.steps_per_epoch == two[0].steps_per_epoch
    assert len(one._sequences(0)) % 2 == 1, "the sample should leave one sequence over: what this test is about"
    count = one.steps_per_epoch + 3
    assert steps(two, 1, count) == steps([one], 2, count)
    assert one.epoch == 1 and one.state_dict() == two[0].state_dict()
    resumed = build_loader(cfg, seq_len=16384, seed=7, grad_accum=2)
    resumed.load_state_dict(two[1].state_dict())
    assert steps(two, 1, 2) == steps([resumed], 2, 2)
