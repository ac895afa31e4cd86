"""The real-dataset loaders against miniatures of every documented on-disk layout (tests/miniatures.py, written from
docs/datasets.md and reference/*.json). Every expected value is derived from the fabricated files."""
import copy
import csv
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import re
import runpy
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision
from PIL import Image

import common
import data
import miniatures as mini
from conftest import ROOT, Interrupted, interrupt_at, read_results, what_was_computed, write_noise_pngs

BACKBONE = "embedded-clip-tiny"  # 32 px: fast
NAMES = ["living17", "entity30", "cifar10", "imagenet", "domainnet", "fmow", "iwildcam", "pcam", "sst2", "folder"]
DOCS = "docs/datasets.md"
# PCam is read by torchvision's PCAM, which needs h5py (requirements-dev.txt installs it)
needs_h5py = pytest.mark.skipif(importlib.util.find_spec("h5py") is None, reason="PCam needs h5py: pip install h5py")
PARAMS = [pytest.param(n, marks=needs_h5py) if n == "pcam" else n for n in NAMES]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("RFT_WORKERS", "0")  # tiny splits: read in the main process (one test uses workers)
    monkeypatch.delenv("RFT_DATA", raising=False)


class Miniatures:
    """Each miniature built once per session (lazily) and loaded once with the tiny embedded backbone."""

    def __init__(self, factory):
        self.factory, self.built, self.loaded = factory, {}, {}

    def build(self, name):
        key = "breeds" if name in ("living17", "entity30") else name
        if key not in self.built:
            root = self.factory.mktemp(key)
            if key == "breeds":
                truth = mini.make_breeds(root, big=("living17", 0))
            elif key == "folder":
                truth = mini.make_folder(root / "mydata")
                root = root / "mydata"
            else:
                truth = getattr(mini, f"make_{key}")(root)
            self.built[key] = (root, truth)
        root, truth = self.built[key]
        return root, truth[name] if key == "breeds" else truth

    def load(self, name):
        if name not in self.loaded:
            root, _ = self.build(name)
            self.loaded[name] = data.load_dataset(name, data_root=str(root), backbone=BACKBONE)
        return self.loaded[name]


@pytest.fixture(scope="session")
def minis(tmp_path_factory):
    return Miniatures(tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# Helpers: a loaded split as {relative path: label} or {image id: label}
# ---------------------------------------------------------------------------------------------------------------
def labelled(split, root):
    """{path relative to root: label} of a split read from image files (no duplicates)."""
    root = Path(root).resolve()
    items = [Path(p).resolve().relative_to(root).as_posix() for p in split.items]
    assert len(set(items)) == len(items) == len(split.labels)
    return dict(zip(items, split.labels.tolist()))


def pictures(split):
    """The stored pictures of a split, before the backbone's transform (PIL images)."""
    if isinstance(split, data.FileSplit):
        return [split.read(item) for item in split.items]
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in split.images]


def by_id(split):
    """{image id: label} of a split of `oriented` pictures (array formats), and whether each picture is upright."""
    out, upright = {}, []
    for img, y in zip(pictures(split), split.labels.tolist()):
        i, up = mini.read_id(img)
        assert i not in out, f"image {i} twice"
        out[i] = y
        upright.append(up)
    return out, upright


def check_holdout(train, val, all_train):
    """ID train + held-out ID val = every ID training image; a stratified ~10% of each class held out."""
    assert not set(train) & set(val)
    assert {**train, **val} == all_train
    total, held = Counter(all_train.values()), Counter(val.values())
    for label, n in total.items():
        assert abs(held[label] - 0.1 * n) < 1 or (n >= 2 and held[label] == 1), (label, n, held[label])
        assert n - held[label] >= 1, f"class {label} lost all its training images"
        if n >= 2:
            assert held[label] >= 1, (label, n)


def check_error(excinfo, *fragments):
    message = str(excinfo.value)
    for fragment in (*fragments, DOCS):
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"


def ood_names(dataset):
    return sorted(dataset.ood)


def edit_csv(path, edit):
    """Rewrite a miniature's CSV as a user's hand edit would: `edit(rows)` returns the new list of row dicts."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(edit(rows))


def set_row(i, column, value):
    """An `edit_csv` edit: row i's `column` set to `value` (row i is on line i + 2, after the header)."""
    return lambda rows: [{**r, column: value} if k == i else r for k, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------------------
# The registry, the hold-out
# ---------------------------------------------------------------------------------------------------------------
def test_registry_lists_every_documented_dataset():
    assert sorted(data.REAL) == sorted(NAMES)
    doc = (ROOT / DOCS).read_text()
    for name in NAMES:
        assert f"| `{name}` |" in doc, name
        assert f'<a id="{name}"></a>' in doc, f"the errors link to docs/datasets.md#{name}: no such anchor"


def test_each_dataset_runs_by_default_with_the_backbone_docs_datasets_md_names():
    """A run without --backbone uses its dataset's paper's backbone, as the table in docs/datasets.md says (DomainNet:
    CLIP RN50 in LP-FT; BREEDS and CIFAR-10: MoCo-v2): another one would give numbers that compare with nothing."""
    rows = re.findall(r"^\| `([a-z0-9]+)` \|.*\| `([a-z0-9-]+)` \|$", (ROOT / DOCS).read_text(), re.MULTILINE)
    assert sorted(name for name, _ in rows) == sorted(NAMES)
    for name, backbone in rows:
        assert data.default_backbone(name) == backbone, name


def test_holdout_is_stratified_and_fixed():
    labels = torch.tensor([0] * 1 + [1] * 2 + [2] * 5 + [3] * 10 + [4] * 25 + [5] * 100)
    labels = labels[torch.randperm(143, generator=torch.Generator().manual_seed(0))]
    kept, held = data.holdout(labels)
    kept2, held2 = data.holdout(labels)
    assert torch.equal(torch.as_tensor(kept), torch.as_tensor(kept2))
    assert torch.equal(torch.as_tensor(held), torch.as_tensor(held2))
    kept, held = torch.as_tensor(kept).tolist(), torch.as_tensor(held).tolist()
    assert sorted(kept + held) == list(range(len(labels)))
    as_dict = lambda idx: {i: int(labels[i]) for i in idx}  # noqa: E731
    check_holdout(as_dict(kept), as_dict(held), as_dict(range(len(labels))))
    assert Counter(int(labels[i]) for i in held)[5] == 10


def test_holdout_takes_the_nearest_whole_number_of_images_to_10_percent():
    """10% of 14 images is 1.4 and of 16 is 1.6: 1 and 2 held out. Always rounding down (or up) is still within one
    image of 10%, which is all check_holdout asks, but holds out fewer (or more) than the documented 10%."""
    sizes = [14, 16, 26, 34]
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    _, held = data.holdout(labels)
    counts = Counter(labels[held].tolist())
    for label, n in enumerate(sizes):
        assert abs(counts[label] - data.VAL_FRACTION * n) < 0.5, (n, counts[label])


def test_holdout_draws_at_random_not_a_run_of_neighbouring_images():
    """docs/datasets.md: ID val is *drawn* (seed 0). Files sorted by name often follow time or source (img_0001 is
    the oldest): the first (or last) 10% of a class would be a biased validation set, yet as stratified."""
    labels = torch.zeros(100, dtype=torch.long)
    _, held = data.holdout(labels)
    assert len(held) == 10 and held.max() - held.min() >= len(held)  # not one contiguous run of files


# ---------------------------------------------------------------------------------------------------------------
# Living-17, Entity-30 (BREEDS)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,classes", [("living17", 17), ("entity30", 30)])
def test_breeds_splits_labels_and_subclasses(minis, name, classes):
    root, truth = minis.build(name)
    ds = minis.load(name)
    assert len(ds.classnames) == classes and ds.classnames == truth["classnames"]
    assert not any("," in c for c in ds.classnames)  # one name each, for prompts: "dog", not WordNet's synonym list
    assert {"living17": "dog", "entity30": "passerine"}[name] in ds.classnames
    assert ds.templates == mini.reference("openai_imagenet_templates")["openai_imagenet_templates"]  # ImageNet's own
    train, val, test = labelled(ds.train, root), labelled(ds.val, root), labelled(ds.test, root)
    check_holdout(train, val, truth["train"])
    assert test == truth["test"]
    assert ood_names(ds) == ["target"] and labelled(ds.ood["target"], root) == truth["ood"]["target"]
    assert sorted(set(train.values())) == list(range(classes))
    wnid = lambda p: p.split("/")[2]  # noqa: E731  imagenet/<train|val>/<wnid>/<file>
    assert {wnid(p) for p in [*train, *val, *test]} == truth["source"]
    assert {wnid(p) for p in labelled(ds.ood["target"], root)} == truth["target"]
    assert all(p.startswith("imagenet/train/") for p in [*train, *val])
    assert all(p.startswith("imagenet/val/") for p in [*test, *labelled(ds.ood["target"], root)])
    # the label of each image is its superclass in reference/breeds_rand_splits.json
    superclass = {w: i for i, sc in enumerate(mini.reference("breeds_rand_splits")[name])
                  for kind in ("source", "target") for _, w, _ in sc[kind]}
    for split in (train, val, test, labelled(ds.ood["target"], root)):
        assert all(label == superclass[wnid(p)] for p, label in split.items())


def test_breeds_holdout_is_fixed_across_calls_and_seeds(minis):
    root, _ = minis.build("living17")
    a = data.load_dataset("living17", seed=0, data_root=str(root), backbone=BACKBONE)
    b = data.load_dataset("living17", seed=3, data_root=str(root), backbone=BACKBONE)
    assert labelled(a.val, root) == labelled(b.val, root) == labelled(minis.load("living17").val, root)
    assert labelled(a.train, root) == labelled(b.train, root)


@pytest.mark.parametrize("missing", ["val-source", "train-source"])
def test_breeds_missing_wnid_folder_is_an_error_naming_it(tmp_path, missing):
    mini.make_breeds(tmp_path, names=("living17",), train_per_wnid=1)
    wnid = mini.reference("breeds_rand_splits")["living17"][3]["source"][1][1]
    folder = tmp_path / "imagenet" / missing.split("-")[0] / wnid
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("living17", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, wnid)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 -> STL-10, CIFAR-10.1
# ---------------------------------------------------------------------------------------------------------------
def test_cifar10_splits_labels_and_stl_label_map(minis):
    _, truth = minis.build("cifar10")
    ds = minis.load("cifar10")
    assert ds.classnames == truth["classnames"] and len(ds.templates) == 18
    assert data.STL_TO_CIFAR == [0, 2, 1, 3, 4, 5, 7, -1, 8, 9]  # docs/datasets.md
    train, up_train = by_id(ds.train)
    val, up_val = by_id(ds.val)
    check_holdout(train, val, truth["train"])
    assert by_id(ds.test)[0] == truth["test"]
    assert ood_names(ds) == ["cifar10.1", "stl10"]
    stl, _ = by_id(ds.ood["stl10"])
    assert stl == truth["ood"]["stl10"]  # labels mapped to CIFAR's
    assert len(ds.ood["stl10"]) == len(truth["stl_labels"]) - truth["stl_monkeys"] and truth["stl_monkeys"] == 2
    assert -1 not in ds.ood["stl10"].labels.tolist() and 6 not in ds.ood["stl10"].labels.tolist()  # no frog in STL
    assert by_id(ds.ood["cifar10.1"])[0] == truth["ood"]["cifar10.1"]


def test_cifar10_id_val_is_the_seed_0_holdout_of_the_training_batches(minis):
    """docs/datasets.md: ID val is a stratified 10% of ID train drawn with the fixed seed 0, the same for every run
    and method. Another seed is as stratified (check_holdout cannot tell) but selects on other images than every
    earlier run did."""
    _, truth = minis.build("cifar10")
    ds = minis.load("cifar10")
    ids = sorted(truth["train"])  # the miniature numbers its images in file order, data_batch_1 to data_batch_5
    _, held = data.holdout([truth["train"][i] for i in ids], seed=0)
    assert by_id(ds.val)[0] == {ids[k]: truth["train"][ids[k]] for k in held.tolist()}


@pytest.mark.parametrize("name", ["cifar10", pytest.param("pcam", marks=needs_h5py)])
def test_feature_cache_key_of_images_in_one_array_file_changes_with_their_pixels(name, tmp_path):
    """CIFAR-10's and PCam's items are indices into one file: the cache key covers the pixels (CIFAR, read into
    memory) or the file's identity (PCam's HDF5), so features of images replaced under the same labels are not
    read from the cache."""
    root = tmp_path / "d"
    getattr(mini, f"make_{name}")(root)
    backbone = common.Backbone(torch.nn.Identity(), key="k")

    def key():
        dataset = data.load_dataset(name, data_root=str(root), backbone=BACKBONE)
        return common.feature_cache(backbone, dataset, "id_test", "cpu", "auto")

    before = key()
    if name == "cifar10":  # the test batch again, its labels kept, one pixel changed
        import pickle

        path = root / "cifar-10-batches-py" / "test_batch"
        batch = pickle.loads(path.read_bytes(), encoding="latin1")
        batch["data"][0, 0] ^= 1
        path.write_bytes(mini._py2_pickle(batch))
    else:  # a new download of the test images: the same size, written later
        path = root / "pcam" / "camelyonpatch_level_2_split_test_x.h5"
        path.write_bytes(path.read_bytes())
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))
    assert key() != before


def test_feature_cache_key_covers_the_geometry_of_a_dataset_resized_whole(tmp_path, monkeypatch):
    """CIFAR-10's images are resized whole (data.SQUASHED), which the preprocessing's repr does not show: features
    cached under another geometry are not read back."""
    mini.make_cifar10(tmp_path)
    backbone = common.Backbone(torch.nn.Identity(), key="k")
    dataset = data.load_dataset("cifar10", data_root=str(tmp_path), backbone="moco-v2-rn50")
    keys = [common.feature_cache(backbone, dataset, "id_test", "cpu", "auto")]
    monkeypatch.setitem(data.SQUASHED, "cifar10", dict(squash=2.0, flip=False))
    keys.append(common.feature_cache(backbone, dataset, "id_test", "cpu", "auto"))
    assert keys[0] != keys[1]


