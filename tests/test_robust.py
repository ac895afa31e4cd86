"""FLYP, L2-SP, zero-shot and WiSE-FT: the method invariants, on hand-computed values and the tiny embedded world."""
import importlib
import json
import math
import statistics
import types

import pytest
import torch
import torch.nn.functional as F

import common
import data
import flyp
import flyp_fewshot
import ft
import l2sp
import summarize
import wiseft
import zeroshot
from conftest import read_results, record_loss_gradients, record_models, record_optimizers


@pytest.mark.parametrize("module_name", ["flyp", "flyp_fewshot"])
@pytest.mark.parametrize("scale", [20.0, 200.0])  # 200: above open_clip's clamp at 100, which FLYP does not apply
def test_flyp_loss_equals_a_hand_computed_symmetric_clip_loss(module_name, scale):
    module = importlib.import_module(module_name)  # flyp_fewshot.py has its own copy of the loss
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    log_scale = torch.tensor(math.log(scale))
    s = [[scale * sum(img[i, k].item() * txt[j, k].item() for k in range(8)) for j in range(5)] for i in range(5)]
    image_to_text = [-(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(5)))) for i in range(5)]
    text_to_image = [-(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(5)))) for j in range(5)]
    expected = (sum(image_to_text) / 5 + sum(text_to_image) / 5) / 2
    assert module.clip_loss(img, txt, log_scale).item() == pytest.approx(expected, rel=1e-5)


def test_flyp_towers_hand_the_loss_l2_normalised_image_and_text_features():
    """The CLIP loss takes cosines: both towers' outputs are normalised before it (the image tower's raw output is
    what distortion measures, so the normalisation has to happen in Towers)."""
    clip = common.load_backbone("embedded-clip-tiny").clip.eval()
    images = torch.randn(3, 3, 32, 32)
    texts = clip.tokenizer(["a circle.", "a drawing of a star.", "an image of a bar."])
    image_features, text_features = flyp.Towers(clip, clip.visual, clip.encode_text)(images, texts)
    raw_image, raw_text = clip.visual(images), clip.encode_text(texts)
    torch.testing.assert_close(image_features, raw_image / raw_image.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(text_features, raw_text / raw_text.norm(dim=-1, keepdim=True))


def test_flyp_captions_fill_each_template_with_each_class_name():
    tokenizer = common.load_backbone("embedded-clip-tiny").tokenizer
    tokens = flyp.caption_tokens(tokenizer, ["circle", "star"], ["a {}.", "a drawing of a {}."])
    assert tokens.shape[:2] == (2, 2)
    assert torch.equal(tokens[1, 1], tokenizer(["a drawing of a star."])[0])


def test_flyp_trains_the_temperature(tmp_path):
    pretrained = common.load_backbone("embedded-clip-tiny").clip.logit_scale.detach().clone()
    flyp.main(flyp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=1, save=True))
    assert not torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]["logit_scale"], pretrained)


def test_flyp_schedule_warms_up_then_decays_to_zero():
    f = flyp.cosine_lr(warmup=4, total_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0, abs=1e-12)


def test_flyp_pairs_each_image_with_a_caption_of_its_own_class_drawn_over_every_template(tmp_path, monkeypatch):
    """FLYP's loss is only the paper's if each image's caption names its own class, with a template drawn at random:
    the training loop is observed where the pairs meet the towers, and each caption read back to (class, template)."""
    backbone = common.load_backbone("embedded-clip-tiny")
    dataset = data.load_dataset("embedded-tiny")
    caption_of = {tuple(backbone.tokenizer([t.format(c)])[0].tolist()): (i, j)  # token ids -> (class, template)
                  for i, c in enumerate(dataset.classnames) for j, t in enumerate(dataset.templates)}
    batch, pairs, progress, forward = {}, [], common.progress, flyp.Towers.forward

    def batches(iterable, *args, **kwargs):  # the batch the training loop is on
        for item in progress(iterable, *args, **kwargs):
            batch["x, y"] = item
            yield item

    def towers(self, images, texts):
        x, y = batch["x, y"]
        assert images is x
        pairs.extend(zip(y.tolist(), (caption_of[tuple(t)] for t in texts.tolist())))
        return forward(self, images, texts)

    monkeypatch.setattr(common, "progress", batches)
    monkeypatch.setattr(flyp.Towers, "forward", towers)
    flyp.main(flyp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=1, batch_size=32, device="cpu",
                        compile="off"))
    assert len(pairs) == len(dataset.train) // 32 * 32  # every image of one epoch's full batches
    assert [(label, cls) for label, (cls, _) in pairs if cls != label] == []  # (label, class its caption names)
    assert {template for _, (_, template) in pairs} == set(range(len(dataset.templates)))


def test_flyp_steps_the_learning_rate_schedule_once_per_optimizer_step(tmp_path, monkeypatch):
    """The paper's schedule is per step (warmup, then cosine over all steps), not per epoch."""
    lrs = []  # the learning rate each step is taken with
    record_optimizers(monkeypatch, "AdamW", lambda opt: lrs.append(opt.param_groups[0]["lr"]))
    flyp.main(flyp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=2, batch_size=32, lr=1e-3, warmup=3,
                        device="cpu", compile="off"))
    total = 2 * (len(data.load_dataset("embedded-tiny").train) // 32)  # 12 steps: warmup, then cosine over the rest
    factor = flyp.cosine_lr(3, total)
    assert lrs == pytest.approx([1e-3 * factor(s) for s in range(total)], rel=1e-12)


def test_flyp_optimizer_is_torchs_adamw_over_every_clip_parameter_stepping_on_this_steps_gradient(tmp_path,
                                                                                                  monkeypatch):
    """The FLYP code's optimiser: one AdamW group over both towers and the temperature, the recipe's weight decay
    (embedded-tiny: 0.1), torch's default betas and eps; each step applies the gradient of that step's loss as
    computed, neither accumulated over steps nor clipped, with the whole model in train mode every epoch (evaluation
    puts the image tower in eval mode). The logged train_loss is the mean of the epoch's step losses."""
    losses, modes, models = [], [], record_models(monkeypatch)

    def also(value):
        losses.append(value.item())
        modes.append(all(m.training for m in models[0].modules()))

    expected, check_gradient = record_loss_gradients(monkeypatch, flyp, also)
    made = record_optimizers(monkeypatch, "AdamW", check_gradient)
    flyp.main(flyp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=2, batch_size=32, device="cpu",
                        compile="off"))
    (opt,) = made
    (group,) = opt.param_groups
    assert len(group["params"]) == len(list(common.load_backbone("embedded-clip-tiny").clip.parameters()))
    assert any(p is expected[0][0] for p in group["params"])  # the temperature trains in the same group
    assert (group["weight_decay"], group["betas"], group["eps"], group["amsgrad"]) == (0.1, (0.9, 0.999), 1e-8, False)
    steps = 200 // 32  # full batches of 32 of the 200 training images, per epoch
    assert len(expected) == 2 * steps and modes == [True] * 2 * steps
    epochs = [r["train_loss"] for r in read_results(tmp_path)[:2]]
    assert epochs == pytest.approx([sum(losses[:steps]) / steps, sum(losses[steps:]) / steps], rel=1e-5)


