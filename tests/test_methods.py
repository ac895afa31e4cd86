"""Each method script end to end on the tiny embedded world, and the method invariants."""
import copy
import dataclasses
import importlib
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import data
import feature_map
import flyp
import flyp_fewshot
import ft
import l2sp
import lp
import lpft
from conftest import (ROOT, Interrupted, computed_lines, interrupt_at, read_results, record_optimizers,
                      what_was_computed, write_noise_pngs)

METHODS = ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp"]


def run_script(method, *argv):
    proc = subprocess.run([sys.executable, str(ROOT / f"{method}.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("method", METHODS)
def test_script_end_to_end(method, tmp_path):
    run_script(method, "--dataset", "embedded-tiny", "--out", str(tmp_path), "--seed", "1")
    lines = read_results(tmp_path)
    done = json.loads((tmp_path / "done").read_text())
    assert lines and all(r["method"] == method and r["seed"] == 1 and r["args"]["dataset"] == "embedded-tiny" for r in lines)
    assert {"commit", "versions", "device", "host", "command", "data"} <= set(lines[0])
    assert lines[0]["host"]["cpu"] and lines[0]["host"]["threads"] >= 1
    assert lines[0]["data"]["sizes"] == {"id_train": 200, "id_val": 100, "id_test": 100, "ood_sketch": 100,
                                         "ood_painting": 100, "ood_neon": 100}  # WORLDS["embedded-tiny"]
    keys = {"acc/id_val", "acc/id_test", "acc/ood_sketch", "acc/ood_painting", "acc/ood_neon", "acc/ood_avg",
            "distortion/id_test", "distortion/ood_avg"}
    assert keys <= set(done["metrics"])
    # what summarize.py checks before it averages seeds: the backbone, and the recipe of the methods that have one
    assert done["backbone"] == "embedded-clip-tiny" and (done["recipe"] is None) == (method in ("zeroshot", "lp"))
    assert {"file", "bytes", "sha1"} <= done["weights"].keys()  # which embedded model: its hash
    # The reported evaluation is the one with the best ID validation accuracy among the logged ones.
    candidates = [r for r in lines if r.get("stage") != "lp"]
    assert method == "zeroshot" or len(candidates) >= 2
    assert done["metrics"]["acc/id_val"] == max(r["metrics"]["acc/id_val"] for r in candidates)


@pytest.mark.parametrize("method, lr", [("ft", "1e6"), ("lpft", "1e6"), ("l2sp", "1e6"), ("flyp", "1e3")])
def test_a_run_whose_training_loss_turns_nan_stops_with_an_error_and_is_not_filed_as_finished(method, lr, tmp_path):
    """A diverged run (far too high an lr) stops at the epoch whose loss is NaN, naming it and the lr, and writes no
    `done` marker: summarize.py would put its numbers in the table as a result of the recipe. The epochs before it
    keep their results lines."""
    module = importlib.import_module(method)
    argv = ["--dataset", "embedded-tiny", "--epochs", "3", "--lr", lr, "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        module.main(common.parse_args(module.Args, argv))
    said = re.fullmatch(r"error: the training loss of epoch (\d) is nan: the run diverged; train with a lower --lr "
                        r"than (\S+)", str(stop.value))
    assert said and float(said[2]) == float(lr), stop.value
    assert not (tmp_path / "done").exists()
    lines = read_results(tmp_path) if (tmp_path / "results.jsonl").exists() else []
    assert [r["step"] for r in lines if "train_loss" in r] == list(range(1, int(said[1])))
    assert all(math.isfinite(r["train_loss"]) for r in lines if "train_loss" in r)


@pytest.mark.parametrize("method", METHODS)
def test_the_gpus_default_bf16_autocast_runs_every_method_on_the_cpu_too(method, tmp_path):
    """bf16 autocast is the default on CUDA, which CI lacks; on the CPU the same autocast runs the same code, so a
    dtype clash there (bf16 activations meeting fp32 weights outside autocast, a loss or penalty left in bf16) shows
    here. The run finishes with finite metrics under the usual keys and its convolutions compute in bf16."""
    outputs = set()  # the dtypes of every convolution's output
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: outputs.add(out.dtype) if isinstance(module, torch.nn.Conv2d) else None)
    try:
        module = importlib.import_module(method)
        module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path), precision="bf16",
                                **({"epochs": 1} if hasattr(module.Args, "epochs") else {})))
    finally:
        hook.remove()
    assert outputs == {torch.bfloat16}
    lines = read_results(tmp_path)
    done = json.loads((tmp_path / "done").read_text())
    assert lines[0]["args"]["precision"] == "bf16" and done["metrics"].keys() >= {"acc/id_test", "acc/ood_avg",
                                                                                "distortion/ood_avg"}
    assert all(math.isfinite(v) for r in lines for v in [*r["metrics"].values(), r.get("train_loss", 0.0)]), lines


