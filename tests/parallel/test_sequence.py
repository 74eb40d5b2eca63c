"""split_sequence / gather_sequence on 4 gloo processes: the shares each rank holds, the round trip,
and the errors for lengths that cannot be split."""
import pytest
import torch

from distributed import run_distributed
from longctx.parallel.sequence import gather_sequence, sequence_divisor, split_sequence, zigzag_chunk_ids


def _expected_share(x, rank, world_size, dim, layout):
    if layout == "contiguous":
        return x.chunk(world_size, dim=dim)[rank]
    chunks = x.chunk(2 * world_size, dim=dim)
    return torch.cat([chunks[i] for i in zigzag_chunk_ids(rank, world_size)], dim=dim)


def _worker(rank, world_size, tensors):
    from torch.distributed.device_mesh import init_device_mesh
    out = {}
    for name, (x, dim) in tensors.items():
        for layout in ("zigzag", "contiguous"):
            share = split_sequence(x, None, dim=dim, layout=layout)
            out[name, layout] = (share, gather_sequence(share, None, dim=dim, layout=layout))
    # a sub-group: the sp dimension of a 2 x 2 (dp, sp) mesh
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "sp"))
    group = mesh["sp"].get_group()
    x, dim = tensors["seq"]
    share = split_sequence(x, group, dim=dim)
    out["mesh"] = (share, gather_sequence(share, group, dim=dim), mesh.get_local_rank("sp"))
    try:
        split_sequence(torch.zeros(1, 12), None, dim=1, layout="zigzag")  # 12 is not a multiple of 8
    except ValueError as error:
        out["error"] = str(error)
    return out


def test_split_and_gather_round_trip():
    world = 4
    tensors = {"seq": (torch.randn(2, 24, 3), 1), "first": (torch.randn(16, 5), 0),
               "heads": (torch.randn(1, 3, 40, 2), 2), "ids": (torch.randint(100, (1, 8)), 1)}
    results = run_distributed(_worker, world, tensors)
    for rank, got in enumerate(results):
        for name, (x, dim) in tensors.items():
            for layout in ("zigzag", "contiguous"):
                share, whole = got[name, layout]
                assert torch.equal(share, _expected_share(x, rank, world, dim, layout)), (name, layout, rank)
                assert torch.equal(whole, x), (name, layout, rank)
        share, whole, sp_rank = got["mesh"]
        x, dim = tensors["seq"]
        assert torch.equal(share, _expected_share(x, sp_rank, 2, dim, "zigzag"))
        assert torch.equal(whole, x)
        assert "12" in got["error"] and "multiple of 8" in got["error"] and "pad" in got["error"]


def test_zigzag_chunks_cover_the_sequence_once():
    for world in (1, 2, 3, 8):
        chunks = sorted(c for r in range(world) for c in zigzag_chunk_ids(r, world))
        assert chunks == list(range(2 * world))


def test_one_process_and_bad_layout():
    x = torch.randn(1, 6, 2)
    assert torch.equal(split_sequence(x, layout="zigzag"), x)  # no process group: one rank
    assert torch.equal(gather_sequence(x, layout="contiguous"), x)
    with pytest.raises(ValueError, match="unknown sequence layout"):
        split_sequence(x, layout="striped")
    with pytest.raises(ValueError, match="multiple of 2"):
        split_sequence(torch.randn(1, 5), layout="zigzag")
    assert sequence_divisor(4, "zigzag") == 8 and sequence_divisor(4, "contiguous") == 4
