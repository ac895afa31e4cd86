"""Several processes (torchrun semantics) on CPUs with gloo: FT's and FLYP's training loss, their ID validation
accuracy and the trained weights equal one process's on the same global batches."""
import importlib
import os
import platform
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import common
import data
from conftest import Interrupted, interrupt_at, read_results

load_backbone = common.load_backbone


@pytest.fixture(autouse=True)
def _threads():
    """These tests run one thread per process, as each spawned rank does; the tests after them get the count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("method", ["ft", "flyp"])
def test_two_processes_match_one(method, tmp_path, monkeypatch):
    load_backbone("embedded-clip-tiny")  # pretrained once, before the processes start
    argv = ["--dataset", "embedded-tiny", "--device", "cpu", "--compile", "off", "--epochs", "2", "--batch-size", "32",
            "--save"]
    monkeypatch.setattr(common, "load_backbone", load_backbone)  # run() patches it; undone after the test
    torch.set_num_threads(1)
    run(method, argv + ["--out", str(tmp_path / "one")])
    mp.spawn(worker, args=(2, free_port(), method, argv + ["--out", str(tmp_path / "two")]), nprocs=2)

    two = assert_same_run(tmp_path / "one", tmp_path / "two")
    assert two[0]["processes"] == 2
    assert not (tmp_path / "two" / "results.previous0.jsonl").exists()  # rank 1 wrote nothing of its own


def assert_same_run(one, two):
    """Two runs' results lines and saved weights agree to within float rounding; returns the second's lines."""
    one, two = Path(one), Path(two)
    lines_one, lines_two = read_results(one), read_results(two)
    assert [r["step"] for r in lines_one] == [r["step"] for r in lines_two]
    for a, b in zip(lines_one, lines_two):
        if "train_loss" in a:  # the mean loss over an epoch of steps: equal only if every step's gradient was
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["metrics"]["acc/id_val"] == pytest.approx(a["metrics"]["acc/id_val"], abs=1e-9)
    w1 = torch.load(one / "model.pt", weights_only=True)["state_dict"]
    w2 = torch.load(two / "model.pt", weights_only=True)["state_dict"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    return lines_two


def test_a_run_stopped_in_one_process_resumes_in_two(tmp_path, monkeypatch):
    """resume.pt holds global state (the data order of global batches, one model): every rank reads it, and the run
    goes on in another number of processes, ending as the one-process run that never stopped (FLYP: its gathered
    contrastive batch and its captions drawn from the data-order generator too)."""
    load_backbone("embedded-clip-tiny")
    argv = ["--dataset", "embedded-tiny", "--device", "cpu", "--compile", "off", "--epochs", "2", "--batch-size", "32",
            "--save"]
    monkeypatch.setattr(common, "load_backbone", load_backbone)  # run() patches it; undone after the test
    torch.set_num_threads(1)
    run("flyp", argv + ["--out", str(tmp_path / "whole")])
    with monkeypatch.context() as m:
        interrupt_at(m, "epoch 2/2")
        with pytest.raises(Interrupted):
            run("flyp", argv + ["--out", str(tmp_path / "stopped")])
    common.release_folder(tmp_path / "stopped")  # as the stopped process's end would
    common.wait_for_writes()  # and its resume.pt, written in the background
    mp.spawn(worker, args=(2, free_port(), "flyp", argv + ["--out", str(tmp_path / "stopped"), "--resume"]), nprocs=2)

    resumed = assert_same_run(tmp_path / "whole", tmp_path / "stopped")
    assert [r["processes"] for r in resumed] == [1, 2, 2]  # epoch 1's line from resume.pt, the rest from two
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["done", "model.pt", "results.jsonl"]


def node_worker(rank, world, port, method, argv, tmp_path):
    """A rank whose --out is its node's own folder, tmp_path / node<rank> (as on a disk of each node's own); what
    stopped it goes to tmp_path / rank<rank>.txt."""
    try:
        worker(rank, world, port, method, argv + ["--out", str(tmp_path / f"node{rank}")])
    except SystemExit as e:
        (tmp_path / f"rank{rank}.txt").write_text(str(e))


@pytest.mark.parametrize("rank_1_finds,found", [
    ("nothing", "no resume.pt"),
    ("another run's", "resume.pt with epochs finished: 1"),
    ("a finished run", "a finished run's `done` marker"),
    ("a broken file", "a resume.pt it could not read"),
])
def test_ranks_that_find_different_resume_points_all_stop_and_say_what_each_found(rank_1_finds, found, tmp_path,
                                                                                  monkeypatch):
    """Rank 0 finds the resume.pt of a run stopped in epoch 2; rank 1, none, another run's (stopped there too), a
    finished run or a broken file. Went on from there, they would train different epochs and wait for each other's
    collectives; a rank that stopped alone would leave the other waiting: the test fails after a minute, not hangs."""
    load_backbone("embedded-clip-tiny")
    argv = ["--dataset", "embedded-tiny", "--device", "cpu", "--compile", "off", "--epochs", "2", "--batch-size", "32"]
    monkeypatch.setattr(common, "load_backbone", load_backbone)  # run() patches it; undone after the test
    torch.set_num_threads(1)
    for node in ["node0", "node1"] if rank_1_finds == "another run's" else ["node0"]:
        with monkeypatch.context() as m:
            interrupt_at(m, "epoch 2/2")
            with pytest.raises(Interrupted):
                run("ft", argv + ["--out", str(tmp_path / node)])
        common.release_folder(tmp_path / node)
    if rank_1_finds == "a finished run":
        run("ft", argv + ["--out", str(tmp_path / "node1")])
    common.wait_for_writes()  # resume.pt is written in the background
    if rank_1_finds == "a broken file":  # a copy cut short, say
        (tmp_path / "node1").mkdir()
        (tmp_path / "node1" / "resume.pt").write_bytes((tmp_path / "node0" / "resume.pt").read_bytes()[:1000])
    context = mp.start_processes(node_worker, args=(2, free_port(), "ft", argv + ["--resume"], tmp_path), nprocs=2,
                                 join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank went on or stopped alone, and the ranks hung")

    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("error: --resume: the ranks found different resume points")
        assert f"rank 0 on {platform.node()}: resume.pt with epochs finished: 1 (results lines " in message
        assert f"rank 1 on {platform.node()}: {found}" in message
        assert "file system that every node shares" in message
    assert (tmp_path / "node0" / "resume.pt").is_file()  # nothing was lost


ROWS, WEIGHTS = torch.arange(15.0).reshape(5, 3), torch.linspace(-1, 1, 15).reshape(5, 3)  # a batch; a loss's weights


def gather_worker(rank, world, port, out):
    """all_gather of this rank's share of 5 rows (3 and 2), with and without the global count; what came back."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = {}
    for total in (None, 5):
        x = ROWS.tensor_split(world)[rank].clone().requires_grad_()
        with torch.profiler.profile() as prof:
            gathered = common.all_gather(x, total)
        (gathered * WEIGHTS).sum().backward()
        result[total] = gathered.detach(), x.grad, any(e.key == "aten::_local_scalar_dense" for e in prof.events())
    try:
        common.all_gather(ROWS.tensor_split(world)[rank], 7)  # shares of 7 are 4 and 3: neither rank has them
    except ValueError as e:
        result["error"] = str(e)
    torch.save(result, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_features_gathered_with_the_global_count_need_no_wait_for_the_device(tmp_path):
    """FLYP's loss sees the global batch through all_gather; given the global count, the ranks need not exchange
    their row counts, so the host never waits for the device to read them (one wait per step on a GPU)."""
    mp.spawn(gather_worker, args=(2, free_port(), tmp_path), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for total in (None, 5):
            gathered, grad, _ = result[total]
            assert torch.equal(gathered, ROWS)
            # every rank's loss depends on every row: the gradient is summed over the ranks (DDP then averages it)
            torch.testing.assert_close(grad, 2 * WEIGHTS.tensor_split(2)[rank])
        assert result[None][2] and not result[5][2]  # the row counts were read only where they were not given
        assert result["error"] == f"all_gather: rank {rank} has {3 - rank} rows, but its share of 7 is {4 - rank}"


IMAGES = data.Split(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                    torch.zeros(10, dtype=torch.long))


def encoder_with_batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def extract_worker(rank, world, port, out):
    """extract_features under two ranks that disagree on everything they could: rank 0 alone finds the cached
    features (its own cache folder, as on node-local disks), and each rank has BatchNorm statistics of its own
    (DDP's last training step updates them from each rank's share). What each rank got back, and its buffers."""
    import datetime

    os.environ["RFT_CACHE"] = str(out / f"cache{rank}")  # read by cache_dir() at each call
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))  # a hang fails, not waits
    encoder = encoder_with_batchnorm()
    encoder[1].running_mean.fill_(rank)
    cached = common.extract_features(encoder, IMAGES, "cpu", cache="0123456789abcdef")
    fresh = common.extract_features(encoder, IMAGES, "cpu")
    torch.save({"cached": cached, "fresh": fresh, "buffers": dict(encoder.named_buffers())}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_that_disagree_about_the_feature_cache_or_batchnorm_extract_the_same_features(tmp_path):
    """The cache is read only if every rank finds it (a rank that extracted alone would wait in all_gather forever),
    and every rank evaluates with rank 0's BatchNorm statistics: those of the model.pt rank 0 saves."""
    (tmp_path / "cache0" / "features").mkdir(parents=True)
    torch.save(torch.full((10, 4), -1.0), tmp_path / "cache0" / "features" / "0123456789abcdef.pt")
    mp.spawn(extract_worker, args=(2, free_port(), tmp_path), nprocs=2)
    encoder = encoder_with_batchnorm()
    encoder[1].running_mean.fill_(0)  # rank 0's
    expected = common.extract_features(encoder, IMAGES, "cpu")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["cached"], expected)  # extracted by both, not rank 0's file
        torch.testing.assert_close(result["fresh"], expected)
        torch.testing.assert_close(result["buffers"], dict(encoder.named_buffers()))
    torch.testing.assert_close(torch.load(tmp_path / "cache0" / "features" / "0123456789abcdef.pt"), expected)