@pytest.mark.parametrize("argv,expected", [
    (["--dataset", "imagenet-on-mars"], "choose one of: embedded"),
    (["--dataset", "embedded-tiny", "--backbone", "vit-huge-9000"], "choose one of: embedded-clip"),
    (["--dataset", "embedded-tiny", "--backbone", "clip-vit-b16", "--weights", "/nowhere/ViT-B-16.pt"], "not found"),
    (["--dataset", "embedded-tiny", "--backbone", "resnet50"], "resnet50 needs --weights"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the command line, in process (a subprocess would spend seconds importing torch)
    monkeypatch.setattr(sys, "argv", ["lpft.py", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "lpft.py"), run_name="__main__")
    message = capsys.readouterr().err + str(e.value.code)  # argparse prints its errors; ours are the exit's message
    assert e.value.code not in (0, None) and expected in message, message[-2000:]
    assert not list(tmp_path.iterdir())  # stopped before anything was written


@pytest.mark.parametrize("method", METHODS + ["flyp_fewshot"])
def test_a_missing_weights_file_stops_the_run_before_the_dataset_is_read(method, tmp_path, monkeypatch):
    module = importlib.import_module(method)  # the weights are checked before ImageNet's 1.3 M files are listed
    monkeypatch.setenv("RFT_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the dataset was read first"))
    with pytest.raises(SystemExit, match="clip-vit-b16 needs --weights"):
        module.main(module.Args(dataset="imagenet", data_root=str(tmp_path), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,option,expected", [
    ("lpft", {"epochs": 0}, "--epochs 0: must be at least 1"),
    ("ft", {"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ("lp", {"num_c": 0}, "--num-c 0: must be at least 1"),
    ("lp", {"c_min": 0.0}, "--c-min 0.0: must be above 0"),
    ("lpft", {"c_min": 1.0, "c_max": 0.1}, "--c-min 1.0 is above --c-max 0.1"),
    ("lp", {"num_c": 1}, "--num-c 1 would fit --c-min 1e-07 only (--c-max 100.0 unused)"),
    ("wiseft", {"alpha_step": 0.3}, "--alpha-step 0.3 does not divide 1"),  # before its checkpoint is looked for
    ("l2sp", {"lr": -1.0}, "--lr -1.0: must be 0 or more"),
    ("flyp", {"weight_decay": float("nan")}, "--weight-decay nan: must be a finite number, 0 or more"),
    ("ft", {"lr": float("inf")}, "--lr inf: must be a finite number, 0 or more"),
    ("lpft", {"momentum": 1.0}, "--momentum 1.0: must be 0 or more and below 1"),
    ("l2sp", {"momentum": -0.5}, "--momentum -0.5: must be 0 or more and below 1"),
    ("flyp", {"batch_size": 1}, "--batch-size 1: FLYP's contrastive loss needs at least 2 image-caption pairs"),
    ("zeroshot", {"seed": -1}, "--seed -1: must be from 0 to 2**32 - 1"),
    ("lpft", {"seed": 2 ** 32}, "--seed 4294967296: must be from 0 to 2**32 - 1"),
    ("flyp_fewshot", {"shots": 0}, "--shots 0: must be at least 1"),
    ("ft", {"compile": "maybe"}, "--compile 'maybe': choose auto, on, off"),
    ("ft", {"precision": "fp16"}, "--precision 'fp16': choose auto, bf16, fp32"),
    ("ft", {"device": "tpu"}, "unknown --device 'tpu'"),
    ("ft", {"device": "mps"}, "--device mps: these scripts run on cpu or cuda"),  # torch knows it; we do not
    ("zeroshot", {"device": "meta"}, "--device meta: these scripts run on cpu or cuda"),
    ("l2sp", {"all_params": True, "beta": 5.0}, "--beta 5.0 does nothing with --all-params (the LP-FT code's "
                                                "penalty has no head term)"),
    ("lpft", {"data_root": ""}, "--data-root is empty; pass a value or leave the flag out"),  # `--data-root $UNSET`
    ("ft", {"head_init": "lp"}, "--head-init 'lp': choose random, zeroshot"),
    ("ft", {"head_init": "zeroshot", "backbone": "resnet50"}, "--head-init zeroshot needs a CLIP backbone"),
])
def test_impossible_options_stop_the_run_before_it_starts(method, option, expected, tmp_path, monkeypatch):
    module = importlib.import_module(method)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the dataset was read first"))
    with pytest.raises(SystemExit) as e:
        module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path / "out"), **option))
    assert expected in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, expected", [
    ({"RFT_WORKERS": "abc"}, "RFT_WORKERS='abc': expected a whole number, 0 or more"),  # was a ValueError
    ({"RFT_WORKERS": "-2"}, "RFT_WORKERS='-2': expected a whole number, 0 or more"),
    ({"RFT_GPU_DECODE": "yes"}, "RFT_GPU_DECODE='yes': expected 1"),  # was silently off
    ({"RFT_CACHE": "{file}"}, "the cache folder {file} (RFT_CACHE) cannot be made: it is a file"),
    ({"RFT_CACHE": "{file}/sub"}, "the cache folder {file}/sub (RFT_CACHE) cannot be made"),
])
def test_a_malformed_environment_variable_stops_the_run_before_it_starts(env, expected, tmp_path, monkeypatch):
    """An RFT_CACHE that names a file failed only when the pretrained model was written, after its pretraining."""
    (tmp_path / "file").write_text("")
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(file=tmp_path / "file"))
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the dataset was read first"))
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded first"))
    with pytest.raises(SystemExit) as e:
        lp.main(lp.Args(dataset="embedded-tiny", out=str(tmp_path / "out")))
    assert expected.format(file=tmp_path / "file") in str(e.value) and not (tmp_path / "out").exists()


def test_a_data_root_from_rft_data_that_is_not_a_folder_says_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("RFT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=rf"data root {re.escape(str(tmp_path / 'nowhere'))} \(from \$RFT_DATA\) is "):
        data.load_dataset("living17", backbone="embedded-clip-tiny")
    with pytest.raises(SystemExit, match=r"nowhere is not a folder"):  # --data-root: the user named it
        data.load_dataset("living17", data_root=str(tmp_path / "nowhere"), backbone="embedded-clip-tiny")


def test_same_seed_same_result(tmp_path):
    a = ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "a"), seed=3))
    b = ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "b"), seed=3))
    assert a["metrics"] == b["metrics"]


def test_ft_moves_features_and_head_is_random(tmp_path):
    best = ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=2, lr=0.05))
    assert best["metrics"]["distortion/id_test"] > 0 and best["metrics"]["distortion/ood_avg"] > 0


FINE_TUNED = {"ft": {}, "l2sp": {}, "lpft": {"num_c": 5}}  # the methods that train a classifier end to end


@pytest.mark.parametrize("method", sorted(FINE_TUNED))
def test_fine_tuning_trains_the_whole_encoder_with_batchnorm_statistics_frozen_only_in_lpft(method, tmp_path):
    """Every weight trains in all three; FT and L2-SP train in train mode (BatchNorm statistics move), LP-FT's stage 2
    in eval mode (they stay the pretrained ones: the LP-FT code's recipe)."""
    module = importlib.import_module(method)
    module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=1, save=True, **FINE_TUNED[method]))
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    start = common.load_backbone("embedded-clip-tiny").encoder.state_dict()
    moved = {k: not torch.equal(saved[f"0.{k}"], v) for k, v in start.items()}
    assert all(moved[k] for k in start if k.endswith("weight")), moved  # not only the head
    statistics = [k for k in start if "running_" in k]
    assert statistics and all(moved[k] == (method != "lpft") for k in statistics), moved


@pytest.mark.parametrize("method", sorted(FINE_TUNED) + ["flyp"])
def test_the_selected_epoch_is_the_one_scored_and_saved_even_when_it_is_not_the_last(method, tmp_path, monkeypatch):
    """Epoch 1 is made to look best on ID validation: the final scores and the checkpoint must be epoch 1's model
    (a selection that kept a reference to the live weights would report the last epoch's under epoch 1's name)."""
    evaluate, calls = common.evaluate, []  # (an epoch's selection call?, the ID validation features it scored)

    def scripted(features, classify, dataset, ref, device):
        metrics = evaluate(features, classify, dataset, ref, device)
        selecting = set(features) == {"id_val"}  # the final call scores every split
        calls.append((selecting, features["id_val"]))
        if selecting:
            metrics["acc/id_val"] = 90.0 if sum(c[0] for c in calls) == 1 else 10.0
        return metrics

    monkeypatch.setattr(common, "evaluate", scripted)
    module = importlib.import_module(method)
    best = module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=2, save=True,
                                   **FINE_TUNED.get(method, {})))
    assert best["step"] == torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 1
    epoch1, epoch2 = [f for selecting, f in calls if selecting]
    assert not torch.equal(epoch1, epoch2)  # the epochs differ, so the check has teeth
    assert torch.equal(calls[-1][1], epoch1)  # the final scores are epoch 1's model's