@pytest.mark.parametrize("backbone", ["embedded-clip-tiny", "clip-vit-b16", "moco-v2-rn50"])
@pytest.mark.parametrize("dataset", [None, *data.SQUASHED])
def test_augments_says_whether_the_training_transform_draws(backbone, dataset):
    """data.augments keys the feature cache by the seed: it must agree with what transforms() does, for every kind of
    backbone and geometry, or seeds would share one random view (checked on noise, where every crop or flip shows)."""
    pre = data.preprocessing(backbone, dataset)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 64, 3), dtype=np.uint8))
    draws = []
    for seed in range(4):
        torch.manual_seed(seed)
        draws.append(data.transforms(pre, train=True)(picture))
    assert data.augments(pre) == any(not torch.equal(draws[0], d) for d in draws[1:])


@pytest.mark.parametrize("name, random", [("cifar10", False), ("domainnet", True), ("folder", True)])
def test_id_train_features_are_keyed_by_the_seed_only_where_its_transform_draws_at_random(tmp_path, name, random):
    """One augmented view per training image, drawn from the seed; CIFAR-10's training images are resized whole and
    not flipped, so every seed's features are the same, extracted once (50,000 images at 224 px)."""
    getattr(mini, f"make_{name}")(tmp_path)
    backbone = common.Backbone(torch.nn.Identity(), key="k")
    dataset = data.load_dataset(name, data_root=str(tmp_path), backbone="moco-v2-rn50")
    keys = {common.feature_cache(backbone, dataset, "id_train", "cpu", "auto", seed=seed) for seed in (0, 1)}
    assert len(keys) == (2 if random else 1)
    if not random:  # what makes one key right: two reads of CIFAR-10's training images give the same pixels
        assert torch.equal(read_once(dataset.train), read_once(dataset.train))


@pytest.mark.parametrize("split", ["train", "test", "stl10", "cifar10.1"])
def test_cifar10_stl_images_are_upright(minis, split):
    """An asymmetric picture (white band on top, red block bottom-left) written in each format's own order
    (CIFAR: channel planes, row-major; STL-10: column-major) is loaded upright, before and after the transform."""
    ds = minis.load("cifar10")
    s = ds.ood[split] if split in ds.ood else getattr(ds, split)
    _, upright = by_id(s)
    assert all(upright)
    if split != "train":  # the transform of the evaluation splits is deterministic
        for i in range(min(3, len(s))):
            x, _ = s[i]
            a = x.permute(1, 2, 0).numpy()
            assert a.shape == (32, 32, 3) and mini.read_id(a)[1], f"{split} image {i} is not upright at 32 px"


# ---------------------------------------------------------------------------------------------------------------
# ImageNet -> V2, R, Sketch, A
# ---------------------------------------------------------------------------------------------------------------
def test_imagenet_splits_and_labels(minis):
    root, truth = minis.build("imagenet")
    ds = minis.load("imagenet")
    assert ds.classnames == truth["classnames"] and len(ds.classnames) == 1000
    assert ds.templates == mini.reference("openai_imagenet_templates")["openai_imagenet_templates"]
    check_holdout(labelled(ds.train, root), labelled(ds.val, root), truth["train"])
    assert labelled(ds.test, root) == truth["test"]
    assert ood_names(ds) == ["a", "r", "sketch", "v2"]
    for name in ("v2", "r", "sketch", "a"):
        assert labelled(ds.ood[name], root) == truth["ood"][name], name


def test_imagenet_v2_label_is_the_folder_number(minis):
    root, _ = minis.build("imagenet")
    v2 = labelled(minis.load("imagenet").ood["v2"], root)
    assert all(label == int(p.split("/")[1]) for p, label in v2.items())
    assert sorted(label for p, label in v2.items() if p.split("/")[1] in ("2", "10", "100")) == [2, 2, 10, 10, 100, 100]


@pytest.mark.parametrize("folder", ["imagenetv2-matched-frequency", "ImageNetV2-matched-frequency"])
def test_imagenet_v2_is_read_under_the_names_recipes_and_imagenetv2_pytorch_give_its_folder(minis, tmp_path, folder):
    """The same class-index layout under recipes.md's name and the one imagenetv2_pytorch renames it to: a run must
    not go on for hours without V2 (its OOD average then over 3 sets) for a folder's name."""
    root, _ = minis.build("imagenet")
    (tmp_path / "imagenet").symlink_to(root / "imagenet")
    (tmp_path / folder).symlink_to(root / "imagenetv2-matched-frequency-format-val")
    v2 = minis.load("imagenet").ood["v2"]
    ds = data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE)
    assert ood_names(ds) == ["v2"]
    assert labelled(ds.ood["v2"], root) == labelled(v2, root)  # the same files (through the link), the same labels


def test_imagenet_r_a_carry_the_200_classes_and_are_scored_on_them(minis):
    _, truth = minis.build("imagenet")
    ds = minis.load("imagenet")
    for name, key in (("r", "r_indices"), ("a", "a_indices")):
        assert ds.ood[name].classes is not None and sorted(ds.ood[name].classes.tolist()) == truth[key]
    assert ds.ood["v2"].classes is None and ds.ood["sketch"].classes is None and ds.test.classes is None
    # Logits: a class outside the 200 scores highest, the true class second. Scored on the 200: all right.
    features, outside_of = {}, {}
    for name in ("r", "a", "sketch"):
        labels = ds.ood[name].labels
        subset = set(truth[f"{name}_indices"]) if name != "sketch" else set(truth["r_indices"])
        outside = min(set(range(1000)) - subset)
        logits = torch.zeros(len(labels), 1000)
        logits[torch.arange(len(labels)), labels] = 2.0
        logits[:, outside] = 5.0
        features[f"ood_{name}"] = logits
        outside_of[name] = outside
    metrics = common.evaluate(features, lambda f: f, ds, features, "cpu")
    assert metrics["acc/ood_r"] == 100.0 and metrics["acc/ood_a"] == 100.0
    # Sketch is scored on all 1,000 classes: the outside class wins (right only for that class's own images)
    sketch = ds.ood["sketch"].labels
    assert metrics["acc/ood_sketch"] == pytest.approx(100.0 * (sketch == outside_of["sketch"]).float().mean().item())
    assert metrics["acc/ood_sketch"] < 1


def test_imagenet_missing_ood_folders_are_skipped(minis, tmp_path, capsys):
    """Named, with V2's archive where it lies there not unpacked; and the sets found, being miniatures, are said to
    be of other than their released sizes."""
    root, _ = minis.build("imagenet")
    (tmp_path / "imagenet").symlink_to(root / "imagenet")
    (tmp_path / "sketch").symlink_to(root / "sketch")
    (tmp_path / "imagenetv2-matched-frequency.tar.gz").write_bytes(b"")
    ds = data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE)
    assert ood_names(ds) == ["sketch"]
    said = capsys.readouterr()
    said = said.out + said.err
    for folder in ("imagenetv2-matched-frequency-format-val", "imagenet-r", "imagenet-a"):
        assert str(tmp_path / folder) in said, said
    assert (f"found {tmp_path / 'imagenetv2-matched-frequency.tar.gz'} there: unpack it to "
            "imagenetv2-matched-frequency-format-val") in said
    assert (f"differ from the released ones, so their accuracies do not compare with published numbers: test "
            f"{len(ds.test):,} (released: 50,000), sketch {len(ds.ood['sketch']):,} (released: 50,889)\n") in said


@needs_h5py
def test_every_published_number_names_a_method_and_a_column_of_the_tables_our_runs_of_its_dataset_make(minis):
    """reference/published.json's numbers stand beside ours only where summarize.py's table has their (dataset,
    method, column): a column misnamed (`OOD macro-f1`, `OOD worst-region`) or a method our scripts do not write would
    hide a number without a word. The columns come from common.evaluate's keys on each dataset's miniature."""
    import summarize

    entries = json.loads((ROOT / "reference" / "published.json").read_text())["entries"]
    assert {e["method"] for e in entries} <= set(summarize.METHOD_ORDER) | {"flyp_fewshot"}
    for name in sorted({e["dataset"] for e in entries}):
        ds, g = minis.load(name), torch.Generator().manual_seed(0)
        logits = {k: torch.randn(len(s), len(ds.classnames), generator=g) for k, s in common.eval_splits(ds).items()}
        metrics = common.evaluate(logits, lambda f: f, ds, logits, "cpu")
        names = [c for c, _ in summarize.columns({(name, "any"): [{"metrics": metrics}]}, name)]
        for e in entries:
            if e["dataset"] == name:  # the paper's backbone is the one our recipe for the dataset runs
                assert e["column"] in names and e["backbone"] == data.default_backbone(name), (e, names)


def test_imagenet_released_sizes_are_the_documented_ones(minis, capsys):
    """The note on test sets of other than their released size uses docs/datasets.md's image counts for every OOD
    set (a wrong one would call the real, complete set cut short, or stay silent on one that is)."""
    root, _ = minis.build("imagenet")
    ds = data.load_dataset("imagenet", data_root=str(root), backbone=BACKBONE)
    said = capsys.readouterr().out
    rows = dict(re.findall(r"^\| `(\w+)` \|.*?, ([\d,]+) images\b", (ROOT / DOCS).read_text(), re.MULTILINE))
    assert sorted(rows) == ood_names(ds)
    for key, released in rows.items():
        assert f"{key} {len(ds.ood[key]):,} (released: {released})" in said, key


def test_imagenet_train_as_unpacked_from_its_archive_says_how_to_unpack_the_class_tars(tmp_path):
    """ILSVRC2012_img_train.tar holds one tar a class: 'class folders missing' alone would not say what to do."""
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    for wnid in data.reference("imagenet_classes")["wnids"]:
        (tmp_path / "imagenet" / "train" / f"{wnid}.tar").touch()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, "1000 of 1000 class folders missing", "its classes are still archives (n01440764.tar, ...)",
                f"cd {tmp_path / 'imagenet' / 'train'} && for f in *.tar")


def test_breeds_test_sets_of_other_than_50_images_a_subclass_are_said(minis, capsys, monkeypatch):
    root, _ = minis.build("living17")
    ds = data.load_dataset("living17", data_root=str(root), backbone=BACKBONE)
    hierarchy = data.reference("breeds_rand_splits")["living17"]
    source, target = (50 * sum(len(sup[side]) for sup in hierarchy) for side in ("source", "target"))
    assert (source, target) == (1700, 1700)  # 17 classes of 2 subclasses each side: BREEDS' Living-17
    assert (f"note: living17: test sets whose image counts differ from the released ones, so their accuracies do "
            f"not compare with published numbers: test {len(ds.test):,} (released: 1,700), target "
            f"{len(ds.ood['target']):,} (released: 1,700)") in capsys.readouterr().out
    monkeypatch.setattr(data, "rank_and_world", lambda: (1, 2))  # under torchrun the first process says it, the
    # others load silently
    data.load_dataset("living17", data_root=str(root), backbone=BACKBONE)
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["train", "val"])
def test_imagenet_missing_id_folder_is_an_error_naming_it(minis, tmp_path, missing):
    root, _ = minis.build("imagenet")
    (tmp_path / "imagenet").mkdir()
    kept = {"train": "val", "val": "train"}[missing]
    (tmp_path / "imagenet" / kept).symlink_to(root / "imagenet" / kept)
    with pytest.raises(SystemExit) as e:
        data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, tmp_path / "imagenet" / missing)
    archive = tmp_path / "imagenet" / f"ILSVRC2012_img_{missing}.tar"  # as downloaded, beside the folder it makes
    archive.touch()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"found {archive} there: unpack it to {missing}")


def test_imagenet_missing_wnid_folder_is_an_error_naming_it(minis, tmp_path):
    """999 of 1,000 val folders: labels would silently shift by one after the gap; the loader must stop."""
    root, truth = minis.build("imagenet")
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    (tmp_path / "imagenet" / "train").symlink_to(root / "imagenet" / "train")
    gone = truth["wnids"][500]
    for wnid in truth["wnids"]:
        if wnid != gone:
            (tmp_path / "imagenet" / "val" / wnid).symlink_to(root / "imagenet" / "val" / wnid)
    with pytest.raises(SystemExit) as e:
        data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, gone)


@pytest.mark.parametrize("name", ["imagenet", "living17"])
def test_imagenet_flat_val_folder_says_how_to_sort_it(minis, tmp_path, name):
    """ImageNet val as downloaded: ILSVRC2012_val_*.JPEG directly in val/, which prepare-imagenet-val sorts."""
    root, _ = minis.build("imagenet")  # every wnid in train/: also what BREEDS needs
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    (tmp_path / "imagenet" / "train").symlink_to(root / "imagenet" / "train")
    for k in range(1, 4):
        mini.write_image(tmp_path / "imagenet" / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, "class folders missing under", "its images lie directly in it",
                f"python data.py prepare-imagenet-val {tmp_path / 'imagenet' / 'val'} LOC_val_solution.csv")


def test_prepare_imagenet_val_moves_flat_images_into_wnid_folders_and_reruns(tmp_path, monkeypatch, capsys):
    val = tmp_path / "val"
    val.mkdir()
    wnids = ["n01440764", "n01443537", "n15075141"]
    rows, content = [], {}
    for k in range(1, 8):
        image_id = f"ILSVRC2012_val_{k:08d}"
        mini.write_image(val / f"{image_id}.JPEG", (k, k, k))
        content[image_id] = (val / f"{image_id}.JPEG").read_bytes()
        rows.append((image_id, wnids[k % 3]))
    csv_path = tmp_path / "LOC_val_solution.csv"
    mini.write_loc_val_solution(csv_path, rows[::-1])

    def state():
        return sorted(p.relative_to(val).as_posix() for p in val.rglob("*") if p.is_file())

    expected = sorted(f"{w}/{i}.JPEG" for i, w in rows)
    # the command line, in process (a subprocess would spend seconds importing torch)
    monkeypatch.setattr(sys, "argv", ["data.py", "prepare-imagenet-val", str(val), str(csv_path)])
    runpy.run_path(str(ROOT / "data.py"), run_name="__main__")
    assert state() == expected
    assert all((val / w / f"{i}.JPEG").read_bytes() == content[i] for i, w in rows)
    data.prepare_imagenet_val(str(val), str(csv_path))  # rerun: nothing to do, nothing lost
    assert state() == expected
    mini.write_image(val / "ILSVRC2012_val_00000008.JPEG", (8, 8, 8))  # an image added later (partial copy)
    mini.write_loc_val_solution(csv_path, rows + [("ILSVRC2012_val_00000008", "n01443537")])
    data.prepare_imagenet_val(str(val), str(csv_path))
    assert state() == sorted(expected + ["n01443537/ILSVRC2012_val_00000008.JPEG"])

    damaged = {"columns.csv": "id,label\nILSVRC2012_val_00000009,n01443537\n",  # another file
               "cut.csv": "ImageId,PredictionString\nILSVRC2012_val_00000009,n01443537 1 2 3 4\nILSVRC2012_val_000",
               "blank.csv": "ImageId,PredictionString\nILSVRC2012_val_00000009,\n"}
    for name, text in damaged.items():
        (tmp_path / name).write_text(text)
    mini.write_image(val / "ILSVRC2012_val_00000009.JPEG", (9, 9, 9))  # a CSV refused moves none of its images
    before = state()
    for args, expected in ((["--help"], "usage: python data.py prepare-imagenet-val"),  # not a PNG named --help
                           (["prepare-imagenet-val", str(tmp_path / "nowhere"), str(csv_path)], "is not a folder"),
                           (["prepare-imagenet-val", str(val), str(tmp_path / "no.csv")], "comes with Kaggle's"),
                           (["prepare-imagenet-val", str(val), str(tmp_path / "columns.csv")],
                            "lacks the column(s) ImageId, PredictionString (it has: id, label)"),
                           (["prepare-imagenet-val", str(val), str(tmp_path / "cut.csv")],
                            f"{tmp_path / 'cut.csv'} line 3 has 1 fields, the header 2"),
                           (["prepare-imagenet-val", str(val), str(tmp_path / "blank.csv")],
                            f"{tmp_path / 'blank.csv'} line 2: PredictionString '' does not start with a wnid")):
        monkeypatch.setattr(sys, "argv", ["data.py", *args])
        try:
            runpy.run_path(str(ROOT / "data.py"), run_name="__main__")
        except SystemExit as e:
            message = str(e)
        else:
            message = capsys.readouterr().out
        assert expected in message
    assert state() == before