def test_flyp_trains_every_weight_in_train_mode_and_evaluates_with_the_current_text_towers_head(tmp_path,
                                                                                               monkeypatch):
    """Both towers train (token embedding and projection too), BatchNorm statistics move (train mode, as the FLYP
    code); every evaluation uses the zero-shot head of the text tower as it is then, not the pretrained one; the
    logged logit_scale is the temperature's exp, the scale that multiplies the cosines."""
    models, evaluate, heads = record_models(monkeypatch), common.evaluate, []

    def scripted(features, classify, dataset, ref, device):
        (clip,) = models
        now = common.zeroshot_head(clip, clip.tokenizer, dataset.classnames, dataset.templates, "cpu").weight
        heads.append(torch.allclose(classify.weight, now, rtol=1e-5, atol=1e-6))
        return evaluate(features, classify, dataset, ref, device)

    monkeypatch.setattr(common, "evaluate", scripted)
    flyp.main(flyp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=1, save=True, device="cpu",
                        compile="off"))
    assert heads == [True, True]  # epoch 1's selection, then the final scores
    saved = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    start = common.load_backbone("embedded-clip-tiny").clip.state_dict()
    assert saved.keys() == start.keys()
    assert [k for k in start if torch.equal(saved[k], start[k])] == []  # weights, biases, running statistics
    epoch = read_results(tmp_path)[0]
    assert epoch["logit_scale"] == pytest.approx(math.exp(saved["logit_scale"].item()), rel=1e-6)


def l2sp_model():
    encoder = common.load_backbone("embedded-clip-tiny").encoder
    model = l2sp.build_model(encoder, 10)
    start = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    return model, start


def test_l2sp_penalty_is_zero_at_the_start_and_its_gradient_is_alpha_times_the_displacement():
    model, start = l2sp_model()
    assert l2sp.l2sp_penalty(model, start, alpha=0.1, beta=0.0).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.zero_grad()
    l2sp.l2sp_penalty(model, start, alpha=0.1, beta=0.01).backward()
    for name, p in model[0].named_parameters():
        if p.ndim >= 2:  # conv and linear weights: alpha (w - w0)
            assert torch.allclose(p.grad, 0.1 * (p.detach() - start[name]), atol=1e-7), name
        else:  # BatchNorm scale/shift and biases are not penalised (the authors' default)
            assert p.grad is None or not p.grad.any(), name
    assert torch.allclose(model[1].weight.grad, 0.01 * model[1].weight.detach(), atol=1e-8)  # beta W_head
    assert model[1].bias.grad is None or not model[1].bias.grad.any()


def test_l2sp_all_params_variant_penalises_every_backbone_parameter_and_not_the_head():
    model, start = l2sp_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.zero_grad()
    l2sp.l2sp_penalty(model, start, alpha=0.01, beta=0.5, all_params=True).backward()
    for name, p in model[0].named_parameters():
        assert torch.allclose(p.grad, 2 * 0.01 * (p.detach() - start[name]), atol=1e-7), name
    assert model[1].weight.grad is None


def test_l2sp_training_pulls_towards_the_pretrained_weights_with_the_alpha_and_beta_asked_for(tmp_path, monkeypatch):
    calls, penalty = [], l2sp.l2sp_penalty  # (w0, alpha, beta, value) of every training step

    def spy(model, w0, alpha, beta, all_params=False):
        value = penalty(model, w0, alpha, beta, all_params)
        calls.append((w0, alpha, beta, value.item()))
        return value

    monkeypatch.setattr(l2sp, "l2sp_penalty", spy)
    l2sp.main(l2sp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=1, alpha=0.3, beta=0.02))
    pretrained = dict(common.load_backbone("embedded-clip-tiny").encoder.named_parameters())
    w0 = calls[-1][0]  # after training: still the pretrained weights, not a view of the trained ones
    assert w0.keys() == pretrained.keys() and all(torch.equal(w0[n], p) for n, p in pretrained.items())
    assert {c[1:3] for c in calls} == {(0.3, 0.02)} and calls[-1][3] > 0


def test_zeroshot_head_averages_normalised_template_embeddings():
    backbone = common.load_backbone("embedded-clip-tiny")
    names, templates = ["circle", "star"], ["a {}.", "a drawing of a {}."]
    w = common.zeroshot_weights(backbone.clip, backbone.tokenizer, names, templates, "cpu")
    with torch.no_grad():
        e = torch.nn.functional.normalize(backbone.clip.encode_text(backbone.tokenizer(["a star.", "a drawing of a star."])), dim=-1)
    assert torch.allclose(w[1], torch.nn.functional.normalize(e.mean(0), dim=0), atol=1e-6)
    head = common.zeroshot_head(backbone.clip, backbone.tokenizer, names, templates, "cpu")
    f = torch.randn(3, w.shape[1])
    expected = backbone.clip.logit_scale.exp().item() * torch.nn.functional.normalize(f, dim=-1) @ w.T
    assert torch.allclose(head(f), expected, atol=1e-4)


def test_zeroshot_head_is_built_in_eval_mode(monkeypatch):
    """FLYP builds the head from a text tower that is training: a tower with dropout gives the eval-mode head."""
    backbone = common.load_backbone("embedded-clip-tiny")
    clip, names, templates = backbone.clip, ["circle", "star"], ["a {}.", "a drawing of a {}."]
    expected = common.zeroshot_weights(clip, backbone.tokenizer, names, templates, "cpu")
    encode_text = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda t: torch.nn.functional.dropout(encode_text(t), 0.5, clip.training))
    clip.train()
    assert torch.equal(common.zeroshot_weights(clip, backbone.tokenizer, names, templates, "cpu"), expected)


