"""Backbone loaders: each real backbone saved with random weights in its released file format, loaded back offline
through common.load_backbone; the default weights folder; clear errors for missing and malformed files."""
import zipfile
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn as nn
import torchvision

import common
import data


def same_weights(loaded, saved):
    loaded = loaded.state_dict()
    return loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def feature_size(encoder, size=64):
    encoder.eval()
    with torch.no_grad():
        return encoder(torch.zeros(1, 3, size, size)).shape


@pytest.fixture(scope="module")
def resnet50_state_dict():
    return torchvision.models.resnet50().state_dict()


def test_official_files_are_the_libraries_own():
    for name, arch in common.OPEN_CLIP_MODELS.items():
        file, url, _ = common.WEIGHTS[name]
        assert url == open_clip.get_pretrained_url(arch, "openai") and url.endswith("/" + file)
    v1 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1  # the supervised weights of the LP-FT paper
    assert common.WEIGHTS["resnet50"][:2] == (v1.url.rsplit("/", 1)[1], v1.url)
    assert common.BACKBONES == ["embedded-clip", "embedded-clip-tiny", "clip-rn50", "clip-vit-b16", "moco-v2-rn50",
                                "resnet50"]


def test_resnet50_loads_from_a_local_torchvision_file(tmp_path, resnet50_state_dict):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50_state_dict, path)
    backbone = common.load_backbone("resnet50", str(path))
    assert backbone.encoder.output_dim == 2048 and backbone.clip is None
    assert (data.preprocessing("resnet50").mean, data.preprocessing("resnet50").std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert same_weights(backbone.encoder, {k: v for k, v in resnet50_state_dict.items() if not k.startswith("fc.")})
    assert feature_size(backbone.encoder) == (1, 2048)


def test_moco_v2_keeps_the_query_encoder_without_its_mlp_head(tmp_path):
    """The released file: encoder_q (ResNet-50 + fc MLP 2048-2048-128), encoder_k, the queue, the optimizer."""
    encoder_q, encoder_k = torchvision.models.resnet50(), torchvision.models.resnet50()
    for net in (encoder_q, encoder_k):
        net.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    state_dict = {**{f"module.encoder_q.{k}": v for k, v in encoder_q.state_dict().items()},
                  **{f"module.encoder_k.{k}": v for k, v in encoder_k.state_dict().items()},
                  "module.queue": torch.randn(128, 65536), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    assert {"module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.bias"} <= state_dict.keys()
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state_dict,
                "optimizer": torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9).state_dict()}, path)
    backbone = common.load_backbone("moco-v2-rn50", str(path))
    assert backbone.encoder.output_dim == 2048 and backbone.clip is None and data.preprocessing("resnet50").mean == data.IMAGENET_MEAN
    assert same_weights(backbone.encoder, {k: v for k, v in encoder_q.state_dict().items() if not k.startswith("fc.")})
    assert feature_size(backbone.encoder) == (1, 2048)