# ---------------------------------------------------------------------------------------------------------------
# DomainNet
# ---------------------------------------------------------------------------------------------------------------
def test_domainnet_labels_from_the_list_files(minis):
    root, truth = minis.build("domainnet")
    ds = minis.load("domainnet")
    assert ds.classnames == truth["classnames"] == mini.reference("domainnet_sentry40")["classnames"]
    assert ds.classnames[36:] == ["butterfly", "sheep", "drums", "donut"]
    assert ds.templates == mini.reference("openai_imagenet_templates")["openai_imagenet_templates"]
    check_holdout(labelled(ds.train, root), labelled(ds.val, root), truth["train"])
    assert labelled(ds.test, root) == truth["test"]
    assert ood_names(ds) == ["clipart", "painting", "real"]
    for name in ("real", "painting", "clipart"):  # painting's list has LF line endings, the others CRLF
        assert labelled(ds.ood[name], root) == truth["ood"][name], name
    assert Counter(labelled(ds.val, root).values())[ds.classnames.index("bee")] == 2  # 10% of 20


def test_domainnet_missing_listed_image_is_an_error_naming_it(tmp_path):
    truth = mini.make_domainnet(tmp_path)
    victim = sorted(truth["ood"]["clipart"])[3]
    (tmp_path / victim).unlink()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("domainnet", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, Path(victim).name)


@pytest.mark.parametrize("label,said", [("", "is not '<domain>/<class>/<file>.jpg <label>'"),
                                        (" 40", "'40' is not a class index 0..39"),
                                        (" -1", "'-1' is not a class index 0..39"),
                                        (" bee", "'bee' is not a class index 0..39")],
                         ids=["no label", "40", "-1", "a name"])
def test_domainnet_bad_list_line_is_an_error_naming_it(tmp_path, label, said):
    """A line without its label was an IndexError; a label beyond SENTRY's 40 classes was scored silently."""
    mini.make_domainnet(tmp_path)
    path = tmp_path / "domainnet" / "SENTRY_splits" / "sketch_test_mini.txt"
    lines = path.read_bytes().split(b"\r\n")
    lines[2] = lines[2].rsplit(b" ", 1)[0] + label.encode()  # line 3, its label replaced
    path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(SystemExit) as e:
        data.load_dataset("domainnet", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path} line 3: ", said)


def test_domainnet_missing_list_file_is_an_error_naming_it(tmp_path):
    mini.make_domainnet(tmp_path)
    (tmp_path / "domainnet" / "SENTRY_splits" / "real_test_mini.txt").unlink()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("domainnet", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, "real_test_mini.txt")


@pytest.mark.parametrize("where", ["txt", "."])
def test_domainnet_lists_in_sentrys_folder_or_in_no_folder_are_named(tmp_path, where):
    """SENTRY's repository keeps its lists in data/DomainNet/txt/, and download scripts fetch them straight into
    domainnet/: the error names where they are and where they go (it said only that SENTRY_splits/ was missing)."""
    mini.make_domainnet(tmp_path)
    base = tmp_path / "domainnet"
    (base / where).mkdir(exist_ok=True)
    for f in list((base / "SENTRY_splits").iterdir()):
        f.rename(base / where / f.name)
    (base / "SENTRY_splits").rmdir()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("domainnet", data_root=str(tmp_path), backbone=BACKBONE)
    said = ("found {}/txt there: rename it to SENTRY_splits" if where == "txt" else
            "found {}/sketch_train_mini.txt: move it (and what goes with it) into {}/SENTRY_splits")
    check_error(e, said.format(base, base))


def test_domainnet_blank_lines_in_a_list_file_are_skipped(tmp_path):
    """A list file edited by hand often holds an empty line, or ends in one: it names no image and is no error."""
    truth = mini.make_domainnet(tmp_path)
    path = tmp_path / "domainnet" / "SENTRY_splits" / "sketch_test_mini.txt"
    lines = path.read_bytes().split(b"\r\n")
    path.write_bytes(b"\r\n".join(lines[:2] + [b"", b"  "] + lines[2:]) + b"\r\n")
    ds = data.load_dataset("domainnet", data_root=str(tmp_path), backbone=BACKBONE)
    assert labelled(ds.test, tmp_path) == truth["test"]


# ---------------------------------------------------------------------------------------------------------------
# FMoW
# ---------------------------------------------------------------------------------------------------------------
def test_fmow_official_split_by_year_and_seq_rows(minis):
    root, truth = minis.build("fmow")
    ds = minis.load("fmow")
    assert ds.classnames == truth["classnames"] and len(ds.classnames) == 62
    assert ds.metric == "worst_region_acc"
    assert labelled(ds.train, root) == truth["train"]
    assert labelled(ds.val, root) == truth["val"]
    assert labelled(ds.test, root) == truth["test"]
    assert ood_names(ds) == ["test"] and labelled(ds.ood["test"], root) == truth["ood"]["test"]
    used = {p for s in (ds.train, ds.val, ds.test, ds.ood["test"]) for p in labelled(s, root)}
    assert not used & truth["unused"]  # 2013-2015, and train/val rows from 2016 on
    # 'seq' rows are dropped but counted: rgb_img_<i> is row i of rgb_metadata.csv
    indices = {int(p.rsplit("_", 1)[1][:-4]) for p in used}
    assert not indices & set(truth["seq_rows"]) and max(indices) < truth["rows"]
    assert truth["seq_rows"][:2] == [0, 1] and min(indices) == 2


def test_fmow_regions(minis):
    root, truth = minis.build("fmow")
    ds = minis.load("fmow")
    for split in (ds.ood["test"], ds.test):
        assert split.groups is not None and len(split.groups) == len(split)
        regions = [split.group_names[g] for g in split.groups.tolist()]
        assert dict(zip(labelled(split, root), regions)) == {p: truth["region"][p] for p in labelled(split, root)}
    assert set(ds.ood["test"].group_names) >= {"Asia", "Europe", "Africa", "Americas", "Oceania", "Other"}


def test_fmow_worst_region_accuracy_excludes_other(minis):
    root, truth = minis.build("fmow")
    ds = minis.load("fmow")
    split = ds.ood["test"]
    paths = list(labelled(split, root))
    region = [truth["region"][p] for p in paths]
    labels = split.labels
    # right everywhere except: every 'Other' image wrong, and one of the Americas images wrong
    pred = labels.clone()
    wrong = [i for i, r in enumerate(region) if r == "Other"] + [region.index("Americas")]
    pred[wrong] = (labels[wrong] + 1) % 62
    acc = {r: 100.0 * np.mean([pred[i] == labels[i] for i in range(len(paths)) if region[i] == r])
           for r in set(region) - {"Other"}}
    expected = min(acc.values())
    assert 0 < expected < 100 and "Other" in region
    assert common.worst_group_acc(pred, labels, split.groups, split.group_names) == pytest.approx(expected)
    logits = torch.nn.functional.one_hot(pred, 62).float()
    metrics = common.evaluate({"ood_test": logits}, lambda f: f, ds, {"ood_test": logits}, "cpu")
    assert metrics["worst_region_acc/ood_test"] == pytest.approx(expected)
    assert metrics["acc/ood_test"] == pytest.approx(100.0 * (pred == labels).float().mean().item())


def test_fmow_templates_put_the_article_before_the_class_name(minis):
    ds = minis.load("fmow")
    ref = mini.reference("wilds_templates")["fmow_templates"]
    assert len(ds.templates) == len(ref) == 16
    for template, entry in zip(ds.templates, ref):
        if entry["class_name_transform"] == "append_proper_article":
            assert isinstance(template, data.ArticleTemplate)
            assert template.format("airport_hangar") == entry["template"].replace("{}", "an airport hangar")
            assert template.format("zoo") == entry["template"].replace("{}", "a zoo")
        else:
            assert template.format("airport_hangar") == entry["template"].replace("{}", "airport_hangar")
    assert "satellite photo of an airport hangar." in [t.format("airport_hangar") for t in ds.templates]


def test_fmow_country_with_an_empty_region_is_other(tmp_path):
    rows = [("train", 2010, 1, 1, "airport", "USA"), ("train", 2010, 1, 2, "zoo", "ATA"),
            ("val", 2011, 1, 1, "zoo", "FRA"), ("test", 2011, 1, 1, "dam", "CHN"), ("test", 2016, 1, 1, "dam", "ATA")]
    truth = mini.make_fmow(tmp_path, rows=rows)
    ds = data.load_dataset("fmow", data_root=str(tmp_path), backbone=BACKBONE)
    split = ds.ood["test"]
    assert [split.group_names[g] for g in split.groups.tolist()] == ["Other"]
    assert truth["region"][next(iter(labelled(split, tmp_path)))] == "Other"


def test_fmow_timestamp_without_a_time_zone_is_read_as_utc(tmp_path):
    """ISO 8601 without the 'Z' (the CSV re-saved by a tool that drops it) is UTC, as WILDS' timestamps are: read as
    naive, it could not be compared with the UTC year boundaries of the splits (a TypeError)."""
    rows = [("train", "2010-03-04T05:06:07", "airport", "USA"), ("val", "2011-03-04 05:06:07", "zoo", "FRA"),
            ("test", "2012-12-31T23:59:59", "dam", "CHN"), ("test", "2015-12-31T23:59:59", "zoo", "FRA"),
            ("test", "2016-01-01T00:00:00", "dam", "AUS")]
    truth = mini.make_fmow(tmp_path, rows=rows)
    ds = data.load_dataset("fmow", data_root=str(tmp_path), backbone=BACKBONE)
    for split, key in ((ds.train, "train"), (ds.val, "val"), (ds.test, "test")):
        assert labelled(split, tmp_path) == truth[key] and len(truth[key]) == 1, key
    assert labelled(ds.ood["test"], tmp_path) == truth["ood"]["test"] and len(truth["ood"]["test"]) == 1


def test_fmow_reads_no_timestamp_of_the_seq_rows_it_never_uses(tmp_path):
    """WILDS reads a missing time as NaT and carries on; a 'seq' row's is never needed here, so it stops nothing."""
    truth = mini.make_fmow(tmp_path)
    edit_csv(tmp_path / "fmow_v1.1" / "rgb_metadata.csv", set_row(truth["seq_rows"][0], "timestamp", ""))
    ds = data.load_dataset("fmow", data_root=str(tmp_path), backbone=BACKBONE)
    assert labelled(ds.train, tmp_path) == truth["train"] and labelled(ds.ood["test"], tmp_path) == truth["ood"]["test"]


@pytest.mark.parametrize("name,folder", [("fmow", "fmow_v1.1/images"), ("iwildcam", "iwildcam_v2.0/train")])
def test_wilds_missing_image_folder_is_an_error_naming_it(tmp_path, name, folder):
    getattr(mini, f"make_{name}")(tmp_path)
    (tmp_path / folder).rename(tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, tmp_path / folder)


@pytest.mark.parametrize("column,value,said", [
    ("category", "Airport", "'Airport' is not one of the 62 FMoW categories"),
    ("category", "", "'' is not one of the 62 FMoW categories"),
    ("timestamp", "06/06/2016", "timestamp '06/06/2016' is not an ISO 8601 date-time"),
], ids=["Airport", "no category", "US date"])
def test_fmow_bad_metadata_row_is_an_error_naming_its_line(tmp_path, column, value, said):
    """Were a KeyError and a ValueError; row 2 (line 4) is an ID training row."""
    mini.make_fmow(tmp_path)
    path = tmp_path / "fmow_v1.1" / "rgb_metadata.csv"
    edit_csv(path, set_row(2, column, value))
    with pytest.raises(SystemExit) as e:
        data.load_dataset("fmow", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path} line 4: {said}", *(["did you mean 'airport'?"] if value == "Airport" else []))


@pytest.mark.parametrize("name,csv_name", [("fmow", "rgb_metadata.csv"), ("iwildcam", "metadata.csv")])
def test_wilds_missing_images_are_an_error_at_load_naming_them(tmp_path, name, csv_name):
    """Found up front, not mid-epoch: the CSV still names them, so they must be restored, not deleted."""
    truth = getattr(mini, f"make_{name}")(tmp_path)
    gone = sorted(truth["ood"]["test"])[:2]
    for rel in gone:
        (tmp_path / rel).unlink()
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"2 of {len(truth['ood']['test'])} images", csv_name, *(tmp_path / rel for rel in gone),
                "restore them")


def test_fmow_malformed_csv_is_an_error_naming_it(tmp_path):
    mini.make_fmow(tmp_path, columns=[c for c in mini.FMOW_COLUMNS if c != "timestamp"])
    with pytest.raises(SystemExit) as e:
        data.load_dataset("fmow", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, "rgb_metadata.csv", "timestamp")