def test_zeroshot_head_calls_the_text_tower_on_bounded_batches(monkeypatch):
    """ImageNet's head embeds 80,000 captions; the text tower sees at most common.TEXT_BATCH of them per call (one call
    held ~2.3 MiB per caption of ViT-B/16 activations: benchmarks/zeroshot_memory.py), with the same result."""
    backbone = common.load_backbone("embedded-clip-tiny")
    clip, tokenizer = backbone.clip, backbone.tokenizer
    names, templates = [f"shape {i}" for i in range(7)], ["a {}.", "a drawing of a {}.", "a big {}."]
    whole = common.zeroshot_weights(clip, tokenizer, names, templates, "cpu")  # 21 captions, one call
    calls, encode_text = [], clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda tokens: calls.append(len(tokens)) or encode_text(tokens))
    monkeypatch.setattr(common, "TEXT_BATCH", 4)  # batches cut across classes: 4 + 4 + ... + 1
    chunked = common.zeroshot_weights(clip, tokenizer, names, templates, "cpu")
    assert calls == [4, 4, 4, 4, 4, 1]
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_wiseft_endpoints_give_back_zeroshot_and_flyp_exactly(tmp_path, monkeypatch):
    zs = zeroshot.main(zeroshot.Args(dataset="embedded-tiny", out=str(tmp_path / "zs")))
    tuned = flyp.main(flyp.Args(dataset="embedded-tiny", out=str(tmp_path / "flyp"), save=True, lr=1e-2))
    records = wiseft.main(wiseft.Args(dataset="embedded-tiny", checkpoint=str(tmp_path / "flyp" / "model.pt"),
                                      out=str(tmp_path / "wise")))
    assert [r["alpha"] for r in records] == [i / 10 for i in range(11)]
    assert records[0]["metrics"] == zs["metrics"]
    assert records[-1]["metrics"] == tuned["metrics"]
    assert records[-1]["metrics"]["distortion/id_test"] > 0  # the endpoints differ, so the check has teeth
    done = json.loads((tmp_path / "wise" / "done").read_text())
    assert done["method"] == "wiseft-flyp" and done["alpha"] == 0.5 and done["metrics"] == records[5]["metrics"]


def test_zeroshot_records_its_template_count_and_no_distortion(tmp_path):
    """The embedded world's head averages its four templates; the features are the pretrained ones: distortion 0."""
    record = zeroshot.main(zeroshot.Args(dataset="embedded-tiny", out=str(tmp_path), device="cpu", compile="off"))
    assert record["templates"] == 4 == read_results(tmp_path)[0]["templates"]
    assert {k: v for k, v in record["metrics"].items() if k.startswith("distortion/")} == {
        f"distortion/{s}": 0.0 for s in ("id_val", "id_test", "ood_sketch", "ood_painting", "ood_neon", "ood_avg")}


def test_wiseft_of_ft_from_the_zeroshot_head(tmp_path):
    zs = zeroshot.main(zeroshot.Args(dataset="embedded-tiny", out=str(tmp_path / "zs")))
    tuned = ft.main(ft.Args(dataset="embedded-tiny", out=str(tmp_path / "ft"), head_init="zeroshot", lr=1e-3, save=True))
    records = wiseft.main(wiseft.Args(dataset="embedded-tiny", checkpoint=str(tmp_path / "ft" / "model.pt"),
                                      out=str(tmp_path / "wise"), alpha_step=0.5))
    assert [r["alpha"] for r in records] == [0.0, 0.5, 1.0]
    assert records[0]["metrics"] == zs["metrics"] and records[-1]["metrics"] == tuned["metrics"]
    # Its own method name (default folder runs/ft-zeroshot-head/...), so a table shows it beside plain FT, not as a seed
    assert tuned["method"] == "ft-zeroshot-head" and records[0]["method"] == "wiseft-ft-zeroshot-head"
    markdown, _ = summarize.build_table(summarize.load_runs(tmp_path), published={})
    assert [line.split(" | ")[0] for line in markdown.splitlines() if line.startswith("| ") and "seeds" not in line] == [
        "| zero-shot", "| FT from zero-shot head", "| WiSE-FT (FT from zero-shot head, α=0.5)"]


@pytest.mark.parametrize("content,expected", [(None, "no fine-tuned checkpoint"), (b"not a checkpoint", "could not read"),
                                              ({"weights": 1}, "not a model.pt")])
def test_wiseft_bad_checkpoint_gives_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(SystemExit, match=expected):
        wiseft.main(wiseft.Args(dataset="embedded-tiny", checkpoint=str(path), out=str(tmp_path / "out")))


def test_wiseft_says_how_to_make_the_missing_checkpoint_with_a_command_that_works(tmp_path, monkeypatch):
    """Living-17's default backbone is MoCo-v2, which FLYP refuses: the command must name a CLIP backbone, and the
    data root the user gave."""
    monkeypatch.chdir(tmp_path)  # no runs/flyp/... here
    with pytest.raises(SystemExit) as e:
        wiseft.main(wiseft.Args(dataset="living17", data_root=str(tmp_path), out=str(tmp_path / "out")))
    assert (f"make one with `python flyp.py --dataset living17 --backbone clip-vit-b16 --data-root {tmp_path} --save`"
            in str(e.value))
    assert (f"`python ft.py --dataset living17 --backbone clip-vit-b16 --data-root {tmp_path} --head-init zeroshot "
            "--save` and pass its model.pt with --checkpoint" in str(e.value))  # the other endpoint, for this data
    with pytest.raises(SystemExit) as e:
        wiseft.main(wiseft.Args(dataset="embedded-tiny", out=str(tmp_path / "out")))
    assert "make one with `python flyp.py --dataset embedded-tiny --save`" in str(e.value)
    with pytest.raises(SystemExit) as e:  # it looks in seed1's folder: the command must write there
        wiseft.main(wiseft.Args(dataset="embedded-tiny", seed=1, out=str(tmp_path / "out")))
    assert "runs/flyp/embedded-tiny/seed1/model.pt'; make one with `python flyp.py --dataset embedded-tiny --seed 1 " \
        "--save`" in str(e.value) and "`python ft.py --dataset embedded-tiny --seed 1 --head-init" in str(e.value)


def test_wiseft_refuses_weights_for_a_checkpoint_of_a_backbone_that_has_none(tmp_path):
    """Not check_backbone's advice (pass another --backbone), which WiSE-FT cannot take: the checkpoint fixes it."""
    results = common.Results(tmp_path, "flyp", flyp.Args(dataset="embedded-tiny"), torch.device("cpu"))
    results.save_model(torch.nn.Linear(2, 1), step=1)
    with pytest.raises(SystemExit, match=r"^error: --weights x.pt: .* was fine-tuned from embedded-clip-tiny, which "
                                         r"has no weights file \(this project pretrains it\); drop --weights$"):
        wiseft.main(wiseft.Args(checkpoint=str(tmp_path / "model.pt"), weights="x.pt", out=str(tmp_path / "out")))