@pytest.mark.parametrize("method", sorted(FINE_TUNED) + ["flyp"])
def test_a_resumed_run_ends_exactly_as_one_never_stopped(method, tmp_path, monkeypatch):
    """A run of 4 epochs stopped in its third and started again with --resume goes on from resume.pt (written after
    each epoch) and ends bit for bit as the run that never stopped: the same results lines (each epoch's once, LP-FT's
    probe line once), the same selected epoch, the same saved model. Model, optimizer (momentum, AdamW's moments),
    schedule, data order (FLYP's captions too), the best epoch so far and the lines written all come back."""
    module = importlib.import_module(method)

    def run(out, **options):
        return module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path / out), epochs=4, save=True,
                                       **FINE_TUNED.get(method, {}), **options))

    common.load_backbone("embedded-clip-tiny")  # pretrained before: the first run's header would say it was not yet
    run("whole")
    with monkeypatch.context() as m:
        interrupt_at(m, "epoch 3/4")  # two epochs left: the schedule's next step comes from its resumed state
        with pytest.raises(Interrupted):
            run("stopped")
    common.wait_for_writes()  # resume.pt is written in the background
    assert torch.load(tmp_path / "stopped" / "resume.pt", weights_only=True)["epoch"] == 2
    torch.manual_seed(12345)  # as in a new process: other global random states
    run("stopped", resume=True)
    lines, model = what_was_computed(tmp_path / "stopped")
    whole_lines, whole_model = what_was_computed(tmp_path / "whole")
    assert lines == whole_lines and [r["step"] for r in lines][-5:] == [1, 2, 3, 4, lines[-1]["step"]]
    assert model.keys() == whole_model.keys() and all(torch.equal(model[k], whole_model[k]) for k in model)
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["done", "model.pt", "results.jsonl"]


@pytest.mark.parametrize("images", ["embedded", "files"])
def test_a_resumed_fewshot_run_ends_exactly_as_one_never_stopped(images, tmp_path, monkeypatch):
    """Few-shot FLYP stopped in its third draw goes on after the second: the same draws (the generator and the global
    random states come back; each draw starts from the zero-shot model), each draw's line once, the same mean and
    standard deviation over all three. From image files, each draw's crops too."""
    where = {"dataset": "embedded-tiny"}
    if images == "files":  # noise: every crop differs
        for j, part in enumerate(("train", "val", "test")):
            for k, c in enumerate(("cat", "dog")):
                write_noise_pngs(tmp_path / "data" / part / c, [(40, 48)] * 6, seed=10 * j + k)
        where = {"dataset": "folder", "data_root": str(tmp_path / "data"), "backbone": "embedded-clip-tiny"}

    def run(out, **options):
        return flyp_fewshot.main(flyp_fewshot.Args(**{**where, "draws": 3, "steps": 2, "shots": 4, **options},
                                                   out=str(tmp_path / out)))

    whole = run("whole")
    drawn, draw_shots = [], flyp_fewshot.draw_shots

    def stopping(*args):  # two draws of shots per draw (train, validation): the fifth is the third draw's first
        drawn.append(1)
        if len(drawn) == 5:
            raise Interrupted("draw 2")
        return draw_shots(*args)

    with monkeypatch.context() as m:
        m.setattr(flyp_fewshot, "draw_shots", stopping)
        with pytest.raises(Interrupted):
            run("stopped")
    common.wait_for_writes()  # resume.pt is written in the background
    saved = torch.load(tmp_path / "stopped" / "resume.pt", weights_only=True)
    assert saved["epoch"] == 2
    resumed = {"resume": True}
    if images == "embedded":  # one written before the script took its file's name, and --shots its recipe's, resumes
        recipe = {k: v for k, v in saved["recipe"].items() if k != "shots"}  # too, with or without --shots
        torch.save({**saved, "method": "flyp-fewshot", "recipe": recipe}, tmp_path / "stopped" / "resume.pt")
        resumed["shots"] = None  # embedded-tiny's recipe: 4
    torch.manual_seed(12345)  # as in a new process: other global random states
    assert run("stopped", **resumed) == whole
    lines = computed_lines(tmp_path / "stopped")
    assert lines == computed_lines(tmp_path / "whole") and [r["step"] for r in lines] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["done", "results.jsonl"]


def test_a_killed_script_resumes_from_the_command_line(tmp_path):
    """The real thing: ft.py killed (SIGKILL, no clean-up of any kind) once its first resume.pt is on disk, then the
    same command with --resume: the run ends as the one that never stopped, each epoch's line once."""
    import signal
    import time

    options = ["--dataset", "embedded-tiny", "--epochs", "8", "--save"]
    run_script("ft", *options, "--out", str(tmp_path / "whole"))
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(ROOT / "ft.py"), *options, "--out", str(stopped)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not (stopped / "resume.pt").exists() and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not (stopped / "done").exists()
    resumed = run_script("ft", *options, "--out", str(stopped), "--resume")
    assert f"note: resuming {stopped} (resume.pt; epochs finished: " in resumed.stderr
    lines, model = what_was_computed(stopped)
    whole_lines, whole_model = what_was_computed(tmp_path / "whole")
    assert lines == whole_lines and [r["step"] for r in lines][:8] == list(range(1, 9))
    assert all(torch.equal(model[k], whole_model[k]) for k in whole_model)


def test_a_run_stopped_while_scoring_its_selected_epoch_resumes_to_the_scoring(tmp_path, monkeypatch):
    """Stopped after its last epoch, in the final scoring of every split (on ImageNet, half a million OOD images): the
    resumed run trains no more and scores the selected epoch, as the run that never stopped did."""
    whole = ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "whole"), epochs=2))
    evaluate = common.evaluate

    def stopping(features, *rest):
        if set(features) != {"id_val"}:
            raise Interrupted("the final scoring")
        return evaluate(features, *rest)

    with monkeypatch.context() as m:
        m.setattr(common, "evaluate", stopping)
        with pytest.raises(Interrupted):
            ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "stopped"), epochs=2))
    progress = common.progress
    monkeypatch.setattr(common, "progress", lambda iterable, desc="", total=None: pytest.fail(f"{desc} ran again")
                        if desc.startswith("epoch") else progress(iterable, desc, total))
    resumed = ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "stopped"), epochs=2, resume=True))
    assert resumed["metrics"] == whole["metrics"] and resumed["step"] == whole["step"]
    steps = [[r["step"] for r in read_results(tmp_path / run)] for run in ("stopped", "whole")]
    assert steps[0] == steps[1]