# ---------------------------------------------------------------------------------------------------------------
# iWildCam
# ---------------------------------------------------------------------------------------------------------------
def test_iwildcam_splits_from_the_metadata(minis):
    root, truth = minis.build("iwildcam")
    ds = minis.load("iwildcam")
    assert ds.classnames == truth["classnames"] and len(ds.classnames) == 182
    assert ds.templates == ["a photo of {}.", "{} in the wild."] and ds.metric == "macro_f1"
    assert labelled(ds.train, root) == truth["train"]
    assert labelled(ds.val, root) == truth["val"]
    assert labelled(ds.test, root) == truth["test"]
    assert ood_names(ds) == ["test"] and labelled(ds.ood["test"], root) == truth["ood"]["test"]


def test_iwildcam_macro_f1_is_wilds_and_sklearn(minis):
    from sklearn.metrics import f1_score

    ds = minis.load("iwildcam")
    g = torch.Generator().manual_seed(0)
    features = {}
    for name, split in (("id_test", ds.test), ("ood_test", ds.ood["test"])):
        present = split.labels.unique()
        pred = present[torch.randint(len(present), (len(split),), generator=g)]
        pred[::3] = split.labels[::3]  # some right
        pred[1] = 7  # a class that is in no label: counts as a false positive only
        expected = 100 * f1_score(split.labels.numpy(), pred.numpy(), average="macro",
                                  labels=np.unique(split.labels.numpy()), zero_division=0)
        assert common.macro_f1(pred, split.labels) == pytest.approx(expected)
        features[name] = torch.nn.functional.one_hot(pred, 182).float()
        features[name + "_expected"] = expected
    expected = {k: features.pop(k + "_expected") for k in ("id_test", "ood_test")}
    metrics = common.evaluate(features, lambda f: f, ds, features, "cpu")
    for name in ("id_test", "ood_test"):
        assert metrics[f"macro_f1/{name}"] == pytest.approx(expected[name])
    assert metrics["macro_f1/ood_avg"] == pytest.approx(expected["ood_test"])


@pytest.mark.parametrize("split", ["train", "id_val", "id_test", "test"])
def test_iwildcam_split_without_rows_is_an_error_naming_it(tmp_path, split):
    """An empty id_val was a RuntimeError in the macro-F1, after a whole epoch."""
    mini.make_iwildcam(tmp_path)
    path = tmp_path / "iwildcam_v2.0" / "metadata.csv"
    edit_csv(path, lambda rows: [r for r in rows if r["split"] != split])
    with pytest.raises(SystemExit) as e:
        data.load_dataset("iwildcam", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"no images with split '{split}' in {path}")


@pytest.mark.parametrize("y", ["999", "182", "-1", "bird", ""])
def test_iwildcam_label_out_of_range_is_an_error_naming_its_line(tmp_path, y):
    """y=999 was an IndexError mid-training; row 3 (line 5) is an ID training row."""
    mini.make_iwildcam(tmp_path)
    path = tmp_path / "iwildcam_v2.0" / "metadata.csv"
    edit_csv(path, set_row(3, "y", y))
    with pytest.raises(SystemExit) as e:
        data.load_dataset("iwildcam", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path} line 5, column y: {y!r} is not a class index 0..181")


def test_iwildcam_several_bad_labels_name_the_first_and_count_them(tmp_path):
    """The error names the first bad line, the one to fix first, and says how many more there are."""
    mini.make_iwildcam(tmp_path)
    path = tmp_path / "iwildcam_v2.0" / "metadata.csv"
    edit_csv(path, lambda rows: set_row(7, "y", "999")(set_row(3, "y", "bird")(rows)))
    with pytest.raises(SystemExit) as e:
        data.load_dataset("iwildcam", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path} line 5, column y: 'bird' is not a class index 0..181; 2 such rows")


def test_iwildcam_malformed_csv_is_an_error_naming_it(tmp_path):
    mini.make_iwildcam(tmp_path, columns=[c for c in mini.IWILDCAM_COLUMNS if c != "y"])
    with pytest.raises(SystemExit) as e:
        data.load_dataset("iwildcam", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, "metadata.csv", "y")


# ---------------------------------------------------------------------------------------------------------------
# PCam, Rendered SST2
# ---------------------------------------------------------------------------------------------------------------
@needs_h5py
def test_pcam_splits_and_labels(minis):
    _, truth = minis.build("pcam")
    ds = minis.load("pcam")
    assert ds.classnames == truth["classnames"] == ["lymph node", "lymph node containing metastatic tumor tissue"]
    assert ds.templates == ["this is a photo of {}"] and ds.ood == {}
    assert by_id(ds.train)[0] == truth["train"]
    assert by_id(ds.val)[0] == truth["valid"]
    test, upright = by_id(ds.test)
    assert test == truth["test"] and all(upright)


@needs_h5py
def test_pcam_reads_what_torchvision_reads(minis):
    import torchvision

    root, _ = minis.build("pcam")
    ds = minis.load("pcam")
    for split, part in ((ds.train, "train"), (ds.val, "val"), (ds.test, "test")):
        theirs = torchvision.datasets.PCAM(str(root), split=part)
        assert len(split) == len(theirs) > 0
        for i in range(len(theirs)):
            image, label = theirs[i]
            assert np.array_equal(np.asarray(split.read(split.items[i])), np.asarray(image))
            assert split.labels[i].item() == label


def test_sst2_splits_and_labels(minis, monkeypatch):
    root, truth = minis.build("sst2")
    ds = minis.load("sst2")
    assert ds.classnames == ["negative", "positive"] and ds.templates == ["a {} review of a movie."]
    assert ds.ood == {}
    assert labelled(ds.train, root) == truth["train"]
    assert labelled(ds.val, root) == truth["valid"]
    assert labelled(ds.test, root) == truth["test"]
    monkeypatch.setenv("RFT_DATA", str(root))  # the data root from the environment
    assert labelled(data.load_dataset("sst2", backbone=BACKBONE).test, root) == truth["test"]


# ---------------------------------------------------------------------------------------------------------------
# Your own folders
# ---------------------------------------------------------------------------------------------------------------
def test_folder_with_val_test_ood_and_templates(minis):
    root, truth = minis.build("folder")
    ds = minis.load("folder")
    assert ds.classnames == truth["classnames"] == ["golden retriever", "red fox", "tabby cat"]
    assert ds.templates == truth["templates"]
    assert labelled(ds.train, root) == truth["train"]  # .txt and hidden files are no images
    assert labelled(ds.val, root) == truth["val"]
    assert labelled(ds.test, root) == truth["test"]
    assert ood_names(ds) == ["night", "sketches"]
    for name in ("night", "sketches"):  # night holds a subset of the classes: same labels as train's
        assert labelled(ds.ood[name], root) == truth["ood"][name]


def test_folder_holds_out_val_and_test_when_absent(tmp_path):
    root = tmp_path / "mydata"
    truth = mini.make_folder(root, val=False, test=False, ood=(), templates=None)
    ds = data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    assert ds.ood == {} and ds.templates == ["a photo of a {}."]
    train, val, test = labelled(ds.train, root), labelled(ds.val, root), labelled(ds.test, root)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert {**train, **val, **test} == truth["train"]
    for held in (val, test):
        counts = Counter(held.values())
        for label, n in Counter(truth["train"].values()).items():
            assert abs(counts[label] - 0.1 * n) < 1 or counts[label] == 1, (label, n, counts[label])
    again = data.load_dataset("folder", seed=5, data_root=str(root), backbone=BACKBONE)
    assert labelled(again.val, root) == val and labelled(again.test, root) == test


def test_folder_only_val_present(tmp_path):
    root = tmp_path / "mydata"
    truth = mini.make_folder(root, val=True, test=False, ood=())
    ds = data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    assert labelled(ds.val, root) == truth["val"]
    train, test = labelled(ds.train, root), labelled(ds.test, root)
    assert not set(train) & set(test) and {**train, **test} == truth["train"]


def test_folder_ood_class_unknown_to_train_is_an_error(tmp_path):
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=(("sketches", mini.FOLDER_CLASSES),))
    mini.write_image(root / "sketches" / "snow_leopard" / "a.jpg")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, "snow_leopard")
    assert "every other sub-folder" in str(e.value)  # a stray folder (say runs/) would get the same error: say why


@pytest.mark.parametrize("lines", [["a photo of a {name}."], ["{} and {}"], ["a photo."], ["", "  "],
                                   ["a photo of a {}.", "a {0}."]])
def test_folder_templates_without_exactly_one_slot_are_an_error(tmp_path, lines):
    """Each would otherwise fail deep in the zero-shot head (KeyError, IndexError, an empty reshape) or, without a
    slot, caption every class alike and score chance."""
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=(), templates=lines)
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, str(root / "templates.txt"))


def test_folder_ignores_hidden_and_system_folders(tmp_path):
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=(("sketches", mini.FOLDER_CLASSES),))
    for junk in (".ipynb_checkpoints", "__MACOSX", "train/.cache"):
        mini.write_image(root / junk / mini.FOLDER_CLASSES[0] / "a.jpg")
    ds = data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    assert ood_names(ds) == ["sketches"] and len(ds.classnames) == len(mini.FOLDER_CLASSES)


def test_folder_reads_images_in_sub_folders_of_a_class_and_skips_hidden_ones(tmp_path):
    """As torchvision's ImageFolder: train/<class>/<anything>/x.jpg belongs to <class>; a hidden folder or file
    (.ipynb_checkpoints/, ._x.jpg from macOS) inside a class folder is no image."""
    root = tmp_path / "mydata"
    truth = mini.make_folder(root, ood=())
    cls = mini.FOLDER_CLASSES[2]
    nested = [mini.write_image(root / "train" / cls / "2023" / "may" / "deep.png"),
              mini.write_image(root / "train" / cls / "2024" / "flat.jpg")]
    for junk in (f"train/{cls}/.ipynb_checkpoints/x.jpg", f"train/{cls}/__MACOSX/y.jpg", f"train/{cls}/._z.jpg"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"not an image")
    ds = data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    label = mini.FOLDER_CLASSES.index(cls)
    assert labelled(ds.train, root) == {**truth["train"], **{p.relative_to(root).as_posix(): label for p in nested}}


def test_folder_labels_and_held_out_images_do_not_depend_on_the_listing_order(tmp_path, monkeypatch):
    """os.scandir lists a folder in the file system's order (hash order on ext4, creation order elsewhere). Class
    indices and the held-out val and test images must follow sorted names, or the same data copied to another disk
    would silently get other labels or another ID val split."""
    root = tmp_path / "mydata"
    mini.make_folder(root, val=False, test=False, ood=(("sketches", mini.FOLDER_CLASSES),))
    scandir = os.scandir

    class Listing(list):  # what os.scandir returns, as far as the loaders use it: iterable, a context manager
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def load(descending):
        with monkeypatch.context() as m:
            m.setattr(os, "scandir", lambda path: Listing(sorted(scandir(path), key=lambda e: e.name,
                                                                 reverse=descending)))
            ds = data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
        return ds.classnames, [labelled(s, root) for s in (ds.train, ds.val, ds.test, ds.ood["sketches"])]

    assert load(descending=True) == load(descending=False)


def test_folder_without_images_is_an_error_saying_what_it_looked_for(tmp_path):
    root = tmp_path / "mydata"
    for c in mini.FOLDER_CLASSES:
        (root / "train" / c).mkdir(parents=True)
        (root / "train" / c / "notes.txt").write_text("no image")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, f"no images under {root / 'train'}/<class>/", ".jpg", "3 class folders")


@pytest.mark.parametrize("classes", [0, 1])
def test_folder_with_fewer_than_two_classes_is_an_error(tmp_path, classes):
    """One class scores 100% whatever the model does; none (images straight in train/) is the same mistake."""
    root = tmp_path / "mydata"
    if classes:
        mini.make_folder(root, val=False, test=False, ood=(), train_per_class=(12,))  # zip: the first class only
    else:
        for k in range(4):
            mini.write_image(root / "train" / f"img_{k}.jpg")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, f"{root / 'train'} holds {classes} class folder(s)", "at least 2",
                *([mini.FOLDER_CLASSES[0]] if classes else []))


def test_folder_with_an_empty_training_class_is_an_error_naming_it(tmp_path):
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=())
    (root / "train" / "zebra").mkdir()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, f"1 of {len(mini.FOLDER_CLASSES) + 1} class folders under {root / 'train'} hold no images (e.g. zebra;",
                "add images or remove the folder")


@pytest.mark.parametrize("workers_env,decode", [("0", "0"), ("2", "0"), ("2", "1")])
@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_an_unreadable_image_stops_the_run_naming_the_file(damage, workers_env, decode, tmp_path, monkeypatch):
    monkeypatch.setenv("RFT_WORKERS", workers_env)  # a worker re-raises the error in its own words: same one line
    monkeypatch.setenv("RFT_GPU_DECODE", decode)  # the file is decoded after the loader, where the batch goes
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=())
    if decode == "1":  # decoding on the device is for JPEG-only splits
        for p in [p for p in root.rglob("img_*") if p.suffix.lower() not in (".jpg", ".jpeg")]:
            mini.write_image(p.with_suffix(".jpg"))
            p.unlink()
    bad = sorted((root / "train" / mini.FOLDER_CLASSES[1]).glob("*.jpg"))[0]
    mini.write_image(bad, size=64)
    bad.write_bytes(bad.read_bytes()[:300] if damage == "truncated" else b"<html>404 Not Found</html>")
    ds = data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    split = next(s for s in (ds.train, ds.val, ds.test) if str(bad) in map(str, s.items))
    assert split.decode_on_device == (decode == "1")
    before = set(multiprocessing.active_children())
    gc.disable()  # what is freed below is freed by reference counting alone
    try:
        with pytest.raises(SystemExit) as e:
            for _ in split.batches(4, shuffle=True):  # a training pass: its workers persist between passes
                pass
        message = str(e.value)
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == int(workers_env)
        del e, split, ds  # (e's traceback holds this frame, which holds e)
        assert not any(w.is_alive() for w in workers)  # no cycle left the loader to the garbage collector (5 s a worker)
    finally:
        gc.enable()
    assert message.startswith(f"error: cannot read image file {bad} (") and message.endswith(
        "): restore it from the download (a folder dataset of your own may also drop it)") and "\n" not in message

# ---------------------------------------------------------------------------------------------------------------
# Every split: normalised float batches at the backbone's resolution, subsets
# ---------------------------------------------------------------------------------------------------------------
def eval_and_train_splits(ds):
    return {"train": ds.train, **common.eval_splits(ds)}