def test_wiseft_refuses_pretrained_weights_other_than_those_its_checkpoint_started_from(tmp_path, monkeypatch, capsys):
    """model.pt records the weights it was fine-tuned from; WiSE-FT interpolating with others (an embedded model
    pretrained again: same path and size, another hash; a file of another size; a hub tag for a file) would give
    numbers for neither. The same size elsewhere: a copy, said. A model.pt without the record: not checked."""
    results = common.Results(tmp_path, "flyp", flyp.Args(dataset="embedded-tiny"), torch.device("cpu"))
    results.save_model(torch.nn.Linear(2, 1), step=1)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    now = common.weights_record("embedded-clip-tiny", None)
    assert {"bytes", "sha1", "weights_sha1"} <= now.keys()  # made at session start (conftest)
    unhashed = {k: v for k, v in now.items() if k not in ("sha1", "weights_sha1")}  # as recorded before the hashes
    file_hashed = {k: v for k, v in now.items() if k != "weights_sha1"}  # as recorded before the weights' hash

    class Checked(Exception):
        pass

    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(Checked()))
    for then, expected in [
            ({**now, "weights_sha1": "0" * 40}, f"than the one cached at {now['file']}: it was pretrained again since"),
            ({**file_hashed, "sha1": "0" * 40}, "it was pretrained again since"),
            ({**now, "sha1": "0" * 40}, None),  # pretrained again bit for bit: another file (its time), same weights
            (file_hashed, None),
            ({**unhashed, "bytes": now["bytes"] + 1},
             f"was fine-tuned from {now['file']} ({now['bytes'] + 1:,} bytes), but this run loads"),
            ({"tag": "openai"}, "was fine-tuned from the tag 'openai', but this run loads"),
            ({**unhashed, "file": "/elsewhere/x.pt", "mtime_ns": 1}, None), (now, None), (None, None)]:
        torch.save({**saved, "weights": then}, tmp_path / "model.pt")
        with pytest.raises(SystemExit if expected else Checked) as e:
            wiseft.main(wiseft.Args(checkpoint=str(tmp_path / "model.pt"), out=str(tmp_path / "out")))
        assert expected is None or expected in str(e.value), e.value
        said = capsys.readouterr()
        copy = f"was fine-tuned from /elsewhere/x.pt, and this run loads {now['file']}, of the same size: a copy"
        assert (copy in said.out + said.err) == (then is not None and then.get("mtime_ns") == 1), said


def test_wiseft_interpolates_every_float_tensor_batchnorm_statistics_included():
    bn = torch.nn.BatchNorm1d(3)
    theta0 = {k: v.clone() for k, v in bn.state_dict().items()}
    with torch.no_grad():
        bn.weight.add_(1.0)
    bn(torch.randn(8, 3) * 5 + 2)  # a training-mode pass moves the running statistics and the integer batch counter
    theta1 = bn.state_dict()
    assert not torch.equal(theta0["running_mean"], theta1["running_mean"])
    mid = wiseft.interpolate(theta0, theta1, 0.25)
    for k, v in theta1.items():
        if v.is_floating_point():
            torch.testing.assert_close(mid[k], 0.75 * theta0[k] + 0.25 * v, msg=k)
        else:
            assert torch.equal(mid[k], v), k


@pytest.mark.parametrize("step,report,expected", [(0.3, 0.5, "does not divide 1"), (0.0, 0.5, "does not divide 1"),
                                                  (2.0, 0.5, "does not divide 1"), (0.25, 0.6, "not on the grid")])
def test_wiseft_refuses_an_alpha_grid_that_misses_an_endpoint_or_the_reported_alpha(step, report, expected):
    with pytest.raises(SystemExit, match=expected):
        wiseft.alpha_grid(step, report)
    assert wiseft.alpha_grid(0.125, 0.5) == [i / 8 for i in range(9)] and wiseft.alpha_grid(1 / 3, 1.0)[-1] == 1.0


def test_wiseft_takes_the_checkpoints_dataset_seed_backbone_weights_and_data_unless_files_moved(tmp_path):
    path = tmp_path / "model.pt"
    ckpt = {"method": "flyp", "state_dict": {}, "classnames": ["cat", "dog"],
            "args": {"dataset": "embedded-tiny", "backbone": "clip-vit-b16", "seed": 3, "data_root": "/data/then",
                     "weights": str(tmp_path / "then" / "ViT-B-16.pt")}}
    torch.save(ckpt, path)
    run = lambda **kw: wiseft.main(wiseft.Args(checkpoint=str(path), out=str(tmp_path / "o"), **kw))
    with pytest.raises(SystemExit, match=f"weights file {tmp_path / 'then' / 'ViT-B-16.pt'} not found"):
        run()  # no --dataset: the checkpoint's, embedded-tiny (not the embedded of a run without --checkpoint)
    with pytest.raises(SystemExit, match=f"weights file {tmp_path / 'now.pt'} not found"):
        run(weights=str(tmp_path / "now.pt"))  # --weights says where the file is now
    with pytest.raises(SystemExit, match="fine-tuned from clip-vit-b16, not clip-rn50"):
        run(backbone="clip-rn50")
    with pytest.raises(SystemExit, match="fine-tuned with --seed 3, not 0; drop --seed"):
        run(seed=0)  # its results would be filed under another seed than the run they come from
    args = wiseft.Args(data_root="/data/now")
    wiseft.endpoint_args(args, ckpt, str(path))
    assert (args.dataset, args.seed, args.backbone, args.data_root) == ("embedded-tiny", 3, "clip-vit-b16", "/data/now")
    args = wiseft.Args(dataset="embedded-tiny")
    wiseft.endpoint_args(args, ckpt, str(path))
    assert args.data_root == "/data/then"
    for names, ok in ((["cat", "dog"], True), (["dog", "cat"], False), (["cat", "dog", "fox"], False)):
        dataset = types.SimpleNamespace(name="folder", classnames=names)  # whatever --data-root holds
        if ok:
            wiseft.check_classes(ckpt, dataset, str(path))
        else:
            with pytest.raises(SystemExit, match="fine-tuned on the classes cat, dog, but this --data-root holds"):
                wiseft.check_classes(ckpt, dataset, str(path))
    living17 = types.SimpleNamespace(name="living17", classnames=["cat", "dog, domestic dog"])  # names data.py changed
    with pytest.raises(SystemExit, match="data.py names them otherwise since it was saved; fine-tune it again"):
        wiseft.check_classes(ckpt, living17, str(path))