class RefusesEmptyBatches(nn.Module):
    """Each image's mean colour; like open_clip's ViT, it fails on a batch of no images."""
    output_dim = 3

    def forward(self, x):
        if not len(x):
            raise RuntimeError("cannot reshape tensor of 0 elements")
        return x.mean((2, 3))


def empty_share_worker(rank, world, port, paths, out):
    """extract_features of 5 image files in batches of 2, decoded by the loader's worker and on the device: the last
    batch's one image leaves rank 1 an empty share."""
    os.environ["RFT_WORKERS"] = "1"  # the batches collate in a worker process, as on real data
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    feats = {}
    for on_device in (False, True):
        os.environ["RFT_GPU_DECODE"] = str(int(on_device))  # read by file_split
        split = data.file_split(paths, range(len(paths)), data.preprocessing("embedded-clip-tiny"))
        assert split.decode_on_device == on_device
        feats[on_device] = common.extract_features(RefusesEmptyBatches(), split, "cpu", batch_size=2)
    torch.save(feats, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_a_rank_with_no_image_in_the_last_evaluation_batch_still_gathers_every_feature(tmp_path):
    """A split of 5 images in batches of 2 over 2 ranks: rank 1's share of the last batch is empty. It must still
    join the gather, without collating or encoding nothing (which crashed every torchrun evaluation of a real split
    whose size was 1 over a multiple of the batch), and every rank gets the features one process extracts."""
    from PIL import Image

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (40, 40), (50 * i, 10, 200 - 30 * i)).save(paths[-1])
    expected = common.extract_features(RefusesEmptyBatches(), data.file_split(
        paths, range(5), data.preprocessing("embedded-clip-tiny")), "cpu", batch_size=2)
    assert expected.shape == (5, 3)
    mp.spawn(empty_share_worker, args=(2, free_port(), paths, tmp_path), nprocs=2)
    for rank in range(2):
        feats = torch.load(tmp_path / f"rank{rank}.pt")
        for on_device in (False, True):
            torch.testing.assert_close(feats[on_device], expected, atol=3 / 255, rtol=0)  # nvJPEG: within 2 levels