@pytest.mark.parametrize("name", PARAMS)
def test_every_split_batches_and_subsets(minis, name):
    ds = minis.load(name)
    assert ds.backbone == BACKBONE
    for key, split in eval_and_train_splits(ds).items():
        assert isinstance(split, data.FileSplit), (name, key, type(split))
        assert len(split) > 0, (name, key)
        x, y = next(iter(split.batches(4)))
        n = min(4, len(split))
        assert x.dtype == torch.float32 and x.shape == (n, 3, 32, 32), (name, key, x.shape)
        assert torch.equal(y, split.labels[:n])
        if key != "train":  # deterministic transform: the batch is the normalised uint8 images
            raw = torch.stack([split[i][0] for i in range(n)])
            assert raw.dtype == torch.uint8
            assert torch.allclose(x, data.normalize(raw, split.mean, split.std), atol=1e-6)
        idx = list(range(len(split)))[::-2][:3]
        sub = split.subset(idx)
        assert len(sub) == len(idx) and sub.labels.tolist() == [split.labels[i].item() for i in idx]
        assert sub.items == [split.items[i] for i in idx]
        assert (sub.groups is None) == (split.groups is None) and (sub.classes is None) == (split.classes is None)
        xs, ys = next(iter(sub.batches(8)))
        assert xs.shape == (len(idx), 3, 32, 32) and ys.tolist() == sub.labels.tolist()


@pytest.mark.parametrize("name", [pytest.param("pcam", marks=needs_h5py), "cifar10"])
def test_batches_with_worker_processes(minis, name, monkeypatch):
    """Array-backed splits (HDF5, pickles, .bin) also read in DataLoader worker processes."""
    monkeypatch.setenv("RFT_WORKERS", "2")
    ds = minis.load(name)
    split = ds.train.subset(range(len(ds.train)))  # a fresh split: its own loaders
    labels = torch.cat([y for _, y in split.batches(2)])
    assert labels.tolist() == split.labels.tolist()


def test_a_subset_keeps_each_images_region(minis):
    """FMoW's worst-region accuracy on a subset needs each image's own region: a subset that kept the whole split's
    groups paired its images with other images' regions."""
    root, truth = minis.build("fmow")
    split = minis.load("fmow").ood["test"]
    idx = list(range(len(split)))[::-3]  # reversed, every third
    sub = split.subset(idx)
    assert sub.groups.tolist() == [split.groups[i].item() for i in idx] and sub.group_names == split.group_names
    regions = [sub.group_names[g] for g in sub.groups.tolist()]
    assert dict(zip(labelled(sub, root), regions)) == {p: truth["region"][p] for p in labelled(sub, root)}
    in_memory = data.Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4),
                           groups=torch.tensor([0, 1, 2, 3]), group_names=data.FMOW_REGIONS)
    assert in_memory.subset([3, 1]).groups.tolist() == [3, 1]


def test_a_file_split_shuffles_with_the_generator_it_is_given():
    """A training pass's order is drawn from the run's seeded generator, a new one at every pass: a loader that lost
    the generator shuffled from torch's global state, and two runs of one seed trained on different orders."""
    split = data.file_split(list(range(40)), list(range(40)), data.preprocessing(BACKBONE), train=True,
                            read=lambda i: Image.new("RGB", (8, 8)))

    def order(generator):
        return torch.cat([y for _, y in split.batches(8, shuffle=True, drop_last=True, generator=generator)]).tolist()

    g, same = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    first, second = order(g), order(g)
    assert first == torch.randperm(40, generator=same).tolist()
    assert second == torch.randperm(40, generator=same).tolist()  # the next pass: the generator's next draw
    assert first != second


def noise_picture(i):
    """Image i of a split of noise pictures, where every crop differs."""
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_a_file_splits_crops_are_the_runs_whatever_reads_them(monkeypatch):
    """Each image's training crop in a pass comes from a seed of its own, which follows from the data-order
    generator: the same crops with or without loader workers and over any number of processes, the next pass's crops
    again from a generator put back (--resume), and none of the run's global random numbers drawn. With crops drawn
    by whichever worker read the image, from that worker's own stream, they depended on all of these."""
    def passes(generator, n=2, workers=0, world=(0, 1)):
        monkeypatch.setenv("RFT_WORKERS", str(workers))
        monkeypatch.setattr(data, "rank_and_world", lambda: world)
        split = data.file_split(list(range(24)), list(range(24)), data.preprocessing(BACKBONE), train=True,
                                read=noise_picture)
        out = []
        for _ in range(n):
            batches = list(split.batches(8, shuffle=True, drop_last=True, generator=generator))
            out.append((torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])))
        return out

    global_state = torch.get_rng_state()
    (x1, y1), (x2, y2) = passes(torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert y1.tolist() == torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist()  # the order as before
    assert not torch.equal(x1[y1.argsort()], x2[y2.argsort()])  # each image cropped anew at each pass

    for (x, y), (xw, yw) in zip([(x1, y1), (x2, y2)], passes(torch.Generator().manual_seed(0), workers=2)):
        assert torch.equal(y, yw) and torch.equal(x, xw)  # read by 2 loader workers
    shares = [passes(torch.Generator().manual_seed(0), n=1, world=(rank, 2))[0] for rank in (0, 1)]
    x_ranks = torch.cat([torch.cat([a, b]) for a, b in zip(shares[0][0].split(4), shares[1][0].split(4))])
    assert torch.equal(x_ranks, x1)  # 2 processes' shares of each batch of 8 (4 each), put together

    g = torch.Generator().manual_seed(0)
    torch.randperm(24, generator=g)  # where the first pass leaves it, as resume.pt holds it
    torch.manual_seed(12345)  # another global state, as in a new process
    (xr, yr), = passes(g, n=1, workers=2)
    assert torch.equal(yr, y2) and torch.equal(xr, x2)


@pytest.mark.parametrize("name", PARAMS)
def test_every_dataset_augments_its_id_training_split_only(minis, name):
    """Each loader gives ID train the random training transform (a random crop at every read; none for CIFAR-10)
    and every evaluation split the fixed one; a loader passing train=False for ID train trained without
    augmentation, silently (only the held-out path was checked). Applied here to a noise picture, where every crop
    differs."""
    ds = minis.load(name)
    picture = noise_picture(0)

    def two_reads(split):
        reads = []
        with torch.random.fork_rng():  # the global generator, as a loader's transform draws from it, left as it was
            for seed in (0, 1):
                torch.manual_seed(seed)
                reads.append(split.transform(picture))
        return reads

    if name == "cifar10":  # the LP-FT code trains on CIFAR-10's images resized whole, not augmented (data.SQUASHED)
        assert torch.equal(*two_reads(ds.train)) and data.SQUASHED["cifar10"] == dict(squash=1.0, flip=False)
    else:
        assert not torch.equal(*two_reads(ds.train)), f"{name}: ID train is not augmented"
    for key, split in common.eval_splits(ds).items():
        assert torch.equal(*two_reads(split)), f"{name}: {key} is augmented"


def test_a_missing_reference_file_says_the_folder_travels_with_data_py(tmp_path, monkeypatch):
    """An engineer who copies data.py alone into another project gets one line, not a traceback."""
    monkeypatch.setattr(data, "REFERENCE", tmp_path / "reference")
    with pytest.raises(SystemExit, match="copy that folder along with data.py") as e:
        data.reference("imagenet_classes")
    assert str(tmp_path / "reference" / "imagenet_classes.json") in str(e.value)


def test_a_dropped_split_stops_its_worker_processes_at_once(minis, monkeypatch):
    """A split and its loaders go with their last reference, not with the garbage collector, from which each of the
    loader's persistent workers is waited on for 5 s and then killed."""
    monkeypatch.setenv("RFT_WORKERS", "2")
    before = set(multiprocessing.active_children())
    ds = minis.load("cifar10")
    split = ds.train.subset(range(len(ds.train)))  # a fresh split: its own loaders
    batches = split.batches(2)
    next(batches)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    gc.disable()  # what is freed now is freed by reference counting alone
    try:
        del split, batches
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------------------------
# Missing data root, missing dataset folder
# ---------------------------------------------------------------------------------------------------------------
def test_no_data_root_is_an_error():
    with pytest.raises(SystemExit) as e:
        data.load_dataset("cifar10", backbone=BACKBONE)
    assert "--data-root" in str(e.value) and "RFT_DATA" in str(e.value) and DOCS in str(e.value)


def test_a_tilde_in_the_data_root_is_the_home_folder(minis, monkeypatch):
    """`--data-root=~/data` reaches Python with its ~ (bash expands it only at the start of a word)."""
    root, truth = minis.build("sst2")
    monkeypatch.setenv("HOME", str(root.parent))
    ds = data.load_dataset("sst2", data_root=f"~/{root.name}", backbone=BACKBONE)
    assert labelled(ds.test, root) == truth["test"] and ds.info["root"] == str(root.resolve())


def test_data_root_given_wins_over_rft_data(minis, tmp_path, monkeypatch):
    """RFT_DATA is the default for runs that pass no --data-root; one that does means that folder."""
    root, truth = minis.build("sst2")
    monkeypatch.setenv("RFT_DATA", str(tmp_path / "elsewhere"))
    ds = data.load_dataset("sst2", data_root=str(root), backbone=BACKBONE)
    assert labelled(ds.test, root) == truth["test"]


@pytest.mark.parametrize("name", PARAMS)
def test_missing_data_root_is_an_error_naming_it(tmp_path, name):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(nowhere), backbone=BACKBONE)
    check_error(e, nowhere)


FOLDERS = {"living17": "imagenet", "entity30": "imagenet", "cifar10": "cifar-10-batches-py", "imagenet": "imagenet",
           "domainnet": "domainnet", "fmow": "fmow_v1.1", "iwildcam": "iwildcam_v2.0", "pcam": "pcam",
           "sst2": "rendered-sst2", "folder": "train"}


@pytest.mark.parametrize("name", PARAMS)
def test_missing_dataset_folder_is_an_error_naming_it(tmp_path, name):
    (tmp_path / "something_else").mkdir()  # the data root exists, the dataset's folder does not
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, tmp_path / FOLDERS[name])


@pytest.mark.parametrize("name", PARAMS)
def test_data_root_one_level_too_deep_names_the_parent(minis, name):
    """--data-root DIR/imagenet for DIR (for folder: mydata/train for mydata): the error says which one was meant."""
    root, _ = minis.build(name)
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(root / FOLDERS[name]), backbone=BACKBONE)
    check_error(e, root / FOLDERS[name] / FOLDERS[name], f"did you mean the parent folder {root}?")


@pytest.mark.parametrize("missing", ["stl10_binary/test_X.bin", "cifar10.1/cifar10.1_v6_labels.npy",
                                     "cifar-10-batches-py/data_batch_3"])
def test_cifar10_missing_file_is_an_error_naming_it(tmp_path, missing):
    mini.make_cifar10(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("cifar10", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, Path(missing).name)


@pytest.mark.parametrize("folder,found,said", [
    ("cifar10.1", "CIFAR-10.1", "there: rename it to cifar10.1"),
    ("cifar10.1", "CIFAR-10.1/datasets",  # a clone of the CIFAR-10.1 repository
     "there: move or link {root}/CIFAR-10.1/datasets to {root}/cifar10.1"),
    ("stl10_binary", "stl10_binary.tar.gz", "there: unpack it to stl10_binary")])
def test_cifar10_ood_folder_under_another_name_or_still_packed_is_named(tmp_path, folder, found, said):
    mini.make_cifar10(tmp_path)
    if found.endswith(".tar.gz"):
        shutil.rmtree(tmp_path / folder)
        (tmp_path / found).touch()
    else:
        (tmp_path / found).parent.mkdir(exist_ok=True)
        (tmp_path / folder).rename(tmp_path / found)
    with pytest.raises(SystemExit) as e:
        data.load_dataset("cifar10", data_root=str(tmp_path), backbone=BACKBONE)
    inner = "/cifar10.1_v6_data.npy" if found.endswith("datasets") else ""
    check_error(e, f"found {tmp_path / found}{inner} {said.format(root=tmp_path)}")


@pytest.mark.parametrize("under", ["imagenet", "."])
def test_imagenet_in_kaggles_layout_is_named_with_the_link_to_make(tmp_path, under):
    """Kaggle's ImageNet unpacks as ILSVRC/Data/CLS-LOC/{train,val}: the error says where it is and the link that
    puts it where the loader reads, and with that link the training images load."""
    mini.make_imagenet(tmp_path / "m")
    kaggle = tmp_path / under / "ILSVRC" / "Data" / "CLS-LOC"
    kaggle.mkdir(parents=True)
    (tmp_path / "m" / "imagenet" / "train").rename(kaggle / "train")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE)
    folder = tmp_path / "imagenet" / "train"
    check_error(e, f"{folder} not found; found Kaggle's layout, {kaggle / 'train'}: link it there "
                   f"(mkdir -p {folder.parent} && ln -s {kaggle / 'train'} {folder})")
    folder.parent.mkdir(exist_ok=True)  # what the error says to do
    folder.symlink_to(kaggle / "train")
    (tmp_path / "m" / "imagenet" / "val").rename(tmp_path / "imagenet" / "val")
    assert len(data.load_dataset("imagenet", data_root=str(tmp_path), backbone=BACKBONE).train) > 0


@pytest.mark.parametrize("inside", [False, True])
def test_an_ood_folder_under_another_tools_name_or_unpacked_inside_one_is_named(tmp_path, inside):
    """ImageNet-Sketch's archive unpacked as ImageNet-Sketch/<wnid>/ wants a rename; unpacked into a folder of that
    name, ImageNet-Sketch/sketch/<wnid>/, the hint names the inner folder (the rename gave sketch/sketch/<wnid>)."""
    found = tmp_path / "ImageNet-Sketch" / ("sketch" if inside else "")
    (found / "n01440764").mkdir(parents=True)
    hint = data.missing_hint(tmp_path / "sketch")
    assert hint == (f"; found {found} there: move or link it to {tmp_path / 'sketch'}" if inside else
                    f"; found {found} there: rename it to sketch")


@pytest.mark.parametrize("damage,said", [("truncated", "pickle data was truncated"),
                                         ("not a pickle", "UnpicklingError"), ("another pickle", "KeyError: 'data'")])
def test_cifar10_damaged_batch_is_an_error_naming_it(tmp_path, damage, said):
    mini.make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes({"truncated": path.read_bytes()[:1000], "not a pickle": b"<html>503</html>",
                      "another pickle": mini._py2_pickle({"batch_label": "x", "labels": [1, 2]})}[damage])
    with pytest.raises(SystemExit) as e:
        data.load_dataset("cifar10", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path} is no CIFAR-10 python batch", said, "cifar-10-python.tar.gz")