def test_clip_only_methods_refuse_a_backbone_without_text_tower():
    with pytest.raises(SystemExit, match="needs a CLIP backbone"):
        common.require_clip(common.Backbone(encoder=torch.nn.Identity()), "FLYP")


@pytest.mark.parametrize("method,what", [("flyp", "FLYP"), ("flyp_fewshot", "FLYP"), ("zeroshot", "zero-shot")])
def test_clip_only_methods_refuse_living17s_default_resnet_before_reading_the_dataset(method, what, tmp_path,
                                                                                     monkeypatch):
    module = importlib.import_module(method)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the dataset was read first"))
    with pytest.raises(SystemExit, match=f"{what}.* needs a CLIP backbone .*moco-v2-rn50 has none; pass --backbone"):
        module.main(module.Args(dataset="living17", data_root=str(tmp_path), out=str(tmp_path / "out")))


def test_fewshot_keeps_the_step_with_the_lowest_validation_loss_zeroshot_start_included(tmp_path):
    zs = zeroshot.main(zeroshot.Args(dataset="embedded-tiny", out=str(tmp_path / "zs")))
    mean, std = flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path / "fs"), steps=0, draws=2,
                                                    shots=8))
    assert mean == zs["metrics"] and all(v == 0 for v in std.values())  # no step taken: the zero-shot model

    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path / "fs2"), steps=4, draws=3,
                                        shots=8))
    for r in read_results(tmp_path / "fs2"):
        lowest = min(r["val_losses"])
        assert len(r["val_losses"]) == 5
        assert r["selected_step"] == max(i for i in range(5) if r["val_losses"][i] == lowest)  # ties: the later step
        if r["selected_step"] == 0:
            assert r["metrics"] == zs["metrics"]


def test_fewshot_keeps_the_later_step_of_a_validation_loss_tie_as_the_flyp_code_does(tmp_path, monkeypatch):
    """The FLYP code keeps a step whose validation loss is <= the lowest so far: on a tie, the later step. Here every
    loss is the same constant (training and validation alike: zero gradients), so every step ties."""
    monkeypatch.setattr(F, "cross_entropy", lambda logits, labels, **kw: logits.sum() * 0 + 1.0)
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path / "fs"), steps=3, draws=1, shots=2))
    record = read_results(tmp_path / "fs")[0]
    assert record["val_losses"] == [1.0] * 4 and record["selected_step"] == 3


def test_fewshot_step_that_runs_out_of_memory_says_it_is_one_batch_of_shots_times_classes(tmp_path, monkeypatch):
    """Each step trains on all k x classes images at once (16,000 on ImageNet at 16 shots): out of GPU memory, the run
    says so and what to lower, not a CUDA allocator's traceback."""
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.2 TiB")

    monkeypatch.setattr(flyp_fewshot, "clip_loss", out_of_memory)
    with pytest.raises(SystemExit) as e:
        flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=1, draws=1, shots=3))
    assert str(e.value) == ("error: one full-batch step of 30 images (3 shots x 10 classes) does not fit in cpu's "
                            "memory; few-shot FLYP is for a few classes (the paper's: 2); pass a smaller --shots")


def test_fewshot_schedule_is_a_cosine_to_zero_without_warmup():
    f = flyp_fewshot.cosine_lr(20)
    assert f(0) == 1.0 and f(10) == pytest.approx(0.5) and f(20) == pytest.approx(0.0, abs=1e-12)
    assert f(5) == pytest.approx((1 + math.sqrt(0.5)) / 2)  # cos(pi / 4)


def test_fewshot_steps_adamw_in_train_mode_on_normalised_features_and_captions_of_every_template(tmp_path,
                                                                                                 monkeypatch):
    """Each full-batch step: AdamW with the recipe's weight decay (embedded-tiny: lr 1e-3, 0.1) at the cosine
    schedule's rate of that step; the CLIP loss on L2-normalised features of a model in train mode; every image's
    caption names its class (k = 4 of each class per step) with a template drawn from all of them."""
    lrs, modes, norms, captions = [], [], [], []
    dataset = data.load_dataset("embedded-tiny")
    tokenizer = common.load_backbone("embedded-clip-tiny").tokenizer
    caption_of = {tuple(tokenizer([t.format(c)])[0].tolist()): (i, j)  # token ids -> (class, template)
                  for i, c in enumerate(dataset.classnames) for j, t in enumerate(dataset.templates)}

    models, loss, encode_text = record_models(monkeypatch), flyp_fewshot.clip_loss, common.EmbeddedCLIP.encode_text

    def spy(image_features, text_features, logit_scale):
        modes.append(all(m.training for m in models[0].modules()))
        norms.append(torch.cat([image_features.norm(dim=-1), text_features.norm(dim=-1)]))
        return loss(image_features, text_features, logit_scale)

    def text(self, tokens, normalize=False):
        if normalize:  # the training captions (the zero-shot head embeds its captions unnormalised)
            captions.append([caption_of[tuple(t)] for t in tokens.tolist()])
        return encode_text(self, tokens, normalize=normalize)

    made = record_optimizers(monkeypatch, "AdamW", lambda opt: lrs.append(opt.param_groups[0]["lr"]))
    monkeypatch.setattr(flyp_fewshot, "clip_loss", spy)
    monkeypatch.setattr(common.EmbeddedCLIP, "encode_text", text)
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=4, draws=1, shots=4,
                                        device="cpu", compile="off"))
    (opt,) = made
    assert opt.param_groups[0]["weight_decay"] == 0.1
    assert lrs == pytest.approx([1e-3 * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)], rel=1e-12)
    assert modes == [True] * 4
    torch.testing.assert_close(torch.cat(norms), torch.ones(4 * 2 * 40))
    assert len(captions) == 4
    for step in captions:
        assert torch.equal(torch.bincount(torch.tensor([c for c, _ in step])), torch.full((10,), 4))
    assert {t for step in captions for _, t in step} == set(range(len(dataset.templates)))