def test_resume_refuses_another_recipe_method_or_data_and_a_finished_run_and_starts_afresh_where_there_is_nothing(
        tmp_path, monkeypatch):
    """--resume goes on only from the same method's resume.pt, made with the same recipe (flags, or RECIPES as edited
    since: the run would be half one recipe, half another) and data; the recipe's own values given as flags are the
    same recipe. A finished run has nothing to resume; a folder without resume.pt (a run stopped in its first epoch)
    starts from the beginning, an unreadable one stops it. A new run without --resume keeps an old resume.pt aside;
    what a killed write left (resume.pt.tmp<pid>) goes when the next run takes the folder."""
    out = tmp_path / "ft"
    with monkeypatch.context() as m:
        interrupt_at(m, "epoch 2/2")
        with pytest.raises(Interrupted):
            ft.main(ft.Args(dataset="embedded-tiny", out=str(out), epochs=2))
    common.release_folder(out)  # as the stopped process's end would
    (out / "resume.pt.tmp999999").write_bytes(b"half a file")
    for mine in ("thesis.tmp2.tex", "backup.tmp1", "model.pt.tmp1.bak"):  # a user's files: not write_atomic's
        (out / mine).write_text("kept")
    load = data.load_dataset

    def smaller(*args, **kwargs):  # the same dataset with 10 training images fewer (another --data-root, say)
        dataset = load(*args, **kwargs)
        return dataclasses.replace(dataset, train=dataset.train.subset(range(190)))

    recipe = "epochs 2, lr 0.03, batch_size 64"
    as_is = lambda m: None  # noqa: E731
    tiny = common.embedded_cache_path(common.EMBEDDED_BACKBONES["embedded-clip-tiny"])
    for module, options, change, expected in [
            (ft, {"seed": 1}, as_is,
             "its resume.pt comes from a run with other options: --seed 1 (it ran with --seed 0)"),
            (ft, {"lr": 0.5}, lambda m: m.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data read")),
             "its resume.pt comes from a run with other options: --lr 0.5 (it ran with --lr 0.03)"),  # before the data
            (ft, {}, lambda m: m.setitem(ft.RECIPES["embedded-tiny"], "lr", 0.3),
             f"recipe {recipe}, this run's is epochs 2, lr 0.3, batch_size 64; pass --lr 0.03, as it ran, or move"),
            (ft, {}, lambda m: m.setattr(data, "load_dataset", smaller),
             "with the data (split sizes) id_train 200, id_val 100, id_test 100, ood_sketch 100, ood_painting 100, "
             "ood_neon 100, this run's is id_train 190,"),
            (ft, {}, lambda m: m.setattr(common, "weights_record", lambda *a: {"file": "/c/m.pt", "bytes": 9,
                                                                               "sha1": "f" * 40}),
             "its epochs were fine-tuned from other pretrained weights ("),  # another cache: its model pretrained again
            (ft, {}, lambda m: m.setattr(common, "weights_record", lambda *a: {"file": str(tiny), "bytes": 9,
                                                                               "sha1": "e" * 40}),
             f"({tiny}) than this run loads ({tiny}, pretrained again since; pretrain.py --force keeps the one it "
             "replaces beside it)"),  # this cache's model made again (`pretrain.py --force`)
            (l2sp, {}, as_is, "its resume.pt is ft's, not l2sp's; pass the --out of a l2sp run")]:
        with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
            change(m)
            module.main(module.Args(dataset="embedded-tiny", out=str(out), **{"epochs": 2, "resume": True, **options}))
        assert expected in str(e.value)
    ft.main(ft.Args(dataset="embedded-tiny", out=str(out), epochs=2, lr=0.03, batch_size=64, resume=True))
    assert sorted(p.name for p in out.iterdir()) == ["backup.tmp1", "done", "model.pt.tmp1.bak", "results.jsonl",
                                                     "thesis.tmp2.tex"]  # resumed: one set of lines; no half file
    assert [r["step"] for r in read_results(out)][:2] == [1, 2]
    (out / "resume.pt").write_text("left by a crash between `done` and its removal")
    with pytest.raises(SystemExit, match="holds a finished run .* drop --resume to run it again"):
        ft.main(ft.Args(dataset="embedded-tiny", out=str(out), epochs=2, resume=True))
    fresh = ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "new"), epochs=2, resume=True))
    assert fresh["metrics"] == json.loads((out / "done").read_text())["metrics"]  # nothing to resume: a whole run
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "resume.pt").write_text("cut short")
    with pytest.raises(SystemExit, match="could not read resume.pt .*; move .* aside to start from the beginning"):
        ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "cut"), epochs=2, resume=True))
    ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "cut"), epochs=2))  # afresh: the old one kept aside
    assert (tmp_path / "cut" / "resume.previous0.pt").read_text() == "cut short"


@pytest.mark.parametrize("method", sorted(FINE_TUNED))
def test_sgd_recipe_is_momentum_0_9_no_weight_decay_cosine_over_epochs_and_full_batches(method, tmp_path, monkeypatch):
    """The LP-FT code's optimiser for FT, L2-SP and LP-FT's stage 2: SGD over every parameter, momentum 0.9, weight
    decay 0, the learning rate constant within an epoch and annealed by a cosine over the epochs (epoch e of E at
    lr (1 + cos(pi (e - 1) / E)) / 2: lr, then lr / 2), drop-last batches of 64 (200 images: 3 steps an epoch)."""
    steps = []  # the learning rate of every step
    made = record_optimizers(monkeypatch, "SGD", lambda opt: steps.append(opt.param_groups[0]["lr"]))
    module = importlib.import_module(method)
    module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=2, **FINE_TUNED[method]))
    (opt,) = made
    group = opt.param_groups[0]
    assert len(opt.param_groups) == 1 and (group["momentum"], group["weight_decay"]) == (0.9, 0.0)
    assert (group["nesterov"], group["dampening"]) == (False, 0)
    encoder = common.load_backbone("embedded-clip-tiny").encoder
    assert len(group["params"]) == len(list(encoder.parameters())) + 2  # the encoder and the head's weight and bias
    lr = module.RECIPES["embedded-tiny"]["lr"]
    expected = [lr * (1 + math.cos(math.pi * e / 2)) / 2 for e in range(2) for _ in range(200 // 64)]
    assert steps == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_ft_head_is_a_fresh_linear_layer_with_torchs_default_init_drawn_from_the_seed():
    """FT's and L2-SP's head is nn.Linear's default init (the LP-FT code's fresh head): uniform within 1/sqrt(d), not
    zeros; the same seed draws the same head, another seed another."""
    backbone, dataset = common.load_backbone("embedded-clip-tiny"), data.load_dataset("embedded-tiny")
    d = backbone.encoder.output_dim
    for build in (lambda: ft.build_model(backbone, dataset, "random", "cpu", "auto")[1],
                  lambda: l2sp.build_model(backbone.encoder, len(dataset.classnames))[1]):
        heads = []
        for seed in (1, 1, 2):
            common.seed_everything(seed)
            heads.append(build().weight.detach())
        bound = 1 / math.sqrt(d)
        assert heads[0].shape == (10, d) and heads[0].abs().max() <= bound
        assert heads[0].std() > 0.8 * bound / math.sqrt(3)  # the std of U(-bound, bound)
        assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


class Stop(Exception):
    """Raised by a spy once it saw what a test needed: the run goes no further."""


@pytest.mark.parametrize("method", ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp"])
def test_the_seed_picks_the_id_training_draw_and_the_order_of_the_batches(method, tmp_path, monkeypatch):
    """--seed is the seed of the data draw (data.load_dataset: which images train and validate) and of the shuffling
    generator; with either fixed, three seeds would differ in less than they claim."""
    seen, load = {}, data.load_dataset

    def spy_load(name, seed=0, **kwargs):
        seen["data"] = seed
        dataset = load(name, seed=seed, **kwargs)

        def batches(*args, shuffle=False, generator=None, **kw):
            if not shuffle:  # LP-FT's stage 1 features
                return unshuffled(*args, **kw)
            seen["shuffle"] = generator.initial_seed()
            raise Stop

        unshuffled, dataset.train.batches = dataset.train.batches, batches
        return dataset

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(data, "load_dataset", spy_load)
    if method in ("zeroshot", "lp"):  # no training batches: the data draw is all the seed picks
        monkeypatch.setattr(common, "load_backbone", stop)
    module = importlib.import_module(method)
    with pytest.raises(Stop):
        module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path), seed=7, **FINE_TUNED.get(method, {})))
    assert seen == ({"data": 7} if method in ("zeroshot", "lp") else {"data": 7, "shuffle": 7})