@pytest.mark.parametrize("file,damage,said", [
    ("stl10_binary/test_X.bin", "truncated", "STL-10 binary image file"),
    ("cifar10.1/cifar10.1_v6_data.npy", "truncated", "CIFAR-10.1 image array"),
    ("cifar10.1/cifar10.1_v6_data.npy", "float", "not uint8 N x 32 x 32 x 3"),
    ("stl10_binary/test_X.bin", "empty", "STL-10 binary image file (3 x 96 x 96 bytes an image) (ValueError: empty"),
    ("cifar10.1/cifar10.1_v6_labels.npy", "a web page", "CIFAR-10.1 label array")])
def test_cifar10_damaged_ood_files_are_an_error_naming_them(tmp_path, file, damage, said):
    """A truncated download, or the web page of a file saved under its name: was a reshape or np.load traceback."""
    mini.make_cifar10(tmp_path)
    path = tmp_path / file
    if damage == "float":
        np.save(path, np.load(path).astype(np.float32))
    elif damage == "empty":  # 0 images: was blamed on the label file, as 20 labels for 0 images
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:1000] if damage == "truncated" else b"<!DOCTYPE html><html>...</html>")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("cifar10", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path} is no ", said, "download")


@pytest.mark.parametrize("file", ["stl10_binary/test_y.bin", "cifar10.1/cifar10.1_v6_labels.npy",
                                  "cifar-10-batches-py/data_batch_2"])
@pytest.mark.parametrize("damage", ["out of range", "one short"])
def test_cifar10_label_arrays_out_of_range_or_short_are_an_error_naming_them(tmp_path, file, damage):
    """An STL label 0 mapped to 'truck' through index -1, silently; 11 or a short file failed later, or not at all."""
    import pickle

    mini.make_cifar10(tmp_path)
    path = tmp_path / file
    if path.suffix == ".bin":
        y = np.fromfile(path, dtype=np.uint8)
        (y[:-1] if damage == "one short" else np.concatenate([[0], y[1:]]).astype(np.uint8)).tofile(path)
    elif path.suffix == ".npy":
        y = np.load(path)
        np.save(path, y[:-1] if damage == "one short" else np.concatenate([[10], y[1:]]).astype(y.dtype))
    else:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        d["labels"] = d["labels"][:-1] if damage == "one short" else [10] + d["labels"][1:]
        path.write_bytes(mini._py2_pickle(d))
    with pytest.raises(SystemExit) as e:
        data.load_dataset("cifar10", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path}: ", "expected one per image, each in", " again")


@needs_h5py
def test_pcam_missing_file_is_an_error_naming_it(tmp_path):
    mini.make_pcam(tmp_path)
    (tmp_path / "pcam" / "camelyonpatch_level_2_split_valid_y.h5").unlink()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("pcam", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, tmp_path / "pcam")
    check_error(e, "camelyonpatch_level_2_split_valid_y.h5")
    assert "download=True" not in str(e.value)


@needs_h5py
def test_pcam_as_downloaded_gzipped_says_to_unzip(tmp_path):
    import gzip

    mini.make_pcam(tmp_path)
    for f in (tmp_path / "pcam").glob("*.h5"):
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("pcam", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, "6 of PatchCamelyon's HDF5 files missing", f"6 lie there gzipped, as downloaded: gunzip {tmp_path}")


@needs_h5py
@pytest.mark.parametrize("file,damage", [("test_y", "truncated"), ("valid_x", "truncated"), ("train_x", "short"),
                                         ("test_y", "out of range")])
def test_pcam_damaged_file_is_an_error_naming_it(tmp_path, file, damage):
    import h5py

    mini.make_pcam(tmp_path)
    path = tmp_path / "pcam" / f"camelyonpatch_level_2_split_{file}.h5"
    key = file[-1]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
        said = f"{path} is no PatchCamelyon HDF5 file"
    else:  # one image fewer than labels; or a label 7 of two classes (was loaded, and scored)
        with h5py.File(path, "r") as f:
            a = np.asarray(f[key])
        with h5py.File(path, "w") as f:
            f[key] = a[:-1] if damage == "short" else np.concatenate([a[:1] * 0 + 7, a[1:]])
        y = path.with_name(path.name.replace("_x.h5", "_y.h5"))
        said = (f"{y}: {len(a)} labels (0..1) for {len(a) - 1} images in {path}" if damage == "short" else
                f"{path}: {len(a)} labels (0..7) for {len(a)} images in {path.with_name(path.name.replace('_y', '_x'))}")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("pcam", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, said, "download")


@needs_h5py
def test_pcam_without_h5py_says_how_to_install_it(tmp_path, monkeypatch):
    mini.make_pcam(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        data.load_dataset("pcam", data_root=str(tmp_path), backbone=BACKBONE)
    assert "pip install h5py" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Damaged, cut-short or misplaced files (what an audit of real users' mistakes found stopping nothing)
# ---------------------------------------------------------------------------------------------------------------
def read_all(name, root):
    """Load dataset `name` and read every image of every split: some damage only shows when a file is read."""
    ds = data.load_dataset(name, data_root=str(root), backbone=BACKBONE)
    for split in (ds.train, ds.val, ds.test, *ds.ood.values()):
        for _ in split.batches(64):
            pass
    return ds


def test_an_empty_class_folder_is_an_error_naming_it_not_a_class_silently_dropped(tmp_path):
    """An unpacking cut short leaves a class folder empty: Rendered SST2 trained on one class of two, Living-17 on
    fewer images of a class (or none), without a word. Where the class's archive still lies beside it, say so."""
    mini.make_sst2(tmp_path / "sst2")
    for p in (tmp_path / "sst2" / "rendered-sst2" / "train" / "positive").iterdir():
        p.unlink()
    with pytest.raises(SystemExit) as e:
        data.load_dataset("sst2", data_root=str(tmp_path / "sst2"), backbone=BACKBONE)
    check_error(e, f"1 of 2 class folders under {tmp_path / 'sst2' / 'rendered-sst2' / 'train'} hold no images (e.g. "
                   "positive;", "restore them from the download")
    mini.make_breeds(tmp_path / "breeds", names=("living17",))
    wnid = json.loads((data.REFERENCE / "breeds_rand_splits.json").read_text())["living17"][0]["source"][0][1]
    train = tmp_path / "breeds" / "imagenet" / "train"
    for p in (train / wnid).iterdir():
        p.unlink()
    (train / f"{wnid}.tar").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("living17", data_root=str(tmp_path / "breeds"), backbone=BACKBONE)
    check_error(e, f"class folders under {train} hold no images (e.g. {wnid};", f"{wnid}.tar is still beside its folder")


@pytest.mark.parametrize("name,file", [("fmow", "fmow_v1.1/country_code_mapping.csv"),
                                       ("fmow", "fmow_v1.1/rgb_metadata.csv"), ("iwildcam", "iwildcam_v2.0/metadata.csv")])
@pytest.mark.parametrize("damage", ["cut short", "extra field"])
def test_a_csv_row_cut_short_or_with_an_extra_field_is_an_error_naming_its_line(tmp_path, name, file, damage):
    """A download cut short mid-row: a truncated country mapping filed most OOD images under region 'Other' (which
    the worst-region metric leaves out), silently; a row cut in iWildCam's category_id was a TypeError. A stray
    comma shifts the fields of its row."""
    getattr(mini, f"make_{name}")(tmp_path)
    path = tmp_path / file
    lines = path.read_text().splitlines(True)
    k = len(lines) // 2
    cut = ",".join(lines[k].rstrip("\r\n").split(",")[:-2]) if damage == "cut short" else lines[k].rstrip("\r\n") + ",x"
    path.write_text("".join(lines[:k]) + cut + ("" if damage == "cut short" else "\n" + "".join(lines[k + 1:])))
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(tmp_path), backbone=BACKBONE)
    header = len(lines[0].split(","))
    fields = header - 2 if damage == "cut short" else header + 1
    check_error(e, f"{path} line {k + 1} has {fields} fields, the header {header}", "download it again")


def test_csv_rows_keep_only_the_columns_a_loader_reads(tmp_path):
    """FMoW's rgb_metadata.csv has 524k rows, each with a map projection of ~400 characters the loader never reads:
    kept, 0.8 GB in every process of a torchrun job (measured on a synthetic file of that size: 0.22 GB kept)."""
    mini.make_fmow(tmp_path)
    path = tmp_path / "fmow_v1.1" / "rgb_metadata.csv"
    rows = data.read_csv("fmow", path, ["split", "timestamp"])
    assert len(path.read_text().splitlines()[0].split(",")) > 2 and rows and all(list(r) == ["split", "timestamp"]
                                                                                  for r in rows)


@pytest.mark.parametrize("name,file", [("fmow", "fmow_v1.1/rgb_metadata.csv"),
                                       ("domainnet", "domainnet/SENTRY_splits/sketch_train_mini.txt")])
def test_a_text_file_still_gzipped_is_an_error_naming_it(tmp_path, name, file):
    """Was a raw UnicodeDecodeError, no file named."""
    import gzip

    getattr(mini, f"make_{name}")(tmp_path)
    path = tmp_path / file
    path.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(SystemExit) as e:
        data.load_dataset(name, data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"{path} is not UTF-8 text", "still compressed")


def test_text_files_saved_with_a_byte_order_mark_are_read_and_utf16_is_named(tmp_path):
    """A spreadsheet's or Notepad's UTF-8 byte-order mark: FMoW said its CSV 'lacks the column(s) split (it has:
    split, ...)', and the mark stayed in the first template. UTF-16 was a raw UnicodeDecodeError."""
    mini.make_fmow(tmp_path)
    csv_path = tmp_path / "fmow_v1.1" / "rgb_metadata.csv"
    plain = data.load_dataset("fmow", data_root=str(tmp_path), backbone=BACKBONE)
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    marked = data.load_dataset("fmow", data_root=str(tmp_path), backbone=BACKBONE)
    assert marked.train.items == plain.train.items and torch.equal(marked.test.labels, plain.test.labels)
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=())
    (root / "templates.txt").write_text("a photo of a {}.\nart of a {}.\n", encoding="utf-8-sig")
    assert data.load_dataset("folder", data_root=str(root), backbone=BACKBONE).templates == ["a photo of a {}.",
                                                                                              "art of a {}."]
    (root / "templates.txt").write_text("a photo of a {}.\n", encoding="utf-16")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, f"{root / 'templates.txt'} is not UTF-8 text", "UTF-16")


@pytest.mark.parametrize("renamed,meant", [("valid", "val"), ("validation", "val"), ("Test", "test")])
def test_folder_val_or_test_under_another_name_is_not_silently_an_ood_set(tmp_path, renamed, meant):
    """mydata/valid/ was scored as an OOD test set named 'valid' while ID val was held out of train, silently."""
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=())
    (root / meant).rename(root / renamed)
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, f"{root / renamed} would be scored as an OOD test set named {renamed!r}: rename it to {meant}/")


def test_folder_ood_set_named_avg_is_refused(tmp_path):
    """mydata/avg/ was scored as acc/ood_avg, then overwritten by the average over the OOD sets: its own accuracy was
    lost, silently, and the table had no column for it."""
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=(("avg", mini.FOLDER_CLASSES),))
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, f"{root / 'avg'}: an OOD test set cannot be named 'avg'", "rename the folder")


def test_folder_ood_folder_without_class_folders_says_every_other_folder_is_an_ood_set(tmp_path):
    root = tmp_path / "mydata"
    mini.make_folder(root, ood=())
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("label more")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("folder", data_root=str(root), backbone=BACKBONE)
    check_error(e, f"{root / 'notes'} holds no class folders", f"every other sub-folder of {root} is an OOD test set")


@needs_h5py
def test_pcam_damaged_image_chunk_stops_the_run_naming_the_file(tmp_path):
    """A damaged compressed chunk inside x.h5 (not a truncation, which loading finds): was a raw h5py OSError."""
    mini.make_pcam(tmp_path)
    path = tmp_path / "pcam" / "camelyonpatch_level_2_split_test_x.h5"
    b = bytearray(path.read_bytes())
    b[len(b) // 2:len(b) // 2 + 3000] = bytes(3000)
    path.write_bytes(bytes(b))
    with pytest.raises(SystemExit) as e:
        read_all("pcam", tmp_path)
    assert str(e.value).startswith(f"error: cannot read image file {path} (image ") and "download it again" in str(e.value)


def test_an_unreadable_listed_image_is_to_be_restored_not_deleted(tmp_path):
    """DomainNet's list names the image: deleting it, as the message advised, makes the loader refuse the list."""
    mini.make_domainnet(tmp_path)
    rel = (tmp_path / "domainnet" / "SENTRY_splits" / "real_test_mini.txt").read_text().split()[0]
    (tmp_path / "domainnet" / rel).write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        read_all("domainnet", tmp_path)
    assert f"{tmp_path / 'domainnet' / rel}" in str(e.value) and "restore it from the download" in str(e.value)


def test_a_folder_one_level_down_is_named(tmp_path):
    """rendered-sst2/rendered-sst2/, imagenet/val/val/ (an archive unpacked into a folder of its own name), a data
    root one level too high, a DomainNet domain still zipped: each named, where before only what was missing was."""
    mini.make_sst2(tmp_path / "x")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("sst2", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"found {tmp_path / 'x' / 'rendered-sst2' / 'train'} one level down: pass {tmp_path / 'x'} if that is "
                   "your data root")
    (tmp_path / "rendered-sst2").mkdir()
    (tmp_path / "x" / "rendered-sst2").rename(tmp_path / "rendered-sst2" / "rendered-sst2")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("sst2", data_root=str(tmp_path), backbone=BACKBONE)
    check_error(e, f"found it one level deeper, in {tmp_path / 'rendered-sst2' / 'rendered-sst2'}: move that "
                   f"folder's contents up into {tmp_path / 'rendered-sst2'}")
    mini.make_breeds(tmp_path / "breeds", names=("living17",))
    val = tmp_path / "breeds" / "imagenet" / "val"
    val.rename(tmp_path / "val")
    val.mkdir()
    (tmp_path / "val").rename(val / "val")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("living17", data_root=str(tmp_path / "breeds"), backbone=BACKBONE)
    check_error(e, f"class folders missing under {val}", f"found it one level deeper, in {val / 'val'}")
    mini.make_domainnet(tmp_path / "dn")
    shutil.make_archive(str(tmp_path / "dn" / "domainnet" / "painting"), "zip", tmp_path / "dn" / "domainnet" / "painting")
    shutil.rmtree(tmp_path / "dn" / "domainnet" / "painting")
    with pytest.raises(SystemExit) as e:
        data.load_dataset("domainnet", data_root=str(tmp_path / "dn"), backbone=BACKBONE)
    check_error(e, "painting_test_mini.txt missing", f"found {tmp_path / 'dn' / 'domainnet' / 'painting.zip'} there: "
                                                     "unpack it to painting")


# ---------------------------------------------------------------------------------------------------------------
# End to end: one method script per dataset family on the miniatures (seconds each)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_backbone(monkeypatch):
    backbone = common.load_backbone(BACKBONE)
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: backbone)
    return backbone