def test_fewshot_scores_the_selected_steps_weights_not_the_last_steps(tmp_path):
    """At lr 0.1 the one AdamW step raises the validation loss (2.35 -> 2.73), so the zero-shot start is kept: the
    draw's scores must be the zero-shot model's, not those of the weights the last step left."""
    zs = zeroshot.main(zeroshot.Args(dataset="embedded-tiny", out=str(tmp_path / "zs"), device="cpu", compile="off"))
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path / "fs"), steps=1, draws=1, shots=4,
                                        lr=0.1, device="cpu", compile="off"))
    (record,) = read_results(tmp_path / "fs")
    assert record["selected_step"] == 0 and record["val_losses"][0] < record["val_losses"][1]
    assert record["metrics"] == zs["metrics"]


def test_flyp_says_when_its_warmup_covers_the_whole_run(tmp_path, capsys):
    """The recipe's 500 warmup steps (ImageNet's) on a few thousand images of one's own: the rate never reached --lr
    and never decayed, without a word."""
    flyp.main(flyp.Args(dataset="embedded-tiny", epochs=1, warmup=1000, out=str(tmp_path / "f")))
    steps = len(data.load_dataset("embedded-tiny").train) // flyp.RECIPES["embedded-tiny"]["batch_size"]
    assert (f"note: the warmup (1000 steps) covers the whole run ({steps} steps): the learning rate peaks at "
            f"{steps / 1000:.1%} of 0.001 and never decays; pass a shorter --warmup, such as 1 (about 5% of the steps)"
            in capsys.readouterr().out)


def test_fewshot_draws_k_examples_of_every_class():
    labels = torch.arange(10).repeat_interleave(7)
    idx = flyp_fewshot.draw_shots(labels, 4, torch.Generator().manual_seed(0))
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    assert torch.equal(torch.bincount(labels[idx]), torch.full((10,), 4))


def test_fewshot_refuses_more_shots_than_a_class_has_before_loading_the_backbone(tmp_path, monkeypatch):
    """It used to draw what there was and log and record the k asked for."""
    dataset = data.load_dataset("embedded-tiny")
    fewest = min(int(s.labels.bincount().min()) for s in (dataset.train, dataset.val))
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded first"))
    for shots in (fewest + 1, 1000):  # more than either split has: the bound it names is both splits' (it was the
        with pytest.raises(SystemExit, match=f"--shots {shots}, but a class of the ID .* split has {fewest} images; "
                                             f"pass --shots {fewest} or less"):  # training split's, which then failed)
            flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", shots=shots, out=str(tmp_path / "fs")))


@pytest.mark.parametrize("method,head_init", [("flyp", None), ("ft", "random")])
def test_wiseft_interpolates_on_the_device_of_the_model(method, head_init):
    """The checkpoint is read onto the CPU and the zero-shot endpoint lives on the run's device (CUDA on a GPU): both
    endpoints must be on one device. The meta device stands in for CUDA here (it refuses CPU operands alike)."""
    backbone = common.load_backbone("embedded-clip-tiny")
    dataset = data.load_dataset("embedded-tiny")
    if method == "flyp":
        state = backbone.clip.state_dict()
    else:
        state = torch.nn.Sequential(backbone.encoder, torch.nn.Linear(backbone.encoder.output_dim, 10)).state_dict()
    ckpt = {"method": method, "args": {"head_init": head_init}, "state_dict": {k: v.clone() for k, v in state.items()}}
    meta = torch.device("meta")
    model, _, theta0, theta1, _ = wiseft.endpoints(ckpt, backbone, dataset, meta, "fp32")
    assert {v.device for v in (*theta0.values(), *theta1.values())} == {meta}
    model.load_state_dict(wiseft.interpolate(theta0, theta1, 0.5))


def lp_checkpoint(path, classnames=data.SHAPES, **args):
    """A model.pt in --save's format (lp.py has no --save: any method with a linear head), for the embedded-tiny
    world: the tiny encoder with a random head."""
    encoder = common.load_backbone("embedded-clip-tiny").encoder
    model = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.output_dim, len(data.SHAPES)))
    args = {"dataset": "embedded-tiny", "backbone": None, "weights": None, "seed": 0, "data_root": None, **args}
    torch.save({"method": "lp", "args": args, "state_dict": model.state_dict(), "classnames": list(classnames)}, path)


def test_wiseft_refuses_a_checkpoint_of_other_classes_before_loading_the_backbone(tmp_path, monkeypatch):
    """Its head's rows would be read as other classes: the checkpoint's class names (here the dataset's, reversed)
    are checked against the dataset's as soon as the dataset is read, before the backbone loads (minutes for a real
    one) and before any evaluation."""
    path = tmp_path / "model.pt"
    lp_checkpoint(path, classnames=data.SHAPES[::-1])
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded first"))
    said = (f"fine-tuned on the classes {', '.join(data.SHAPES[::-1])}, "
            f"but data.py's embedded-tiny holds {', '.join(data.SHAPES)}")
    with pytest.raises(SystemExit, match=said):
        wiseft.main(wiseft.Args(dataset="embedded-tiny", checkpoint=str(path), out=str(tmp_path / "out")))


def test_fewshot_reports_the_mean_and_sample_std_of_the_draws(tmp_path):
    mean, std = flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=2, draws=3,
                                                    shots=4, device="cpu", compile="off"))
    records = read_results(tmp_path)
    assert len(records) == 3
    for k in mean:
        values = [r["metrics"][k] for r in records]
        assert mean[k] == pytest.approx(statistics.mean(values), rel=1e-12), k
        assert std[k] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12), k
    assert std["acc/id_test"] > 0  # the draws differ, so sample and population std differ too


def test_fewshot_starts_every_draw_from_the_pretrained_model(tmp_path, monkeypatch):
    starts = []  # the weights each draw's optimizer starts from

    class AdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            params = list(params)
            starts.append([p.detach().clone() for p in params])
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=2, draws=2, shots=4,
                                        device="cpu", compile="off"))
    pretrained = list(common.load_backbone("embedded-clip-tiny").clip.named_parameters())
    assert len(starts) == 2 and all(len(start) == len(pretrained) for start in starts)
    for draw, start in enumerate(starts):
        assert [name for (name, p), s in zip(pretrained, start) if not torch.equal(s, p)] == [], f"draw {draw}"
    assert read_results(tmp_path)[0]["selected_step"] > 0  # draw 0 kept trained weights: a carry-over would show