def compile_worker(rank, world, port, out):
    """FT's layout (the encoder compiled, then encoder and head wrapped in DDP) with 1 MB gradient buckets: how many
    graphs Dynamo compiled for the encoder, without and with DDP around it, and the gradients of one step."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    graphs = []

    def recording(gm, example_inputs):  # stands in for inductor and runs the graph eagerly
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    torch.compile = lambda model, **kw: compile_(model, backend=recording, **kw)  # this spawned process only
    torch.manual_seed(0)
    encoder = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(512, 512), nn.ReLU())])  # 4 MB of weights
    head, x = nn.Linear(512, 10), torch.randn(8, 512)
    eager = torch.autograd.grad(head(encoder(x)).sum(), [*encoder.parameters(), *head.parameters()])
    common.maybe_compile(encoder, "on")(x)
    alone = len(graphs)
    torch._dynamo.reset()
    ddp = nn.parallel.DistributedDataParallel
    nn.parallel.DistributedDataParallel = lambda module, **kw: ddp(module, bucket_cap_mb=1, **kw)
    net = common.distribute(nn.Sequential(common.maybe_compile(encoder, "on"), head), torch.device("cpu"))
    net(x).sum().backward()  # every rank has the same batch: the averaged gradient is one process's
    grads = [p.grad for p in net.parameters()]
    torch.save({"alone": alone, "ddp": len(graphs) - alone, "eager": eager, "grads": grads}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_compiled_model_under_ddp_is_split_at_the_gradient_buckets(tmp_path):
    """Compiling the model and then wrapping it in DDP, as the methods do, still lets the all-reduce of one bucket of
    gradients run while the backward computes the next: Dynamo splits the graph at DDP's buckets (DDPOptimizer)."""
    mp.spawn(compile_worker, args=(2, free_port(), tmp_path), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["alone"] == 1 and result["ddp"] >= 3, result  # 4 MB of gradients in 1 MB buckets
        for grad, expected in zip(result["grads"], result["eager"], strict=True):
            torch.testing.assert_close(grad, expected)


def shares_of(monkeypatch, world, n, batch_size, drop_last):
    """Every rank's index batches of one shuffled pass, as the ranks of a `world`-process run would draw them."""
    shares = []
    for rank in range(world):
        monkeypatch.setattr(data, "rank_and_world", lambda rank=rank: (rank, world))
        shares.append(list(data.BatchIndices(n, batch_size, shuffle=True, drop_last=drop_last,
                                             generator=torch.Generator().manual_seed(0))))
    monkeypatch.undo()
    return shares


@pytest.mark.parametrize("batch_size,drop_last,batches", [(9, True, 5), (8, False, 7)])
def test_batch_shares_of_the_ranks_make_up_the_global_batches(monkeypatch, batch_size, drop_last, batches):
    """Training (drop_last) batches split evenly; evaluation batches may split unevenly (features are gathered)."""
    single = list(data.BatchIndices(50, batch_size, shuffle=True, drop_last=drop_last,
                                    generator=torch.Generator().manual_seed(0)))
    shares = shares_of(monkeypatch, 3, 50, batch_size, drop_last)
    assert len(single) == batches and all(len(s) == batches for s in shares)
    for i, batch in enumerate(single):
        assert torch.equal(torch.cat([s[i] for s in shares]), batch)


@pytest.mark.parametrize("n,batch_size,drop_last,sizes", [
    (45, 9, True, [9] * 5), (50, 9, True, [9] * 5), (9, 9, True, [9]), (48, 8, False, [8] * 6),
    (50, 8, False, [8] * 6 + [2])])
def test_a_pass_has_len_batches_and_drops_only_a_partial_last_one(n, batch_size, drop_last, sizes):
    """len() is the total progress bars show; a training pass drops the last batch only when it is partial (a split
    of exactly one batch trains on it, a split of whole batches loses none), an evaluation pass keeps every image."""
    indices = data.BatchIndices(n, batch_size, shuffle=True, drop_last=drop_last,
                                generator=torch.Generator().manual_seed(0))
    batches = list(indices)
    assert [len(b) for b in batches] == sizes
    assert len(indices) == len(sizes)
    seen = torch.cat(batches).tolist()
    assert len(set(seen)) == len(seen) and (drop_last or sorted(seen) == list(range(n)))


def test_training_batch_that_does_not_split_over_the_processes_is_an_error(monkeypatch):
    """Unequal shares would weigh the ranks' mean losses unequally under DDP's gradient average."""
    with pytest.raises(SystemExit, match="does not split evenly over 3 processes: pass --batch-size with a "
                                         "multiple of 3, such as 6"):
        shares_of(monkeypatch, 3, 50, 8, drop_last=True)


def test_loader_workers_share_the_cores_among_the_local_processes(monkeypatch):
    monkeypatch.delenv("RFT_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.num_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "128")
    assert data.num_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data.num_workers() == 16
    monkeypatch.setenv("RFT_WORKERS", "3")
    assert data.num_workers() == 3


def test_loader_workers_count_the_cores_this_process_may_use_not_the_machines(monkeypatch):
    """A job given 8 of a node's 128 cores (SLURM, a cgroup cpuset, taskset): os.cpu_count() says 128, and 16
    workers per loader would share 8 cores."""
    monkeypatch.delenv("RFT_WORKERS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert data.num_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data.num_workers() == 2


def fake_process_group(monkeypatch, **env):
    """torchrun's variables set, torch.distributed and atexit replaced: what init_distributed calls is recorded in
    the dict returned (backend, at_exit; a test adds its own torch.cuda.set_device)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.update(backend=backend))
    monkeypatch.setattr(common.atexit, "register", lambda f: calls.update(at_exit=f))
    return calls


def test_init_distributed_takes_the_gpu_of_the_local_rank_not_the_global_rank(monkeypatch):
    """On the second of two 8-GPU nodes, global rank 9 is GPU 1 of its node: cuda:9 does not exist there."""
    calls = fake_process_group(monkeypatch, WORLD_SIZE="16", RANK="9", LOCAL_RANK="1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.update(device=device))
    device = common.init_distributed(torch.device("cuda"))
    assert device == torch.device("cuda", 1)
    assert calls == {"device": torch.device("cuda", 1), "backend": "nccl",
                     "at_exit": torch.distributed.destroy_process_group}


def test_only_rank_0_writes_results_checkpoints_resume_points_and_the_done_marker(tmp_path, monkeypatch):
    """Every rank holds the same metrics; a second writer would race rank 0 (and move its files aside)."""
    import ft

    monkeypatch.setattr(data, "rank_and_world", lambda: (1, 2))
    results = common.Results(tmp_path / "out", "ft", ft.Args(dataset="embedded-tiny"), torch.device("cpu"))
    record = results.log(0, {"acc/id_val": 50.0})
    results.save_model(nn.Linear(2, 2), step=0)
    results.save_for_resume(1, None, {"model": nn.Linear(2, 2)})
    results.done({"step": 0, "metrics": record["metrics"]})
    assert record["processes"] == 2 and record["metrics"] == {"acc/id_val": 50.0}  # built, just not written
    assert list(tmp_path.iterdir()) == []


def test_a_torchrun_job_does_not_pretrain_an_embedded_model_in_each_process(tmp_path, monkeypatch):
    """Each rank pretrained it and wrote it to the cache, on torchrun's one thread each, which makes another model
    than a plain run (pretrain.py, or the first single-process run); every process stops, with the command that
    pretrains it."""
    import pretrain

    monkeypatch.setenv("RFT_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(common, "all_reduce_sum", lambda found: (found + 1.0,))  # the other process finds it
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pretrained in a torchrun process"))
    with pytest.raises(SystemExit, match=r"1 of the 2 processes find no cached embedded-clip-tiny \(this one lacks "
                                         r".*\); pretrain it once before a torchrun job.*: python pretrain.py "
                                         r"--backbone embedded-clip-tiny$"):
        common.load_embedded_clip("embedded-clip-tiny", log=lambda msg: None)
    assert list(tmp_path.iterdir()) == []
    # This process finds it and the other does not (a node with a cache of its own): every process stops, or this one
    # would wait for the other in the first collective.
    common.embedded_cache_path(common.EMBEDDED_BACKBONES["embedded-clip-tiny"]).write_bytes(b"")
    monkeypatch.setattr(common, "all_reduce_sum", lambda found: (found + 0.0,))
    with pytest.raises(SystemExit, match=r"1 of the 2 processes find no cached embedded-clip-tiny \(this one finds"):
        common.load_embedded_clip("embedded-clip-tiny", log=lambda msg: None)


def test_init_distributed_on_cpus_joins_with_gloo_and_leaves_the_group_at_exit(monkeypatch):
    """A CPU rank keeps its device and joins with gloo (NCCL needs GPUs); the group is destroyed at exit."""
    calls = fake_process_group(monkeypatch, WORLD_SIZE="2", LOCAL_RANK="1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("a CPU rank set a CUDA device"))
    assert common.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert calls == {"backend": "gloo", "at_exit": torch.distributed.destroy_process_group}


def test_init_distributed_leaves_a_group_that_is_already_joined_as_it_is(monkeypatch):
    """A second init_process_group raises: a process that joined already (its launcher, a second main()) keeps its
    group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: pytest.fail("joined twice"))
    monkeypatch.setattr(common.atexit, "register", lambda f: pytest.fail("a second exit handler"))
    assert common.init_distributed(torch.device("cpu")) == torch.device("cpu")


def test_shares_and_gather_of_an_uneven_batch_over_three_ranks(monkeypatch):
    """shard() and all_gather(x, total) split 7 rows over 3 ranks as BatchIndices does, 3 + 2 + 2 (chunk() would
    give 3 + 3 + 1); the gather puts the rows back in order and the backward returns each rank's rows of the summed
    gradient. One process stands in for the 3 ranks: all_gather and all_reduce are replaced by what gloo would do."""
    rows, weights = torch.arange(21.0).reshape(7, 3), torch.linspace(-1, 1, 21).reshape(7, 3)
    expected_shares = [[0, 1, 2], [3, 4], [5, 6]]  # by hand: the first 7 % 3 ranks get one row more

    def gather(parts, tensor):  # every rank's share, padded to the longest, as each rank would send it
        for part, idx in zip(parts, expected_shares):
            part.copy_(torch.cat([rows[idx], rows.new_zeros(len(part) - len(idx), 3)]))

    monkeypatch.setattr(torch.distributed, "all_gather", gather)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(3))  # 3 ranks, each with the same loss
    for rank in range(3):
        monkeypatch.setattr(data, "rank_and_world", lambda rank=rank: (rank, 3))
        assert common.shard(torch.arange(7)).tolist() == expected_shares[rank]
        assert [b.tolist() for b in data.BatchIndices(7, 7, shuffle=False, drop_last=False)] == [expected_shares[rank]]
        x = rows[expected_shares[rank]].clone().requires_grad_()
        gathered = common.all_gather(x, total=7)
        assert torch.equal(gathered, rows)
        (gathered * weights).sum().backward()
        torch.testing.assert_close(x.grad, 3 * weights[expected_shares[rank]])