def run_method(module_name, dataset, root, out, *extra):
    module = __import__(module_name)
    argv = ["--dataset", dataset, "--data-root", str(root), "--backbone", BACKBONE, "--device", "cpu",
            "--out", str(out), *extra]
    module.main(common.parse_args(module.Args, argv))
    done = json.loads((Path(out) / "done").read_text())
    lines = read_results(Path(out))
    assert lines and all(r["args"]["dataset"] == dataset for r in lines)
    sizes = lines[0]["data"]["sizes"]  # what the run was trained and scored on, recorded with every line
    scored = {k[4:] for k in done["metrics"] if k.startswith("acc/") and k != "acc/ood_avg"}
    assert set(sizes) == {"id_train"} | scored and all(n > 0 for n in sizes.values()), (sizes, scored)
    return done["metrics"]


@pytest.mark.parametrize("module_name,name,extra,keys", [
    ("lpft", "living17", ["--epochs", "1", "--batch-size", "8", "--num-c", "2", "--max-iter", "10"],
     ["acc/ood_target"]),
    ("lpft", "cifar10", ["--epochs", "1", "--batch-size", "8", "--num-c", "2", "--max-iter", "10"],
     ["acc/ood_stl10", "acc/ood_cifar10.1"]),
    ("ft", "folder", ["--epochs", "1", "--batch-size", "8"], ["acc/ood_sketches", "acc/ood_night"]),
    ("flyp", "fmow", ["--epochs", "1", "--batch-size", "4", "--warmup", "1"],
     ["worst_region_acc/ood_test", "worst_region_acc/ood_avg"]),
    ("flyp", "iwildcam", ["--epochs", "1", "--batch-size", "8", "--warmup", "1"],
     ["macro_f1/ood_test", "macro_f1/id_test"]),
    ("flyp_fewshot", "sst2", ["--shots", "2", "--draws", "1", "--steps", "2"], []),
    ("lpft", "entity30", ["--epochs", "1", "--batch-size", "8", "--num-c", "2", "--max-iter", "10"],
     ["acc/ood_target"]),
    ("lpft", "domainnet", ["--epochs", "1", "--batch-size", "8", "--num-c", "2", "--max-iter", "10"],
     ["acc/ood_real", "acc/ood_painting", "acc/ood_clipart"]),
    ("flyp", "imagenet", ["--epochs", "1", "--batch-size", "8", "--warmup", "1"],
     ["acc/ood_v2", "acc/ood_r", "acc/ood_sketch", "acc/ood_a"]),
    ("flyp_fewshot", "pcam", ["--shots", "2", "--draws", "1", "--steps", "2"], []),
])
def test_method_end_to_end_on_a_miniature(minis, tiny_backbone, tmp_path, module_name, name, extra, keys):
    root, _ = minis.build(name)
    metrics = run_method(module_name, name, root, tmp_path / "out", *extra)
    for key in ["acc/id_val", "acc/id_test", *keys]:
        assert key in metrics and math.isfinite(metrics[key]), (key, sorted(metrics))


def test_a_run_on_real_data_gives_the_same_results_whether_its_features_were_cached_or_not(minis, tiny_backbone,
                                                                                           tmp_path, monkeypatch):
    """Extracting features draws random numbers (the ID training split's augmented view, the loader's seeds); they
    come from a state of their own, seeded by the cache key, so a run that extracts and one that reads the cache
    train alike, and LP-FT's ID training features are the same whether lp.py cached them first or not."""
    root, _ = minis.build("folder")
    args = ["--epochs", "1", "--batch-size", "8", "--num-c", "2", "--max-iter", "10"]
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: copy.deepcopy(tiny_backbone))  # trained in place

    def lpft(out):
        run_method("lpft", "folder", root, out, *args)
        return [(r.get("train_loss"), r["metrics"]) for r in read_results(out)]

    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cold"))
    cold = lpft(tmp_path / "1")
    assert lpft(tmp_path / "2") == cold  # the same cache, now holding every split's features
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "after-lp"))
    run_method("lp", "folder", root, tmp_path / "lp", "--num-c", "2", "--max-iter", "10")
    assert lpft(tmp_path / "3") == cold


def test_wiseft_reads_the_pretrained_features_its_fine_tuning_run_cached_and_scores_alike(minis, tiny_backbone,
                                                                                          tmp_path, monkeypatch):
    """The pretrained features of the evaluation splits, the origin of feature distortion, are the same for every
    method on a backbone and dataset: WiSE-FT reads those its fine-tuning run cached (on ImageNet, one pass over 3M
    images of its 12) and its results equal those of a run that extracted them, also with its encoder compiled (the
    reference comes from the eager encoder, as in every script: a compiled one's would differ in the last digits)."""
    root, _ = minis.build("folder")
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: copy.deepcopy(tiny_backbone))  # trained in place
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    run_method("ft", "folder", root, tmp_path / "ft", "--epochs", "1", "--batch-size", "8", "--save")
    read, extract = [], common.extract_features

    def spy(encoder, split, device, precision="auto", batch_size=500, cache=None, desc=None):
        if cache and (common.cache_dir() / "features" / f"{cache}.pt").is_file():
            read.append(desc)
        return extract(encoder, split, device, precision, batch_size, cache, desc)

    monkeypatch.setattr(common, "extract_features", spy)
    checkpoint = ["--checkpoint", str(tmp_path / "ft" / "model.pt"), "--alpha-step", "0.5", "--compile", "on"]
    run_method("wiseft", "folder", root, tmp_path / "cached", *checkpoint)
    assert read == ["features id_val", "features id_test", "features ood_night", "features ood_sketches"]
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "empty"))
    run_method("wiseft", "folder", root, tmp_path / "extracted", *checkpoint)
    cached, extracted = ([(r["alpha"], r["metrics"]) for r in read_results(tmp_path / run)]
                         for run in ("cached", "extracted"))
    assert cached == extracted and [alpha for alpha, _ in cached] == [0.0, 0.5, 1.0]


def test_a_run_on_image_files_resumes_to_the_crops_of_the_run_that_never_stopped(minis, tiny_backbone, tmp_path,
                                                                                  monkeypatch):
    """Stopped in its last epoch and resumed, an FT run reading image files through loader workers ends bit for bit as
    the run that never stopped: the resumed epoch crops each image as that run did (the workers, started anew, drew
    other crops when the crops came from their own random streams)."""
    root, _ = minis.build("folder")
    monkeypatch.setenv("RFT_WORKERS", "2")
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: copy.deepcopy(tiny_backbone))  # trained in place
    args = ["--epochs", "3", "--batch-size", "8", "--save"]
    run_method("ft", "folder", root, tmp_path / "whole", *args)
    with monkeypatch.context() as m:
        interrupt_at(m, "epoch 3/3")
        with pytest.raises(Interrupted):
            run_method("ft", "folder", root, tmp_path / "stopped", *args)
    torch.manual_seed(12345)  # as in a new process: other global random states
    run_method("ft", "folder", root, tmp_path / "stopped", *args, "--resume")
    lines, model = what_was_computed(tmp_path / "stopped")
    whole_lines, whole_model = what_was_computed(tmp_path / "whole")
    assert lines == whole_lines and [r["step"] for r in lines][-4:] == [1, 2, 3, lines[-1]["step"]]
    assert all(torch.equal(model[k], whole_model[k]) for k in whole_model)


@pytest.mark.parametrize("module_name", ["ft", "lpft", "l2sp", "flyp"])
def test_a_batch_the_training_split_cannot_fill_stops_the_run_before_the_backbone_loads(minis, tmp_path, monkeypatch,
                                                                                      module_name):
    """Said at once, not after LP-FT's whole first stage (or an epoch of anything)."""
    root, truth = minis.build("folder")
    n = len(truth["train"])
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded first"))
    with pytest.raises(SystemExit, match=f"{n} training images, fewer than one batch of {n + 1}: pass --batch-size {n}"):
        run_method(module_name, "folder", root, tmp_path / "out", "--epochs", "1", "--batch-size", str(n + 1))


def write_noise_jpegs(folder, n, grey_at=(), formats=None):
    """n noise pictures of different sizes named .jpg: JPEG, greyscale at each index of `grey_at`, and in another
    format where `formats` says so (index -> "PNG", "BMP": ImageNet has a PNG named .JPEG). Returns their paths."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((36 + 3 * i, 34 + 2 * i))
        img = img.convert("L") if i in grey_at else img
        img.save(folder / f"{i}.jpg", format=(formats or {}).get(i, "JPEG"), quality=95)
        paths.append(str(folder / f"{i}.jpg"))
    return paths


@pytest.mark.parametrize("backbone", [BACKBONE, "clip-vit-b16"])  # bilinear 32 px; CLIP's bicubic 224 px
def test_decoding_on_the_device_matches_the_worker_path(tmp_path, monkeypatch, backbone):
    """RFT_GPU_DECODE=1: workers read bytes, batches are decoded and cropped where they go (here the CPU, on a GPU
    nvJPEG); the images equal the PIL path's within two grey levels (two resamplers), including a greyscale JPEG
    and a PNG and a BMP named .jpg (ImageNet has a PNG), which fall back to the PIL path per image, with a warning.
    Training crops too: each image's random draws come from its own seed, whichever path decodes it."""
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            write_noise_jpegs(tmp_path / split / c, 6, grey_at=(0,), formats={1: "PNG", 2: "BMP"})
    pil = data.load_dataset("folder", data_root=str(tmp_path), backbone=backbone)
    monkeypatch.setenv("RFT_GPU_DECODE", "1")
    device = data.load_dataset("folder", data_root=str(tmp_path), backbone=backbone)
    assert device.test.decode_on_device and not pil.test.decode_on_device
    (x1, y1), = list(pil.test.batches(100))
    with pytest.warns(UserWarning, match="decoded on the CPU"):  # said, and counted: it costs speed on a GPU
        (x2, y2), = list(device.test.batches(100))
    assert device.test.cpu_decoded_files == 4 and pil.test.cpu_decoded_files == 0  # a PNG and a BMP per class
    grey_levels = (x1 - x2).abs() * torch.tensor(pil.test.std).view(1, 3, 1, 1) * 255
    assert torch.equal(y1, y2) and x2.shape == x1.shape and grey_levels.max() < 2.5 and grey_levels.mean() < 0.3
    def one_pass(split):
        return next(split.batches(len(split), shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)))

    x1, y1 = one_pass(pil.train)
    with pytest.warns(UserWarning, match="decoded on the CPU"):
        x2, y2 = one_pass(device.train)
    size = device.train.transform.transforms[0].size  # the training crop
    assert x2.shape == (len(device.train), 3, *size) and x2.dtype == torch.float32
    grey_levels = (x1 - x2).abs() * torch.tensor(pil.train.std).view(1, 3, 1, 1) * 255
    assert torch.equal(y1, y2) and grey_levels.max() < 2.5  # the same crops: each image's from its own seed