def test_fewshot_validates_on_k_images_per_class_of_the_id_validation_split(tmp_path, monkeypatch):
    loaded, extracted, load, extract = [], [], data.load_dataset, common.extract_features
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    monkeypatch.setattr(common, "extract_features", lambda encoder, split, *a, **k: extracted.append(split) or
                        extract(encoder, split, *a, **k))
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=2, draws=2, shots=4,
                                        device="cpu", compile="off"))
    dataset, = loaded
    splits = {"train": dataset.train, **common.eval_splits(dataset)}
    validated = [s for s in extracted if not any(s is w for w in splits.values())]  # the draws' validation sets
    assert len(validated) == 2 * 3  # every draw, before each of its 2 steps and after the last
    source = {image.numpy().tobytes(): name for name, split in splits.items() for image in split.images}
    for split in validated:
        assert {source[image.numpy().tobytes()] for image in split.images} == {"id_val"}
        assert torch.equal(split.labels.bincount(), torch.full((len(dataset.classnames),), 4))


def test_wiseft_reports_the_alpha_asked_for_not_the_papers_default(tmp_path):
    lp_checkpoint(tmp_path / "model.pt", precision="fp32")
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save({**ckpt, "recipe": {"epochs": 3, "lr": 0.5}}, tmp_path / "model.pt")  # as --save writes it
    records = wiseft.main(wiseft.Args(dataset="embedded-tiny", checkpoint=str(tmp_path / "model.pt"),
                                      out=str(tmp_path / "wise"), alpha_step=0.25, report_alpha=0.75))
    assert [r["alpha"] for r in records] == [0.0, 0.25, 0.5, 0.75, 1.0]
    done = json.loads((tmp_path / "wise" / "done").read_text())
    assert done["alpha"] == 0.75 and done["step"] == 3 and done["metrics"] == records[3]["metrics"]
    # the fine-tuned endpoint's recipe and options, which summarize.py compares between seeds
    assert done["endpoint"] == {"recipe": {"epochs": 3, "lr": 0.5}, "options": {"precision": "fp32"}}


def test_wiseft_refuses_a_checkpoint_fine_tuned_on_another_dataset(tmp_path):
    """Its head's rows are another dataset's classes: refused before anything loads; without --dataset, the
    checkpoint's is the one."""
    lp_checkpoint(tmp_path / "model.pt", dataset="embedded")
    with pytest.raises(SystemExit, match="fine-tuned on embedded, not on embedded-tiny; drop --dataset"):
        wiseft.main(wiseft.Args(dataset="embedded-tiny", checkpoint=str(tmp_path / "model.pt"),
                                out=str(tmp_path / "w")))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("method,head_init", [("flyp", None), ("ft", "random")])
def test_wiseft_zeroshot_endpoint_stays_the_pretrained_weights_while_the_model_moves_along_the_line(method, head_init):
    """theta0 is a copy: loading an interpolation into the model must not move it (a view of the model's tensors
    would make every alpha after the first interpolate from the previous one, with both endpoints still exact)."""
    backbone = common.load_backbone("embedded-clip-tiny")
    dataset = data.load_dataset("embedded-tiny")
    fresh = common.load_backbone("embedded-clip-tiny")
    tuned = fresh.clip if method == "flyp" else torch.nn.Sequential(fresh.encoder, torch.nn.Linear(32, 10))
    ckpt = {"method": method, "args": {"head_init": head_init},
            "state_dict": {k: v + 1 if v.is_floating_point() else v for k, v in tuned.state_dict().items()}}
    model, _, theta0, theta1, _ = wiseft.endpoints(ckpt, backbone, dataset, "cpu", "fp32")
    start = {k: v.clone() for k, v in theta0.items()}
    for alpha in (0.5, 1.0):
        model.load_state_dict(wiseft.interpolate(theta0, theta1, alpha))
        assert all(torch.equal(theta0[k], start[k]) for k in start), alpha
    half = wiseft.interpolate(theta0, theta1, 0.5)
    assert any(not torch.equal(half[k], start[k]) for k in start)  # the model did move


@pytest.mark.parametrize("all_params", [False, True])
def test_l2sp_training_uses_the_penalty_variant_asked_for(all_params, tmp_path, monkeypatch):
    """The authors' L2-SP (weights only, alpha/2, beta/2 head term) by default, the LP-FT code's variant (every
    backbone parameter, no head term) only with --all-params: the flag must reach the penalty of every step."""
    seen, penalty = [], l2sp.l2sp_penalty

    class Stop(Exception):
        pass

    def spy(model, w0, alpha, beta, all_params=False):
        seen.append(all_params)
        if len(seen) == 2:
            raise Stop
        return penalty(model, w0, alpha, beta, all_params)

    monkeypatch.setattr(l2sp, "l2sp_penalty", spy)
    with pytest.raises(Stop):
        l2sp.main(l2sp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=1, all_params=all_params))
    assert seen == [all_params] * 2


def test_flyp_leaves_the_temperature_unclamped_above_open_clips_100(tmp_path, monkeypatch):
    """OpenAI's CLIP starts FLYP at logit scale 100, open_clip's pretraining clamp; FLYP never clamps it. Started at
    200 here, one epoch of AdamW at lr 1e-3 (6 steps, each moving ln(scale) by at most ~lr) must leave it near 200,
    where a clamp at ln 100 after a step would put it at 100."""
    backbone = common.load_backbone("embedded-clip-tiny")
    with torch.no_grad():
        backbone.clip.logit_scale.fill_(math.log(200.0))
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: backbone)
    flyp.main(flyp.Args(dataset="embedded-tiny", out=str(tmp_path), epochs=1, device="cpu", compile="off"))
    assert read_results(tmp_path)[0]["logit_scale"] == pytest.approx(200.0, rel=0.02)


def test_wiseft_of_a_checkpoint_with_a_new_head_keeps_its_head_and_interpolates_the_encoder_only():
    """A random or LP head has no zero-shot counterpart: along the whole line the head is the fine-tuned one (never
    mixed with a fresh random layer), while the encoder moves from the pretrained weights to the fine-tuned ones."""
    backbone, dataset = common.load_backbone("embedded-clip-tiny"), data.load_dataset("embedded-tiny")
    pretrained = {k: v.clone() for k, v in common.load_backbone("embedded-clip-tiny").encoder.state_dict().items()}
    tuned = torch.nn.Sequential(common.load_backbone("embedded-clip-tiny").encoder, torch.nn.Linear(32, 10))
    state = {k: v + 1 if v.is_floating_point() else v for k, v in tuned.state_dict().items()}
    ckpt = {"method": "ft", "args": {"head_init": "random"}, "state_dict": state}
    model, _, theta0, theta1, classifier = wiseft.endpoints(ckpt, backbone, dataset, "cpu", "fp32")
    for alpha in (0.0, 0.5):
        model.load_state_dict(wiseft.interpolate(theta0, theta1, alpha))
        assert torch.equal(classifier().weight, state["1.weight"]) and torch.equal(classifier().bias, state["1.bias"])
        for k, v in model[0].state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, pretrained[k] + alpha, msg=k)