def test_lpft_stage2_starts_from_the_lp_head(monkeypatch, tmp_path):
    backbone = common.load_backbone("embedded-clip-tiny")
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: backbone)
    lp_best = lp.main(lp.Args(dataset="embedded-tiny", out=str(tmp_path / "lp")))
    lpft.main(lpft.Args(dataset="embedded-tiny", out=str(tmp_path / "lpft"), epochs=1))
    start = json.loads((tmp_path / "lpft" / "results.jsonl").read_text().splitlines()[0])
    assert start["stage"] == "lp" and start["c"] == lp_best["c"]
    # Same head up to float rounding (raw vs standardised features): at most one image may flip at a near-tie.
    one_image = 100 / 100
    for key in ("acc/id_val", "acc/id_test", "acc/ood_sketch", "acc/ood_painting", "acc/ood_neon"):
        assert abs(start["metrics"][key] - lp_best["metrics"][key]) <= one_image + 1e-9


def test_lpft_head_gives_the_lp_logits():
    """Stage 2's head, on raw features, gives exactly the logits of lp.py's standardised-space solution."""
    dataset = data.load_dataset("embedded-tiny")
    encoder = common.load_backbone("embedded-clip-tiny").encoder
    ref = common.split_features(encoder, dataset, "cpu")
    args = lpft.Args(dataset="embedded-tiny", num_c=8)
    train = common.extract_features(encoder, dataset.train, "cpu")
    w_raw, b_raw, c = lpft.linear_probe(args, dataset, train, ref, "cpu")
    model = lpft.build_model(encoder, w_raw, b_raw)

    mean, std = lp.standardize(train)
    init = None
    for c_i in np.logspace(np.log10(args.c_min), np.log10(args.c_max), args.num_c):
        init = lp.fit_logreg((train - mean) / std, dataset.train.labels, 10, float(c_i), init)
        if float(c_i) == c:
            break
    w, b = init
    with torch.no_grad():
        assert torch.allclose(model[1](ref["id_test"]), ((ref["id_test"] - mean) / std) @ w.T + b, atol=1e-4)


def test_wiseft_script_end_to_end(tmp_path):
    run_script("flyp", "--dataset", "embedded-tiny", "--out", str(tmp_path / "flyp"), "--save")
    run_script("wiseft", "--dataset", "embedded-tiny", "--checkpoint", str(tmp_path / "flyp" / "model.pt"),
               "--out", str(tmp_path / "wise"))
    lines = read_results(tmp_path / "wise")
    assert [r["alpha"] for r in lines] == [round(i / 10, 6) for i in range(11)]
    assert json.loads((tmp_path / "wise" / "done").read_text())["alpha"] == 0.5


def test_checkpoint_holds_the_unwrapped_model_and_its_args(tmp_path):
    run_script("ft", "--dataset", "embedded-tiny", "--out", str(tmp_path), "--save", "--compile", "on", "--epochs", "1")
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["method"] == "ft" and ckpt["args"]["dataset"] == "embedded-tiny" and ckpt["step"] == 1
    assert not any("_orig_mod" in k for k in ckpt["state_dict"]) and "1.weight" in ckpt["state_dict"]  # none nested


def test_flyp_with_both_towers_compiled_trains_as_eager(tmp_path):
    """torch.compile (on by default on CUDA) of the image and the text tower changes neither the losses nor the
    weights beyond float rounding, and the checkpoint stays unwrapped."""
    for flag in ("off", "on"):
        run_script("flyp", "--dataset", "embedded-tiny", "--out", str(tmp_path / flag), "--save", "--compile", flag,
                   "--epochs", "1")
    eager, compiled = (read_results(tmp_path / flag) for flag in ("off", "on"))
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-4)
    eager, compiled = (torch.load(tmp_path / flag / "model.pt", weights_only=True)["state_dict"] for flag in ("off", "on"))
    start = common.load_backbone("embedded-clip-tiny").clip.state_dict()
    assert eager.keys() == compiled.keys() == start.keys()
    for k, v in eager.items():  # AdamW turns rounding into small steps: compare with how far training moved
        if v.is_floating_point():
            assert (v - compiled[k]).norm() <= 0.01 * (v - start[k]).norm(), k

def test_run_all_tiny_builds_table_and_pictures_skips_finished_runs_and_goes_on_past_a_failed_one(tmp_path,
                                                                                                   monkeypatch):
    env = {**os.environ, "DATASETS": "embedded-tiny", "SEEDS": "0", "JOBS": "2", "ROOT": str(tmp_path)}
    first = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    table = (tmp_path / "summary.md").read_text()
    for label in ("zero-shot", "LP", "FT", "LP-FT", "L2-SP", "FLYP", "WiSE-FT (FLYP, α=0.5)"):
        assert f"| {label} | 1 |" in table, label
    for picture in ("embedded-tiny_id_ood.png", "embedded-tiny_distortion.png", "embedded-tiny_seed0_feature_map.png"):
        assert (tmp_path / picture).stat().st_size > 0, picture
    assert not list(tmp_path.rglob("*.tmp*"))  # tables, pictures, results and checkpoints: written, then renamed
    again = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "run  " not in again.stdout and again.stderr.count("skip ") == 7 + 1  # + picture
    assert (tmp_path / "summary.md").read_text() == table

    # A run that fails (here a file is where LP's run folder goes) is named, and the rest go on: WiSE-FT, redone as
    # its FLYP checkpoint is newer (as after a FLYP re-run), the table without LP, the picture again as its LP-FT
    # checkpoint is newer; the exit status says it failed.
    blocked = tmp_path / "lp" / "embedded-tiny" / "seed0"
    shutil.rmtree(blocked)
    blocked.write_text("not a folder")
    wiseft = tmp_path / "wiseft-flyp" / "embedded-tiny" / "seed0"
    before = (wiseft / "done").stat().st_mtime_ns
    os.utime(tmp_path / "flyp" / "embedded-tiny" / "seed0" / "model.pt")  # now: newer than WiSE-FT's result
    picture = tmp_path / "embedded-tiny_seed0_feature_map.png"
    drawn = picture.stat().st_mtime_ns
    os.utime(tmp_path / "lpft" / "embedded-tiny" / "seed0" / "model.pt")  # and than the picture
    unfinished = tmp_path / "zeroshot" / "embedded-tiny" / "seed0"  # a run killed midway: its folder, no `done`
    (unfinished / "done").unlink()
    stopped = tmp_path / "ft" / "embedded-tiny" / "seed0"  # FT run again and stopped in its last epoch: it resumes
    with monkeypatch.context() as m:
        interrupt_at(m, "epoch 2/2")
        with pytest.raises(Interrupted):
            ft.main(ft.Args(dataset="embedded-tiny", out=str(stopped), save=True))
    common.release_folder(stopped)  # as its process's end would
    common.wait_for_writes()  # and its resume.pt, written in the background
    failed = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert failed.returncode == 1 and f"FAILED {blocked}" in failed.stdout, failed.stdout[-2000:] + failed.stderr
    assert "error: 1 step(s) failed" in failed.stderr and f"\n  {blocked}\n" in failed.stderr
    assert f"redo {wiseft} (its FLYP checkpoint is newer)" in failed.stderr and f"run  {wiseft}" in failed.stdout
    assert (wiseft / "done").stat().st_mtime_ns > before and failed.stderr.count("skip ") == 3
    assert f"run  {unfinished}" in failed.stdout and (unfinished / "done").exists()  # only `done` means finished
    assert f"note: resuming {stopped} (resume.pt; epochs finished: 1)" in (stopped / "log.txt").read_text()
    assert (stopped / "done").exists()
    steps = [r["step"] for r in read_results(stopped)]
    assert steps[:2] == [1, 2] and len(steps) == 3  # epoch 1's line once (from resume.pt), epoch 2's, the selected
    assert picture.stat().st_mtime_ns > drawn
    table = (tmp_path / "summary.md").read_text()
    assert "| LP |" not in table and "| WiSE-FT (FLYP, α=0.5) | 1 |" in table