def test_miniature_command_writes_a_layout_the_loader_reads(tmp_path):
    """`python tests/miniatures.py NAME DIR` (docs/datasets.md) writes what `--data-root DIR` loads."""
    import subprocess

    script = ROOT / "tests" / "miniatures.py"
    proc = subprocess.run([sys.executable, str(script), "sst2", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "--dataset sst2" in proc.stdout, proc.stderr
    loaded = data.load_dataset("sst2", data_root=str(tmp_path), backbone=BACKBONE)
    assert len(loaded.train) and len(loaded.val) and len(loaded.test)
    proc = subprocess.run([sys.executable, str(script), "mnist", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "living17" in proc.stderr
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage" in proc.stdout and "living17" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing: the backbones' libraries' own, and no augmentation outside ID train
# ---------------------------------------------------------------------------------------------------------------
def read_once(split):
    """A split's normalised images, one pass in file order."""
    (x, _), = list(split.batches(len(split)))
    return x


def library_transform(backbone):
    """The evaluation preprocessing the backbone's own library applies (PIL image -> normalised float tensor)."""
    if backbone.startswith("clip"):
        size = open_clip.get_model_config(common.OPEN_CLIP_MODELS[backbone])["vision_cfg"]["image_size"]
        return open_clip.image_transform(size, is_train=False)  # OpenAI's mean and std unless told otherwise
    return torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()  # the LP-FT papers' ImageNet preprocessing


@pytest.mark.parametrize("backbone", ["clip-vit-b16", "clip-rn50", "resnet50", "moco-v2-rn50"])
def test_evaluation_preprocessing_is_the_backbone_librarys_own(tmp_path, backbone):
    """CLIP: open_clip's (bicubic resize to 224, centre crop 224, OpenAI's mean and std); ResNet-50s: torchvision's
    ImageNet weights' (bilinear resize to 256, centre crop 224, ImageNet's mean and std). Checked against the
    libraries' values, not data.py's, and image by image through a loaded split."""
    pre, reference = data.preprocessing(backbone), library_transform(backbone)
    if backbone.startswith("clip"):
        assert (pre.mean, pre.std) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        assert (pre.size, pre.resize, pre.interpolation) == (224, 224, "bicubic")
    else:
        assert (list(pre.mean), list(pre.std)) == (reference.mean, reference.std)
        ours = ([pre.size], [pre.resize], pre.interpolation)
        assert ours == (reference.crop_size, reference.resize_size, reference.interpolation.value)
        assert ours == ([224], [256], "bilinear")
    for k, c in enumerate(("cat", "dog")):
        for split in ("train", "test"):
            write_noise_pngs(tmp_path / split / c, [(37, 53), (61, 29)], seed=k)
    ds = data.load_dataset("folder", data_root=str(tmp_path), backbone=backbone)
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in ds.test.items])
    torch.testing.assert_close(read_once(ds.test), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", ["clip-vit-b16", "clip-rn50", "resnet50", "moco-v2-rn50"])
def test_training_augmentation_is_the_papers_recipe(backbone):
    """docs/datasets.md: CLIP (WiSE-FT, FLYP) trains on RandomResizedCrop(224, scale=(0.9, 1.0), bicubic), no
    flip; the ResNet-50s (LP-FT code) on torchvision's RandomResizedCrop(224) defaults (scale 0.08-1, bilinear) plus a
    horizontal flip. Each training image comes out at the evaluation's 224 px."""
    from torchvision.transforms import v2

    clip = backbone.startswith("clip")
    steps = data.transforms(data.preprocessing(backbone), train=True).transforms
    crop, default = steps[0], v2.RandomResizedCrop(224)
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (224, 224)
    assert crop.scale == ((0.9, 1.0) if clip else default.scale)
    assert crop.interpolation == v2.InterpolationMode("bicubic" if clip else default.interpolation)
    assert any(isinstance(s, v2.RandomHorizontalFlip) for s in steps) == (not clip)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (260, 300, 3), dtype=np.uint8))
    assert data.transforms(data.preprocessing(backbone), train=True)(picture).shape == (3, 224, 224)


@pytest.mark.parametrize("name, backbone", [("cifar10", "moco-v2-rn50"), ("domainnet", "clip-rn50")])
def test_cifar10_and_domainnet_images_are_resized_whole_as_in_the_lp_ft_code(tmp_path, name, backbone):
    """The LP-FT code's configs (docs/datasets.md) resize these images whole, with the backbone's interpolation and
    normalisation: to 224 x 224 for evaluation, no centre crop; CIFAR-10's to 224 x 224 for training too, no crop
    or flip; DomainNet's to 256 x 256, then a random 224 crop and a flip. Checked against torchvision's transforms
    of those configs, image by image through a loaded split, on images wider than tall (a crop cuts their sides)."""
    from torchvision import transforms as T

    truth = getattr(mini, f"make_{name}")(tmp_path)
    ds = data.load_dataset(name, data_root=str(tmp_path), backbone=backbone)
    pre = data.preprocessing(backbone)
    squashed = T.Compose([T.Resize([224, 224], interpolation=T.InterpolationMode(pre.interpolation)), T.ToTensor(),
                          T.Normalize(pre.mean, pre.std)])
    if name == "domainnet":  # the miniature's JPEGs are square: make the test set's 64 x 24
        for i, path in enumerate(ds.test.items):
            noise = np.random.default_rng(i).integers(0, 256, (24, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(path, quality=95)
    expected = torch.stack([squashed(ds.test.read(item).convert("RGB")) for item in ds.test.items])
    torch.testing.assert_close(read_once(ds.test), expected, rtol=0, atol=1e-5)
    assert truth and len(ds.test) > 1
    if name == "cifar10":  # training: the evaluation's pixels, at every read
        expected = torch.stack([squashed(ds.train.read(item)) for item in ds.train.items])
        torch.testing.assert_close(read_once(ds.train), expected, rtol=0, atol=1e-5)
    else:
        steps = [type(step).__name__ for step in ds.train.transform.transforms]
        assert steps == ["Resize", "RandomCrop", "RandomHorizontalFlip", "PILToTensor"]
        assert ds.train.transform.transforms[0].size == [256, 256] and read_once(ds.train).shape[-2:] == (224, 224)
    mini.make_folder(tmp_path / "f")  # another dataset: the backbone's own resize and centre crop
    other = data.load_dataset("folder", data_root=str(tmp_path / "f"), backbone=backbone)
    assert [type(step).__name__ for step in other.test.transform.transforms][:2] == ["Resize", "CenterCrop"]


def test_an_embedded_backbone_sees_a_file_normalised_as_its_pretraining_images(tmp_path):
    """Real data run with an embedded backbone is normalised with the embedded world's mean and std, the ones its
    pretraining corpus went through (data.normalize's defaults): the same 32 px picture from a file or from the world
    is the same input."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    split = data.file_split([tmp_path / "x.png"], [0], data.preprocessing(BACKBONE))
    (x, _), = list(split.batches(1))
    expected = data.normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_a_file_split_shuffles_with_each_pass_s_own_generator_and_drop_last():
    """Loaders are kept per way of iterating: a pass with another generator (another seed's run in the same process)
    shuffles from that generator, not the first one's, and an evaluation pass after a training pass of the same batch
    size keeps its partial last batch."""
    split = data.file_split(list(range(40)), list(range(40)), data.preprocessing(BACKBONE), train=True,
                            read=lambda i: Image.new("RGB", (8, 8)))
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        order = torch.cat([y for _, y in split.batches(8, shuffle=True, drop_last=True, generator=g)]).tolist()
        assert order == torch.randperm(40, generator=torch.Generator().manual_seed(seed)).tolist(), seed
    g = torch.Generator().manual_seed(0)
    assert [len(y) for _, y in split.batches(16, shuffle=True, drop_last=True, generator=g)] == [16, 16]
    assert [len(y) for _, y in split.batches(16, shuffle=True, drop_last=False, generator=g)] == [16, 16, 8]


def test_held_out_validation_and_test_images_are_not_augmented(tmp_path):
    """A folder without val/ and test/ holds both out of train/ (as BREEDS, ImageNet and DomainNet hold out val):
    they get the evaluation preprocessing, the same pixels at every read, so model selection compares like with
    like; only ID train is augmented (ResNet-50: a random resized crop and flip at every read)."""
    sizes = [(37, 53), (61, 29), (45, 71), (53, 37), (29, 61), (71, 45)]
    for k, c in enumerate(("cat", "dog")):
        write_noise_pngs(tmp_path / "train" / c, sizes, seed=k)
    ds = data.load_dataset("folder", data_root=str(tmp_path), backbone="resnet50")
    assert "held out" in ds.info["val"] and "held out" in ds.info["test"] and len(ds.val) == len(ds.test) == 2
    reference = library_transform("resnet50")
    for name, split in (("val", ds.val), ("test", ds.test)):
        first = read_once(split)
        assert torch.equal(first, read_once(split)), f"the held-out {name} images differ between reads: augmented"
        expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in split.items])
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-5, msg=f"{name}: not the evaluation preprocessing")
    assert not torch.equal(read_once(ds.train), read_once(ds.train))  # the check has teeth: train is augmented


def test_decoding_on_the_device_decodes_an_all_jpeg_split_there_as_rounded_clamped_rgb(tmp_path, monkeypatch):
    """Without a PNG in the batch, the device path itself decodes (no CPU fallback), a greyscale JPEG as 3 channels,
    and its pixels are the PIL path's within two grey levels, whole numbers in 0..255 as PIL's uint8 images (CLIP's
    bicubic resize overshoots on noise: unclamped values leave that range)."""
    paths = write_noise_jpegs(tmp_path, 6, grey_at=(2,))
    pre = data.preprocessing("clip-vit-b16")
    pil = data.file_split(paths, range(6), pre)
    monkeypatch.setenv("RFT_GPU_DECODE", "1")
    device = data.file_split(paths, range(6), pre)
    assert device.decode_on_device and not pil.decode_on_device
    (x1, _), = list(pil.batches(6))
    (x2, y2), = list(device.batches(6))
    assert device.cpu_decoded_files == 0 and y2.tolist() == list(range(6)) and x2.shape == x1.shape
    std, mean = torch.tensor(pre.std).view(1, 3, 1, 1), torch.tensor(pre.mean).view(1, 3, 1, 1)
    pixels = (x2 * std + mean) * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3 and pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert ((x1 - x2).abs() * std * 255).max() < 2.5


def test_the_cpu_fallback_of_decoding_on_the_device_decodes_only_the_refused_files_of_its_own_batch(
        tmp_path, monkeypatch):
    """A batch nvJPEG refuses is decoded file by file: on the device what it takes, on the CPU (by file index) only
    the file it refuses. The second batch (files 4-7, a PNG at 5) must hold files 4-7, not the split's first four,
    and one CPU decode, not four (ImageNet: one CMYK file would otherwise cost a whole batch of 512 CPU decodes)."""
    paths = write_noise_jpegs(tmp_path, 8, formats={5: "PNG"})
    pre = data.preprocessing(BACKBONE)
    pil = data.file_split(paths, range(8), pre)
    monkeypatch.setenv("RFT_GPU_DECODE", "1")
    device = data.file_split(paths, range(8), pre)
    on_cpu = []
    decode_one = device._decode_one
    monkeypatch.setattr(device, "_decode_one", lambda i: on_cpu.append(i) or decode_one(i))
    (_, _), (x1, _) = list(pil.batches(4))
    with pytest.warns(UserWarning, match="refused 1 of a batch's 4 files .*decoded on the CPU"):
        (_, _), (x2, y2) = list(device.batches(4))
    assert on_cpu == [5] and device.cpu_decoded_files == 1 and y2.tolist() == [4, 5, 6, 7]
    assert ((x1 - x2).abs() * torch.tensor(pre.std).view(1, 3, 1, 1) * 255).max() < 2.5


def test_a_device_decoder_that_refuses_every_file_of_the_first_batch_stops_the_run_with_the_way_out(
        tmp_path, monkeypatch):
    """nvJPEG that does not work at all (a library that fails to start) would refuse every batch: each decoded on
    the CPU in the main process, far slower than the workers' decoding the user turned off. The first batch, all
    refused, stops the run and says how to go on; once the decoder has worked, a batch of refused files (here two
    PNGs named .jpg) is decoded on the CPU and the run goes on."""
    import torchvision.io

    paths = write_noise_jpegs(tmp_path, 4, formats={2: "PNG", 3: "PNG"})
    pre = data.preprocessing(BACKBONE)
    monkeypatch.setenv("RFT_GPU_DECODE", "1")
    broken = data.file_split(paths, range(4), pre)

    def refuse(*a, **k):
        raise RuntimeError("nvjpeg failed to start")

    with monkeypatch.context() as m:
        m.setattr(torchvision.io, "decode_jpeg", refuse)
        with pytest.raises(SystemExit, match="refused all 2 files of the first batch .nvjpeg failed to start.*"
                                             "Unset RFT_GPU_DECODE"):
            list(broken.batches(2))
    working = data.file_split(paths, range(4), pre)
    with pytest.warns(UserWarning, match="refused 2 of a batch's 2 files"):
        (_, y1), (_, y2) = list(working.batches(2))
    assert working.cpu_decoded_files == 2 and y1.tolist() + y2.tolist() == [0, 1, 2, 3]


def test_a_file_split_loader_pins_memory_for_cuda_keeps_its_workers_and_one_loader_per_way_of_iterating(monkeypatch):
    """Batches headed for a GPU come from pinned memory (asynchronous copies); the training loader's worker processes
    persist between passes (no start-up at every epoch), an evaluation loader's do not (else every split kept a pool
    of idle workers: ~900 processes in a torchrun of 8 ranks); an evaluation pass after a shuffled pass of the same
    batch size is in order (a loader kept for shuffled passes must not serve it)."""
    monkeypatch.setenv("RFT_WORKERS", "2")
    split = data.file_split(list(range(40)), list(range(40)), data.preprocessing(BACKBONE),
                            read=lambda i: Image.new("RGB", (8, 8)))
    cuda = split._loader(8, torch.device("cuda"), False, False, None)
    cpu = split._loader(8, torch.device("cpu"), False, False, None)
    assert cuda.pin_memory and not cpu.pin_memory and cpu.num_workers == 2 and not cpu.persistent_workers
    assert split._loader(8, torch.device("cpu"), True, True, None).persistent_workers  # training
    assert split._loader(20, torch.device("cpu"), False, False, None).num_workers == 0  # two batches: no workers
    shuffled = torch.cat([y for _, y in split.batches(8, shuffle=True)]).tolist()
    assert sorted(shuffled) == list(range(40)) and shuffled != list(range(40))
    assert torch.cat([y for _, y in split.batches(8)]).tolist() == list(range(40))
    del cuda, cpu, split


def test_normalize_maps_uint8_pixels_through_the_mean_and_std_of_each_channel():
    """(x / 255 - mean) / std per channel, from the given constants: black and white land where the backbone's
    training put them."""
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.25, 0.125)
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = data.normalize(images, mean, std)
    assert out.dtype == torch.float32
    assert out[:, :, 0, 0].tolist() == [[-1.0, -1.0, -6.0], [1.0, 3.0, 2.0]]


def test_a_training_pass_over_a_file_split_drops_the_partial_last_batch():
    """drop_last reaches the loader: 40 images in batches of 16 are 2 full batches (a partial third would be a
    smaller batch, with a noisier gradient and, under DDP, unequal shares)."""
    split = data.file_split(list(range(40)), list(range(40)), data.preprocessing(BACKBONE), train=True,
                            read=lambda i: Image.new("RGB", (8, 8)))
    batches = split.batches(16, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 2 and [len(y) for _, y in batches] == [16, 16]
    assert [len(y) for _, y in split.batches(16)] == [16, 16, 8]


def test_normalize_makes_its_channel_constants_once_per_device_not_at_every_batch(monkeypatch):
    """On CUDA, torch.tensor(..., device='cuda') is a blocking copy: the host waits for every kernel queued on the
    stream. Made at every batch, the mean and std would stall the host behind the GPU's previous training step (and
    bench.py would count that wait as waiting for data); made once, batches cost no wait. Also once under
    inference mode (feature extraction) and then in training: the constants serve both."""
    made = []
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(k.get("device")) or tensor(*a, **k))
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with torch.inference_mode():
        first = data.normalize(images, mean, std)
    for _ in range(3):
        again = data.normalize(images, list(mean), std)
    assert len(made) <= 2, f"{len(made)} host-to-device constants for 4 batches"
    assert torch.equal(first, again)
    weight = torch.ones(1, requires_grad=True)
    (data.normalize(images, mean, std) * weight).sum().backward()  # usable where autograd records


def test_decoding_on_a_gpu_waits_for_the_queued_work_of_the_stream_first(monkeypatch):
    """torchvision's CUDA decode_jpeg writes its outputs from a private stream that does not wait for the caller's
    (pytorch/vision#9606): memory the previous step's queued kernels still read could be overwritten. The host
    drains the current stream before each batch is decoded on a GPU (emulated here: the calls are recorded)."""
    calls = []

    class Stream:
        def synchronize(self):
            calls.append("synchronize")

    def decode(files, mode, device):
        calls.append("decode")
        return [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in files]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    split = data.file_split(["a.jpg", "b.jpg"], [0, 1], data.preprocessing(BACKBONE))
    packed = (torch.zeros(6, dtype=torch.uint8), torch.tensor([3, 3]), torch.tensor([0, 1]), torch.tensor([5, 6]))
    split._decode(packed, torch.device("cuda"))
    assert calls == ["synchronize", "decode"]
    calls.clear()
    split._decode(packed, torch.device("cpu"))  # nothing to wait for on a CPU
    assert calls == ["decode"]