def test_fewshot_validation_loss_is_that_of_the_current_text_towers_zero_shot_head(tmp_path, monkeypatch):
    """Each step's validation loss scores the model as it is then: the image tower's features AND the zero-shot head
    rebuilt from the current text tower (FLYP's classifier), not the pretrained head kept from step 0. Checked at
    every step by recomputing the head from the live model on the validation features just extracted."""
    models, extract, cross_entropy = record_models(monkeypatch), common.extract_features, F.cross_entropy
    dataset, last, same = data.load_dataset("embedded-tiny"), {}, []

    def features(encoder, split, *args, **kwargs):
        last["features"] = extract(encoder, split, *args, **kwargs)
        return last["features"]

    def loss(logits, labels, **kwargs):
        if not logits.requires_grad and logits.shape == (len(last.get("features", ())), 10):  # a validation loss
            (clip,) = models
            with torch.no_grad():
                now = common.zeroshot_head(clip, clip.tokenizer, dataset.classnames, dataset.templates, "cpu")
                same.append(torch.allclose(logits, now(last["features"]), rtol=1e-5, atol=1e-5))
        return cross_entropy(logits, labels, **kwargs)

    monkeypatch.setattr(common, "extract_features", features)
    monkeypatch.setattr(F, "cross_entropy", loss)
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=2, draws=1, shots=4,
                                        device="cpu", compile="off"))
    assert same == [True] * 3  # before each of the 2 steps and after the last


def test_wiseft_of_ft_from_the_zeroshot_head_moves_the_head_from_the_zero_shot_head_too():
    """ft.py --head-init zeroshot checkpoints interpolate the head as well: at alpha 0 the classifier is CLIP's
    zero-shot head (not the fine-tuned one), at alpha 0.5 half way to the checkpoint's."""
    backbone, dataset = common.load_backbone("embedded-clip-tiny"), data.load_dataset("embedded-tiny")
    fresh = common.load_backbone("embedded-clip-tiny")
    zs = common.zeroshot_head(fresh.clip, fresh.tokenizer, dataset.classnames, dataset.templates, "cpu")
    tuned = torch.nn.Sequential(fresh.encoder, zs)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in tuned.state_dict().items()}
    ckpt = {"method": "ft", "args": {"head_init": "zeroshot"}, "state_dict": state}
    model, _, theta0, theta1, classifier = wiseft.endpoints(ckpt, backbone, dataset, "cpu", "fp32")
    for alpha in (0.0, 0.5):
        model.load_state_dict(wiseft.interpolate(theta0, theta1, alpha))
        torch.testing.assert_close(classifier().weight, zs.weight + alpha, msg=str(alpha))


def test_fewshot_pairs_each_training_image_with_a_caption_of_its_own_class(tmp_path, monkeypatch):
    """The few-shot step's CLIP loss is FLYP's only if caption i names the class of image i (the class counts alone
    would not show a shifted pairing): the labels of the images the step trains on are read where the batch is made,
    and compared, in order, with the classes the captions name."""
    dataset = data.load_dataset("embedded-tiny")
    tokenizer = common.load_backbone("embedded-clip-tiny").tokenizer
    class_of = {tuple(tokenizer([t.format(c)])[0].tolist()): i
                for i, c in enumerate(dataset.classnames) for t in dataset.templates}
    labels, named, load, encode_text = [], [], data.load_dataset, common.EmbeddedCLIP.encode_text

    def spy_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        subset = loaded.train.subset

        def spy_subset(idx):
            part = subset(idx)
            batches = part.batches
            part.batches = lambda *a, **k: ((labels.append(y.tolist()) or x, y) for x, y in batches(*a, **k))
            return part

        loaded.train.subset = spy_subset
        return loaded

    def text(self, tokens, normalize=False):
        if normalize:  # the training captions
            named.append([class_of[tuple(t)] for t in tokens.tolist()])
        return encode_text(self, tokens, normalize=normalize)

    monkeypatch.setattr(data, "load_dataset", spy_load)
    monkeypatch.setattr(common.EmbeddedCLIP, "encode_text", text)
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=2, draws=1, shots=4,
                                        device="cpu", compile="off"))
    assert len(labels) == 1 and len(named) == 2 and named == [labels[0]] * 2


def test_fewshot_draws_new_training_and_validation_shots_for_every_draw(tmp_path, monkeypatch):
    """The mean ± std is over independent k-shot draws: each repetition trains and validates on its own random draw,
    not on one set repeated (which would shrink the std to the noise of training alone)."""
    drawn, draw_shots = [], flyp_fewshot.draw_shots
    monkeypatch.setattr(flyp_fewshot, "draw_shots", lambda *a, **k: drawn.append(draw_shots(*a, **k)) or drawn[-1])
    flyp_fewshot.main(flyp_fewshot.Args(dataset="embedded-tiny", out=str(tmp_path), steps=0, draws=2, shots=4,
                                        device="cpu", compile="off"))
    (train1, val1), (train2, val2) = [[set(i.tolist()) for i in drawn[j:j + 2]] for j in (0, 2)]
    assert len(drawn) == 4 and train1 != train2 and val1 != val2


def test_wiseft_scores_every_alpha_but_0_on_its_own_features(tmp_path):
    """Only alpha = 0 may reuse the pretrained features (its weights are theta0 bit for bit): every other point of
    the line is scored on the features of its own interpolated encoder, whose distortion grows with alpha."""
    path = tmp_path / "model.pt"
    encoder = common.load_backbone("embedded-clip-tiny").encoder
    model = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.output_dim, len(data.SHAPES)))
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    args = {"dataset": "embedded-tiny", "backbone": None, "weights": None, "seed": 0, "data_root": None}
    torch.save({"method": "ft", "args": args, "state_dict": state, "classnames": list(data.SHAPES)}, path)
    records = wiseft.main(wiseft.Args(checkpoint=str(path), out=str(tmp_path / "wise"), alpha_step=0.1,
                                      device="cpu", compile="off"))
    distortion = [r["metrics"]["distortion/id_test"] for r in records]
    assert distortion[0] == 0 and all(a < b for a, b in zip(distortion, distortion[1:])), distortion