def test_clip_vit_b16_loads_an_openai_state_dict(tmp_path):
    """open_clip's CLIP uses OpenAI's parameter names, so its state dict is OpenAI's format."""
    saved = open_clip.create_model("ViT-B-16-quickgelu").state_dict()
    path = tmp_path / "ViT-B-16.pt"
    torch.save(saved, path)
    backbone = common.load_backbone("clip-vit-b16", str(path))
    assert same_weights(backbone.clip, saved) and backbone.encoder is backbone.clip.visual
    assert isinstance(backbone.clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert backbone.encoder.output_dim == 512 and feature_size(backbone.encoder, 224) == (1, 512)
    assert backbone.tokenizer(["a photo of a dog."]).shape == (1, 77)
    assert (data.preprocessing("clip-vit-b16").mean, data.preprocessing("clip-vit-b16").std) == (data.CLIP_MEAN, data.CLIP_STD)


def save_torchscript_archive(state_dict, path):
    """A TorchScript archive holding `state_dict`, as OpenAI's RN50.pt / ViT-B-16.pt do (theirs also carry the
    model's code, which the loader does not use)."""
    root = nn.Module()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore:.*TorchScript:UserWarning", "ignore:.*torch.jit:FutureWarning")
def test_clip_rn50_loads_openais_torchscript_archive_from_the_default_folder(tmp_path, monkeypatch):
    saved = open_clip.create_model("RN50-quickgelu").state_dict()
    # OpenAI's archives hold most weights in fp16, and three ints that are not parameters
    openai = {k: v.half() if v.ndim >= 2 else v for k, v in saved.items()}
    extra = {k: torch.tensor(v) for k, v in [("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)]}
    monkeypatch.setenv("RFT_CACHE", str(tmp_path))
    (tmp_path / "weights").mkdir()
    save_torchscript_archive({**openai, **extra}, tmp_path / "weights" / "RN50.pt")
    backbone = common.load_backbone("clip-rn50")  # no --weights: the official file name in the default folder
    assert same_weights(backbone.clip, {k: v.float() if v.is_floating_point() else v for k, v in openai.items()})
    assert backbone.clip.visual.conv1.weight.dtype == torch.float32 and backbone.tokenizer is not None
    assert backbone.encoder.output_dim == 1024 and feature_size(backbone.encoder, 224) == (1, 1024)
    # OpenAI trained it with QuickGELU: plain open_clip 'RN50' would load the same keys but compute GELU
    assert isinstance(backbone.clip.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_default_folder_holds_the_official_file(tmp_path, monkeypatch, resnet50_state_dict):
    monkeypatch.setenv("RFT_CACHE", str(tmp_path))
    assert common.weights_dir() == tmp_path / "weights"
    common.weights_dir().mkdir()
    torch.save(resnet50_state_dict, common.weights_dir() / "resnet50-0676ba61.pth")
    assert same_weights(common.load_backbone("resnet50").encoder,
                        {k: v for k, v in resnet50_state_dict.items() if not k.startswith("fc.")})


def test_a_bare_weights_file_name_is_looked_for_here_then_in_the_default_folder(tmp_path, monkeypatch,
                                                                                resnet50_state_dict):
    """The README's commands pass the release's file name (`--weights ViT-B-16.pt`): the file in the current folder,
    else the one in the default folder, where the README says to put it."""
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    common.weights_dir().mkdir(parents=True)
    kept = {k: v for k, v in resnet50_state_dict.items() if not k.startswith("fc.")}
    torch.save(resnet50_state_dict, common.weights_dir() / "r50.pth")
    assert same_weights(common.load_backbone("resnet50", "r50.pth").encoder, kept)
    here = {k: v + 1 if v.is_floating_point() else v for k, v in resnet50_state_dict.items()}
    torch.save(here, tmp_path / "r50.pth")
    assert same_weights(common.load_backbone("resnet50", "r50.pth").encoder,
                        {k: v for k, v in here.items() if not k.startswith("fc.")})
    with pytest.raises(SystemExit) as e:
        common.load_backbone("resnet50", "r18.pth")
    assert f"weights file r18.pth not found (in {tmp_path}, nor in {common.weights_dir()})" in str(e.value)
    (tmp_path / "r50.pth").unlink()
    with pytest.raises(SystemExit, match=r"weights file r50.pth not found\. "):  # a path says where: no other folder
        common.load_backbone("resnet50", "./r50.pth")


@pytest.mark.parametrize("name", ["clip-vit-b16", "clip-rn50", "moco-v2-rn50", "resnet50"])
def test_a_missing_file_names_the_file_the_folder_the_flag_and_the_url(tmp_path, monkeypatch, name):
    monkeypatch.setenv("RFT_CACHE", str(tmp_path))
    file, url, _ = common.WEIGHTS[name]
    with pytest.raises(SystemExit) as default:
        common.load_backbone(name)
    with pytest.raises(SystemExit) as given:
        common.load_backbone(name, str(tmp_path / "nowhere" / file))
    assert f"{name} needs --weights" in str(default.value) and "not found" in str(given.value)
    for e in (default, given):
        assert all(s in str(e.value) for s in (file, str(tmp_path / "weights"), "--weights", url)), e.value


def test_an_uncached_open_clip_tag_is_a_clear_error_without_network(caplog, tmp_path, monkeypatch):
    """It names the hub cache folder to copy the weights into (not "here"), and a cause cut short says so."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit, match="did not load from the local hub cache") as e:
        common.load_backbone("clip-rn50", "cc12m")
    assert not caplog.records  # open_clip's own "Failed to download" line came first, as if something had been tried
    assert f"Copy its hub cache into {tmp_path / 'hub'} (HF_HOME or HF_HUB_CACHE set another)" in str(e.value)
    cause = str(e.value).split("(nothing is downloaded): ")[1].split(". Copy its")[0]
    assert len(cause) <= 200, cause
    cut = common._why(ValueError("a cause " * 40), 50)  # cut at a word, and said to be
    assert cut == "ValueError: a cause a cause a cause a cause [...]" and len(cut) <= 50


def test_malformed_files_say_what_is_wrong(tmp_path, resnet50_state_dict):
    def error(name, obj):
        path = tmp_path / "weights.pt"
        if isinstance(obj, (str, bytes)):
            path.write_text(obj) if isinstance(obj, str) else path.write_bytes(obj)
        else:
            torch.save(obj, path)
        with pytest.raises(SystemExit) as e:
            common.load_backbone(name, str(path))
        return str(e.value)

    for name in ("resnet50", "moco-v2-rn50", "clip-rn50"):
        file, url, _ = common.WEIGHTS[name]  # and where to get the right file
        assert f"Expected: {common.WEIGHTS[name][2]}, released as {file}: download it from {url}, then put it in " \
            in error(name, "not a checkpoint\n")
        # what the file is, not torch's advice to retry with weights_only=False
        assert "not a PyTorch file: it starts with b'<!DOCTYPE html>" in error(name, "<!DOCTYPE html><html>Sign in")
        assert "the file is empty" in error(name, "")
    assert "not a checkpoint of tensors" in error("resnet50", "not a checkpoint\n")
    zipped = tmp_path / "whole.pt"
    torch.save(resnet50_state_dict, zipped)
    assert "truncated zip archive" in error("resnet50", zipped.read_bytes()[:1000])
    broken = {**{k: v for k, v in resnet50_state_dict.items() if k != "conv1.weight"}, "extra": torch.zeros(1)}
    assert "1 missing keys ['conv1.weight'], 1 unexpected keys ['extra']" in error("resnet50", broken)
    ten_classes = {**resnet50_state_dict, "fc.weight": torch.zeros(10, 2048)}
    assert "size mismatch for fc.weight" in error("resnet50", ten_classes)
    assert "not a state dict of tensors" in error("resnet50", {"state_dict": resnet50_state_dict})
    moco = error("moco-v2-rn50", {"state_dict": {f"module.encoder_k.{k}": v for k, v in resnet50_state_dict.items()}})
    assert "no module.encoder_q.* keys" in moco and "MoCo's released checkpoint" in moco
    assert "1 unexpected keys ['conv1.weight']" in error("clip-rn50", {"conv1.weight": torch.zeros(64, 3, 7, 7)})


def test_a_folder_passed_as_weights_is_named_a_folder(tmp_path):
    """--weights pointing at the download folder, not the file in it: said so, not a traceback from torch.load."""
    for name in ("resnet50", "clip-rn50"):
        with pytest.raises(SystemExit, match=f"weights file {tmp_path} is a folder, not a file"):
            common.load_backbone(name, str(tmp_path))


class RunsCode:
    """A pickle that creates a folder when loaded: what a malicious or foreign .pt file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.makedirs, (self.marker,)


@pytest.mark.parametrize("name", ["resnet50", "moco-v2-rn50", "clip-rn50"])
def test_a_weights_file_is_read_without_running_its_pickled_code(tmp_path, name):
    """Weights files come from the internet: they are read with weights_only=True, which refuses any pickled call."""
    marker, path = tmp_path / "code-ran", tmp_path / "weights.pt"
    torch.save({"state_dict": {"conv1.weight": RunsCode(marker)}}, path)
    with pytest.raises(SystemExit, match="not usable as"):
        common.load_backbone(name, str(path))
    assert not marker.exists()


def test_an_entry_named_constants_pkl_does_not_make_a_file_load_with_its_pickled_code(tmp_path):
    """Only TorchScript archives were read with weights_only=False, recognised by any '*/constants.pkl' entry, where
    torch looks at the archive's top folder only: a pickle with an entry 'archive/x/constants.pkl' ran its code."""
    marker, path = tmp_path / "code-ran", tmp_path / "weights.pt"
    torch.save({"state_dict": {"conv1.weight": RunsCode(marker)}}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(archive.namelist()[0].split("/")[0] + "/x/constants.pkl", b"")
    with pytest.raises(SystemExit, match="not usable as clip-rn50 weights"):
        common.load_backbone("clip-rn50", str(path))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*TorchScript:UserWarning", "ignore:.*torch.jit:FutureWarning")
def test_a_pickle_posing_as_a_torchscript_archive_does_not_run_its_code(tmp_path):
    """A top-level constants.pkl makes a file a TorchScript archive to us (and to torch.load), so TorchScript's reader
    opens it: that reader builds TorchScript objects only, and a pickled call makes it fail, not run."""
    marker, path = tmp_path / "code-ran", tmp_path / "weights.pt"
    torch.save({"state_dict": {"conv1.weight": RunsCode(marker)}}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(archive.namelist()[0].split("/")[0] + "/constants.pkl", b"")
    assert common.is_torchscript(path)
    with pytest.raises(SystemExit, match="a TorchScript archive torch.jit.load cannot read"):
        common.load_backbone("clip-rn50", str(path))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*TorchScript:UserWarning", "ignore:.*torch.jit:FutureWarning")
def test_a_torchscript_archive_is_told_by_its_contents_not_by_the_words_of_torchs_error(tmp_path, monkeypatch,
                                                                                       rn50_clip_state_dict):
    """OpenAI's CLIP files are TorchScript archives. They were told apart by 'TorchScript' in torch.load's refusal:
    a torch whose message words it otherwise would have refused every OpenAI file as 'not a checkpoint of tensors'."""
    save_torchscript_archive(rn50_clip_state_dict, tmp_path / "RN50.pt")
    torch.save(rn50_clip_state_dict, tmp_path / "state_dict.pt")
    assert common.is_torchscript(tmp_path / "RN50.pt") and not common.is_torchscript(tmp_path / "state_dict.pt")
    assert not common.is_torchscript(tmp_path / "missing.pt")
    load = torch.load

    def reworded(path, *args, **kwargs):  # a future torch: the same refusal, other words
        if common.is_torchscript(path):
            raise RuntimeError("weights_only load of this archive kind is not supported")
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", reworded)
    assert same_weights(common.load_backbone("clip-rn50", str(tmp_path / "RN50.pt")).clip, rn50_clip_state_dict)


@pytest.fixture(scope="module")
def rn50_clip_state_dict():
    return open_clip.create_model("RN50-quickgelu").state_dict()


def weights_error(name, weights):
    with pytest.raises(SystemExit) as e:
        common.load_backbone(name, str(weights))
    return str(e.value)


def test_a_model_pt_of_our_save_is_not_taken_for_pretrained_weights(tmp_path, rn50_clip_state_dict, resnet50_state_dict):
    """flyp.py --save keeps the whole CLIP under 'state_dict', which open_clip loaded as the pretrained weights."""
    flyp = tmp_path / "flyp.pt"
    torch.save({"method": "flyp", "args": {"backbone": "clip-rn50"}, "state_dict": rn50_clip_state_dict}, flyp)
    assert "it is a model.pt written by flyp.py --save, a fine-tuned model" in weights_error("clip-rn50", flyp)
    ft = tmp_path / "ft.pt"  # nn.Sequential(encoder, head)
    torch.save({"method": "ft", "args": {"backbone": "resnet50"}, "state_dict": {
        **{f"0.{k}": v for k, v in resnet50_state_dict.items() if not k.startswith("fc.")},
        "1.weight": torch.zeros(3, 2048), "1.bias": torch.zeros(3)}}, ft)
    assert "written by ft.py --save" in weights_error("resnet50", ft)


def test_a_positional_embedding_of_another_size_is_refused_not_resized(tmp_path):
    """open_clip's loader interpolates it to the model's grid (a 384-px ViT-B/16 loaded as a 224-px one) with an
    INFO line only; the backbone's weights are loaded strictly."""
    saved = open_clip.create_model("ViT-B-16-quickgelu").state_dict()
    saved["visual.positional_embedding"] = torch.zeros(577, 768)  # 24 x 24 patches + 1: ViT-B/16 at 384 px
    torch.save(saved, tmp_path / "ViT-B-16.pt")
    assert "size mismatch for visual.positional_embedding" in weights_error("clip-vit-b16", tmp_path / "ViT-B-16.pt")


def test_a_whole_pickled_model_says_to_save_its_state_dict(tmp_path):
    """torch's own message is coloured, cut mid-sentence here, and advises weights_only=False: running the file."""
    torch.save(torchvision.models.resnet50(), tmp_path / "resnet50.pth")
    for name in ("resnet50", "clip-rn50"):
        message = weights_error(name, tmp_path / "resnet50.pth")
        assert ("pickled Python objects (torchvision.models.resnet.ResNet; a whole model saved with torch.save(model)?)"
                in message and "model.state_dict() instead" in message and "\x1b" not in message), message


@pytest.mark.filterwarnings("ignore:.*TorchScript:UserWarning", "ignore:.*torch.jit:FutureWarning")
def test_a_file_for_another_backbone_names_that_backbone(tmp_path, rn50_clip_state_dict, resnet50_state_dict):
    save_torchscript_archive(rn50_clip_state_dict, tmp_path / "RN50.pt")  # OpenAI's own file, for the wrong backbone
    for name in ("resnet50", "clip-vit-b16"):
        message = weights_error(name, tmp_path / "RN50.pt")
        assert "its keys are those of clip-rn50 weights: pass --backbone clip-rn50" in message, message
    torch.save({"epoch": 800, "state_dict": {f"module.encoder_q.{k}": v for k, v in resnet50_state_dict.items()}},
               tmp_path / "moco.pth.tar")
    assert "pass --backbone moco-v2-rn50" in weights_error("resnet50", tmp_path / "moco.pth.tar")
    torch.save(resnet50_state_dict, tmp_path / "resnet50.pth")
    assert "pass --backbone resnet50" in weights_error("moco-v2-rn50", tmp_path / "resnet50.pth")


def test_a_tag_of_another_open_clip_model_is_said_to_be_no_tag_of_this_one():
    message = weights_error("clip-vit-b16", "laion2b_s34b_b88k")  # a tag of GELU 'ViT-B-16', not of the QuickGELU one
    assert "nor an open_clip pretrained tag of ViT-B-16-quickgelu (its tags: openai" in message, message


def test_an_empty_state_dict_is_said_so(tmp_path):
    torch.save({}, tmp_path / "RN50.pt")
    assert "it holds an empty state dict" in weights_error("clip-rn50", tmp_path / "RN50.pt")  # was StopIteration


def test_dataparallel_prefixes_and_a_tilde_are_understood(tmp_path, monkeypatch, resnet50_state_dict):
    """'module.' before every key (saved from nn.DataParallel or DDP) loads as open_clip's loader allowed for CLIP;
    `--weights=~/x.pth` reaches Python with its ~ (bash expands it only at the start of a word)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save({f"module.{k}": v for k, v in resnet50_state_dict.items()}, tmp_path / "resnet50.pth")
    backbone = common.load_backbone("resnet50", "~/resnet50.pth")
    assert same_weights(backbone.encoder, {k: v for k, v in resnet50_state_dict.items() if not k.startswith("fc.")})


def test_the_results_record_the_resolved_weights_file(tmp_path, monkeypatch, resnet50_state_dict):
    """Without --weights (the default folder) or with a relative path, the args alone do not say which file it was."""
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    common.weights_dir().mkdir(parents=True)
    file = common.weights_dir() / "resnet50-0676ba61.pth"
    torch.save(resnet50_state_dict, file)
    args = SimpleNamespace(backbone="resnet50", dataset="folder", weights=None, seed=0, device="cpu", out=str(tmp_path / "o"))
    monkeypatch.setattr(common, "check_args", lambda args: None)  # (a stand-in for a method's Args)
    monkeypatch.setattr(common, "Results", lambda out, method, args, device: SimpleNamespace(header={}))
    _, results, _ = common.setup(args, "lp")
    assert results.header["weights"] == {"file": str(file.resolve()), "bytes": file.stat().st_size,
                                         "mtime_ns": file.stat().st_mtime_ns}


def test_weights_for_a_backbone_this_project_pretrains_are_an_error_not_ignored():
    with pytest.raises(SystemExit, match="embedded-clip has no weights file .* drop --weights"):
        common.check_backbone("embedded-clip", "ViT-B-16.pt")


def test_unknown_backbone():
    with pytest.raises(SystemExit, match="choose one of: embedded-clip"):
        common.load_backbone("vit-huge-9000")
