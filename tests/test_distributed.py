"""Several processes (torchrun semantics) on CPUs with gloo: FT's and FLYP's training loss, their ID validation
accuracy and the trained weights equal one process's on the same global batches."""
import importlib
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import common
import data

load_backbone = common.load_backbone


def backbone_without_batchnorm():
    """The tiny embedded CLIP with its BatchNorm layers removed: under DDP BatchNorm normalises each rank's share of
    the batch (as the reference code's nn.DataParallel does per GPU), which one process cannot reproduce exactly."""
    backbone = load_backbone("embedded-clip-tiny")
    trunk = backbone.clip.visual.trunk
    for i, layer in enumerate(trunk):
        if isinstance(layer, nn.BatchNorm2d):
            trunk[i] = nn.Identity()
    return backbone


def run(method, argv):
    common.load_backbone = lambda *a, **k: backbone_without_batchnorm()
    module = importlib.import_module(method)
    module.main(common.parse_args(module.Args, argv))


def worker(rank, world, port, method, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(method, argv)
    torch.distributed.destroy_process_group()  # spawned processes skip atexit


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["ft", "flyp"])
def test_two_processes_match_one(method, tmp_path, monkeypatch):
    load_backbone("embedded-clip-tiny")  # pretrained once, before the processes start
    argv = ["--dataset", "embedded-tiny", "--device", "cpu", "--compile", "off", "--epochs", "2", "--batch-size", "32",
            "--save"]
    monkeypatch.setattr(common, "load_backbone", load_backbone)  # run() patches it; undone after the test
    torch.set_num_threads(1)
    run(method, argv + ["--out", str(tmp_path / "one")])
    mp.spawn(worker, args=(2, free_port(), method, argv + ["--out", str(tmp_path / "two")]), nprocs=2)

    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] and two[0]["processes"] == 2
    for a, b in zip(one, two):
        if "train_loss" in a:  # the mean loss over an epoch of steps: equal only if every step's gradient was
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["metrics"]["acc/id_val"] == pytest.approx(a["metrics"]["acc/id_val"], abs=1e-9)
    w1 = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "two" / "model.pt", weights_only=True)["state_dict"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "two" / "results.previous0.jsonl").exists()  # rank 1 wrote nothing of its own


def test_batch_shares_of_the_ranks_make_up_the_global_batches(monkeypatch):
    single = list(data.BatchIndices(50, 8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(data, "rank_and_world", lambda rank=rank: (rank, 3))
        shares.append(list(data.BatchIndices(50, 8, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(0))))
    assert len(single) == 6 and all(len(s) == 6 for s in shares)
    for i, batch in enumerate(single):
        assert torch.equal(torch.cat([s[i] for s in shares]), batch)