@pytest.mark.parametrize("method", METHODS + ["flyp_fewshot"])
def test_a_run_made_by_hand_goes_to_the_folder_run_all_gives_it(method, monkeypatch):
    """run_all.sh names a run's folder after its script, runs/<file>/<dataset>/seed<N>; by hand its default --out is
    runs/<name>/..., <name> what the script passes to common.setup. They must be one folder: else summarize.py finds
    the method's seed twice and stops, and run_all.sh redoes what was run by hand."""
    class Named(Exception):
        pass

    def setup(args, name, **kwargs):
        raise Named(name)

    monkeypatch.setattr(common, "setup", setup)
    module = importlib.import_module(method)
    with pytest.raises(Named) as named:
        module.main(module.Args(dataset="embedded-tiny"))
    assert str(named.value) == method


def test_run_all_names_a_finished_run_whose_script_changed_since(tmp_path):
    """Finished runs are skipped, also after an edit to their script (a comment would otherwise redo every seed),
    but the skip says so and how to run it again. Here in a copy of the project, whose zeroshot.py is edited."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "tests", "runs", "__pycache__"))
    env = {**os.environ, "DATASETS": "embedded-tiny", "SEEDS": "0", "METHODS": "zeroshot", "ROOT": str(tmp_path / "r")}
    out = tmp_path / "r" / "zeroshot" / "embedded-tiny" / "seed0"

    def run_all():
        done = subprocess.run(["bash", str(copy / "run_all.sh")], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stderr

    run_all()
    assert f"skip {out} (done)\n" in run_all()
    later = (out / "done").stat().st_mtime_ns + 10 ** 9
    for name in ("zeroshot.py", "data.py"):
        os.utime(copy / name, ns=(later, later))
    assert f"skip {out} (done; changed since: zeroshot.py, data.py: rm {out}/done to run it again)\n" in run_all()


@pytest.mark.parametrize("second,expected", [
    ({"backbone": None, "weights": "other.pt"}, "fine-tuned from different pretrained models (ft: embedded-clip-tiny "
                                                "with its default weights; lpft: embedded-clip-tiny with other.pt)"),
    (b"<html>", "could not read checkpoint"), ({"weights": 1}, "is not a model.pt"), (None, "rerun lpft.py with --save")])
def test_feature_map_refuses_checkpoints_it_cannot_draw_before_loading_data(tmp_path, monkeypatch, second, expected):
    """Both panels start from one pretrained model (the checkpoints'), so the arrows of FT and LP-FT are comparable."""
    paths = [tmp_path / method / "embedded-tiny" / "seed0" / "model.pt" for method in ("ft", "lpft")]
    for path, content in zip(paths, [{"backbone": None, "weights": None}, second]):
        path.parent.mkdir(parents=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save({"method": "ft", "args": content, "state_dict": {}} if "backbone" in content else content, path)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the data was loaded first"))
    monkeypatch.setattr(sys, "argv", ["feature_map.py", "--dataset", "embedded-tiny", "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "feature_map.py"), run_name="__main__")
    assert expected in str(e.value.code), e.value.code


@pytest.mark.parametrize("var,value,expected", [
    ("DATASETS", "embedded-tiny living71", "choose from:"), ("METHODS", "lp lpf", "choose from:"),
    ("METHODS", "lp common", "choose from:"),  # a script, but not a method
    ("SEEDS", "0 x", "expected whole numbers"), ("SEEDS", "0 -1", "expected whole numbers"),
    ("JOBS", "0", "expected how many runs at a time, 1 or more"),  # 0: every run at once (xargs -P 0)
    ("JOBS", "abc", "expected how many runs at a time, 1 or more")])
def test_run_all_refuses_a_typo_before_any_run(var, value, expected, tmp_path):
    env = {**os.environ, "DATASETS": "embedded-tiny", "SEEDS": "0", "ROOT": str(tmp_path / "runs"), var: value}
    env.pop("OMP_NUM_THREADS", None)  # else set, run_all.sh does not divide the cores by JOBS
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and f"error: {var} has '{value.split()[-1]}'; {expected}" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method,option,value,recipes", [("lp", "num_c", 2, 50), ("ft", "epochs", 1, 2)])
def test_run_all_runs_again_a_run_finished_with_other_settings_than_its_own(method, option, value, recipes,
                                                                            tmp_path):
    """A quick run by hand in run_all.sh's folder (`lp.py --num-c 2`) was skipped as done and put in the table as LP;
    then, redone where the script has --resume (FT), it failed every time (--resume refuses a finished run)."""
    out = tmp_path / method / "embedded-tiny" / "seed0"
    module = importlib.import_module(method)
    module.main(module.Args(dataset="embedded-tiny", out=str(out), **{option: value}))
    hand = (out / "done").read_text()
    env = {**os.environ, "DATASETS": "embedded-tiny", "SEEDS": "0", "METHODS": method, "JOBS": "1",
           "ROOT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    flag = "--" + option.replace("_", "-")
    assert f"redo {out} (done with other settings than run_all.sh's: {flag} {value} (not {recipes});" in proc.stderr
    done = json.loads((out / "done").read_text())
    assert (done["recipe"] if option == "epochs" else done["options"])[option] == recipes
    assert (out / "results.previous0.jsonl").exists() and (out / "done.previous0").read_text() == hand  # kept
    again = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert f"skip {out} (done)" in again.stderr


@pytest.mark.parametrize("content", ['{"method": "lp", "da', "{}"])
def test_run_all_runs_again_a_run_whose_done_marker_cannot_be_read(content, tmp_path):
    """A `done` cut short stopped run_all.sh with a traceback before any run; one emptied was skipped as finished, and
    then summarize.py refused it at every run_all.sh."""
    out = tmp_path / "lp" / "embedded-tiny" / "seed0"
    out.mkdir(parents=True)
    (out / "done").write_text(content)
    env = {**os.environ, "DATASETS": "embedded-tiny", "SEEDS": "0", "METHODS": "lp", "JOBS": "1",
           "ROOT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"redo {out} (its done marker is not a finished run's; its files are kept aside)" in proc.stderr
    assert json.loads((out / "done").read_text())["method"] == "lp"
    assert (out / "done.previous0").read_text() == content


def test_run_all_starts_afresh_a_stopped_run_of_other_settings_than_its_own(tmp_path, monkeypatch):
    """`python ft.py --epochs 3`, stopped, writes its resume.pt into run_all.sh's folder (the default --out): run_all.sh
    resumed it with --resume, which refused the other settings at every run_all.sh until resume.pt was moved by
    hand."""
    out = tmp_path / "ft" / "embedded-tiny" / "seed0"
    monkeypatch.setattr(common.Results, "done", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # stopped
    with pytest.raises(KeyboardInterrupt):
        ft.main(ft.Args(dataset="embedded-tiny", epochs=3, out=str(out)))
    common.wait_for_writes()
    common.release_folder(out)  # as the stopped process's end would
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "resume.pt"]
    env = {**os.environ, "DATASETS": "embedded-tiny", "SEEDS": "0", "METHODS": "ft", "JOBS": "1",
           "ROOT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert (f"redo {out} (its resume.pt is from a run with other settings than run_all.sh's: --epochs 3 (not 2); its "
            "files are kept aside)") in proc.stderr
    assert json.loads((out / "done").read_text())["recipe"]["epochs"] == 2
    assert (out / "resume.previous0.pt").exists() and (out / "results.previous0.jsonl").exists()


def test_a_copy_of_a_method_that_keeps_its_name_is_stopped(tmp_path):
    """`cp ft.py ft_ls.py` with label smoothing but `method = "ft"`: its runs went over FT's and into FT's row."""
    for f in ("common.py", "data.py", "pretrain.py"):
        (tmp_path / f).symlink_to(ROOT / f)
    shutil.copy(ROOT / "ft.py", tmp_path / "ft_ls.py")
    proc = subprocess.run([sys.executable, "ft_ls.py", "--dataset", "embedded-tiny", "--device", "cpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error: ft_ls.py runs as the method 'ft', whose run folders (runs/ft/...)" in \
        proc.stderr and 'common.setup(args, "ft_ls")' in proc.stderr and not (tmp_path / "runs").exists()
    (tmp_path / "ft.py").symlink_to(ROOT / "ft.py")  # a sweep that calls ft.main is not a copy of ft.py
    (tmp_path / "sweep.py").write_text("import ft\nft.main(ft.Args(dataset='embedded-tiny', epochs=1, device='cpu'))\n")
    proc = subprocess.run([sys.executable, "sweep.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "runs" / "ft" / "embedded-tiny" / "seed0" / "done").is_file()


@pytest.mark.parametrize("name", ["my runs", "it's"])
def test_run_all_refuses_a_root_its_plan_would_split(name, tmp_path):
    """A space split the run's folder from its line (`run  /tmp/my`, a log.txt outside ROOT); a quote stopped xargs."""
    root = tmp_path / name
    env = {**os.environ, "DATASETS": "embedded-tiny", "SEEDS": "0", "METHODS": "zeroshot", "ROOT": str(root)}
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and f"error: ROOT has '{root}'; expected a folder name without a space" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_all_checks_the_environment_once_before_pretraining(tmp_path):
    """An RFT_CACHE naming a file failed after the embedded model's pretraining, with a traceback."""
    (tmp_path / "file").write_text("")
    env = {**os.environ, "DATASETS": "embedded-tiny", "ROOT": str(tmp_path / "runs"),
           "RFT_CACHE": str(tmp_path / "file")}
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: the cache folder {tmp_path / 'file'} (RFT_CACHE) "
                                                           "cannot be made: it is a file;"), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_every_method_has_a_recipe_for_every_dataset_and_docs_list_them(capsys):
    """`python <method>.py --dataset NAME` needs no more flags for any dataset; docs/recipes.md and --help show the
    same values."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    for module in (ft, lpft, l2sp, flyp, flyp_fewshot):
        assert set(module.RECIPES) == set(data.DATASETS), module.__name__
    for name in data.REAL:
        f, s, fs = ft.RECIPES[name], flyp.RECIPES[name], flyp_fewshot.RECIPES[name]
        row = (f"| `{name}` | `{data.REAL[name][1]}` | {f['epochs']}, {f['batch_size']}, {f['lr']:g} | "
               f"{lpft.RECIPES[name]['lr']:g} | {s['epochs']}, {s['batch_size']}, {s['lr']:g}, {s['weight_decay']:g}, "
               f"{s['warmup']} | {fs['shots']}, {fs['draws']}, {fs['lr']:g}, {fs['weight_decay']:g} |")
        assert row in doc, row
        assert l2sp.RECIPES[name] == f and (lpft.RECIPES[name]["epochs"], lpft.RECIPES[name]["batch_size"]) == \
            (f["epochs"], f["batch_size"])

    for module in (ft, lpft, l2sp, flyp, flyp_fewshot):  # --help lists RECIPES; each field it sets says so
        docs = common._field_docs(module.Args)
        assert all("default: the dataset's recipe" in docs[k] for k in module.RECIPES["embedded"]), module.__name__
        with pytest.raises(SystemExit):
            common.parse_args(module.Args, ["--help"], recipes=module.RECIPES)
        out = capsys.readouterr().out
        assert "RECIPES (each dataset's defaults" in out and "\n  imagenet " in out, module.__name__


def test_few_shot_flyps_default_shots_fit_the_classes_of_each_embedded_world():
    """`python flyp_fewshot.py --dataset embedded-tiny` with its defaults: embedded-tiny's validation split holds 10
    images a class, so a default of 16 shots stopped it before its first draw."""
    for name in data.WORLDS:
        flyp_fewshot.check_shots(data.load_dataset(name), flyp_fewshot.RECIPES[name]["shots"])


def test_results_record_the_recipe_actually_used(tmp_path):
    """Flags override the dataset's recipe, the rest comes from RECIPES; every results line records what was used."""
    proc = run_script("ft", "--dataset", "embedded-tiny", "--out", str(tmp_path), "--epochs", "1", "--lr", "0.01")
    lines = read_results(tmp_path)
    expected = {**ft.RECIPES["embedded-tiny"], "epochs": 1, "lr": 0.01}
    assert all(r["recipe"] == expected for r in lines) and len(lines) == 2  # one epoch, then the selected one
    assert "recipe: epochs 1, lr 0.01, batch_size 64" in proc.stdout


@pytest.mark.parametrize("method", ["ft", "flyp"])
def test_feature_map_draws_the_checkpoints_fine_tuned_encoder(method):
    """The arrows end at the checkpoint's features: its encoder weights (the `0.` half of FT's Sequential, or the
    whole CLIP of FLYP), every one of them, not the pretrained ones they started from."""
    backbone = common.load_backbone("embedded-clip-tiny")
    tuned = backbone.clip if method == "flyp" else torch.nn.Sequential(backbone.encoder, torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    ckpt = {"method": method, "state_dict": {k: v.clone() for k, v in tuned.state_dict().items()}}
    encoder = feature_map.fine_tuned_encoder(ckpt, "embedded-clip-tiny", None)
    expected = backbone.clip.visual.state_dict() if method == "flyp" else tuned[0].state_dict()
    got = encoder.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_feature_map_cli_draws_the_seeds_checkpoints_in_the_pca_plane_of_all_pretrained_test_features(tmp_path,
                                                                                                       monkeypatch):
    """--seed picks the run folders, --points caps the arrows of each panel for ID and for OOD (here above the 100 ID
    and 300 OOD test images: all of them), --out names the picture. The plane is the PCA of the pretrained ID and
    OOD features together: the arrows' starts keep exactly the top two eigenvalues' share of their scatter. Each
    panel's arrows end at its own checkpoint's features of the same images: FT's checkpoint is a perturbed model,
    whose distortion the legend gives, LP-FT's the pretrained one (arrows of length 0)."""
    import matplotlib.axes

    backbone = common.load_backbone("embedded-clip-tiny")
    tuned = copy.deepcopy(backbone.encoder)
    with torch.no_grad():
        tuned.proj.weight.mul_(2)  # every feature doubles: distortion ||2f - f||^2 / ||f||^2 = 1
        tuned.proj.bias.mul_(2)
    for method, encoder in (("ft", tuned), ("lpft", backbone.encoder)):
        path = tmp_path / method / "embedded-tiny" / "seed3" / "model.pt"
        path.parent.mkdir(parents=True)
        model = torch.nn.Sequential(encoder, torch.nn.Linear(backbone.encoder.output_dim, 10))
        torch.save({"method": method, "args": {"backbone": None, "weights": None}, "state_dict": model.state_dict()},
                   path)
    starts, moves, labels = [], [], []  # the (x, y) starts and (u, v) of each quiver call: ID, OOD of each panel
    monkeypatch.setattr(matplotlib.axes.Axes, "quiver",
                        lambda self, x, y, u, v, *a, **k: starts.append(torch.stack([torch.as_tensor(x),
                                                                                     torch.as_tensor(y)], 1))
                        or moves.append(torch.stack([torch.as_tensor(u), torch.as_tensor(v)], 1)))
    scatter = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, *a, label=None, **k: labels.append(label) or scatter(self, *a, label=label, **k))
    out = tmp_path / "picture.png"
    monkeypatch.setattr(sys, "argv", ["feature_map.py", "--dataset", "embedded-tiny", "--root", str(tmp_path), "--seed",
                                      "3", "--points", "1000", "--out", str(out), "--device", "cpu"])
    runpy.run_path(str(ROOT / "feature_map.py"), run_name="__main__")
    assert out.stat().st_size > 0 and list(tmp_path.glob("*.png")) == [out]  # only --out was written
    assert [len(s) for s in starts] == [100, 300, 100, 300]
    dataset = data.load_dataset("embedded-tiny", seed=3)
    feats = common.split_features(backbone.encoder, dataset, "cpu",
                                  only=["id_test", *[f"ood_{k}" for k in dataset.ood]])
    x = torch.cat(list(feats.values())).double()
    x = x - x.mean(0)
    top2 = torch.linalg.eigvalsh(x.T @ x)[-2:].sum().item()
    for panel in (starts[:2], starts[2:]):
        assert torch.cat(panel).double().pow(2).sum().item() == pytest.approx(top2, rel=1e-4)
    assert all(m.abs().max().item() > 1e-2 for m in moves[:2])  # FT's panel: its own (perturbed) encoder moved them
    assert all(m.abs().max().item() < 1e-4 for m in moves[2:])  # LP-FT's: every image stays where it started
    # FT's feature of each image is twice its pretrained one f: ||2f - f||^2 / ||f||^2 = 1 (over ||2f||^2: 0.25)
    assert labels == ["ID (distortion 1)", "OOD (distortion 1, its splits pooled)", "ID (distortion 0)",
                      "OOD (distortion 0, its splits pooled)"], labels  # the runs' ood_avg is a mean over splits


@pytest.mark.parametrize("method", sorted(FINE_TUNED) + ["flyp"])
def test_an_id_validation_tie_between_epochs_keeps_the_earlier_epoch(method, tmp_path, monkeypatch):
    """Every epoch is made to score the same ID validation accuracy: the reported and saved epoch is the first, as
    common.select_best breaks ties (and as LP's C sweep does); a `>=` would report the last tied epoch instead."""
    evaluate = common.evaluate

    def scripted(features, classify, dataset, ref, device):
        metrics = evaluate(features, classify, dataset, ref, device)
        if set(features) == {"id_val"}:  # an epoch's selection call
            metrics["acc/id_val"] = 50.0
        return metrics

    monkeypatch.setattr(common, "evaluate", scripted)
    module = importlib.import_module(method)
    fast = {"num_c": 2, "max_iter": 20} if method == "lpft" else {}  # stage 1's head is not what is checked here
    best = module.main(module.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=2, save=True, **fast))
    assert best["step"] == torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 1


def test_ft_zeroshot_head_is_the_scaled_template_average_of_every_template():
    """--head-init zeroshot starts FT from CLIP's zero-shot head (WiSE-FT's endpoint): logit scale x the normalised
    mean over ALL templates of each class's normalised caption embeddings, on normalised image features; computed
    here by hand from the text tower."""
    backbone, dataset = common.load_backbone("embedded-clip-tiny"), data.load_dataset("embedded-tiny")
    head = ft.build_model(backbone, dataset, "zeroshot", "cpu", "fp32")[1]
    clip, tokenizer = backbone.clip, backbone.tokenizer
    with torch.no_grad():
        classes = torch.stack([torch.nn.functional.normalize(torch.nn.functional.normalize(
            clip.encode_text(tokenizer([t.format(c) for t in dataset.templates])), dim=-1).mean(0), dim=0)
            for c in dataset.classnames])
        f = torch.randn(5, classes.shape[1], generator=torch.Generator().manual_seed(0))
        expected = clip.logit_scale.exp() * torch.nn.functional.normalize(f, dim=-1) @ classes.T
        assert len(dataset.templates) > 1 and torch.allclose(head(f), expected, atol=1e-4)
