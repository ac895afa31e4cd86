"""Miniature copies of every real dataset, in the on-disk formats that docs/datasets.md specifies.

Written from docs/datasets.md and reference/*.json (not from data.py), so that the tests check that the docs and the
loaders agree. Each `make_*` writes under `root` with the real folder and file names, real metadata columns and
file formats (a few tiny images per class) and returns the truth the loader must reproduce:

    {"train": {item: label}, "test": {...}, "ood": {name: {...}}, ...}

where an item is the image path relative to `root` for image files, or an image id for array formats (CIFAR, STL,
CIFAR-10.1, PCam), whose pixels encode the id (see `id_colour` / `read_id`).
"""
import csv
import hashlib
import io
import json
import pickle
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

REFERENCE = Path(__file__).resolve().parents[1] / "reference"


def reference(name):
    return json.loads((REFERENCE / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Tiny images
# ---------------------------------------------------------------------------------------------------------------
_JPEG_CACHE = {}


def _encoded(colour, size, fmt):
    key = (colour, size, fmt)
    if key not in _JPEG_CACHE:
        buf = io.BytesIO()
        Image.new("RGB", (size, size), colour).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        _JPEG_CACHE[key] = buf.getvalue()
    return _JPEG_CACHE[key]


def write_image(path, colour=(128, 64, 32), size=8):
    """A solid-colour image in the format its extension names (JPEG, PNG, BMP, WebP, TIFF)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF",
           ".tiff": "TIFF"}[path.suffix.lower()]
    path.write_bytes(_encoded(tuple(colour), size, fmt))
    return path


def label_colour(label):
    return (17 * label % 256, 255 - 13 * label % 256, 90)


def id_colour(i):
    """The background colour that encodes image id i (< 250 * 250) exactly in lossless formats."""
    return (i % 250, (i // 250) % 250, 200)


def oriented(i, size):
    """An upright H x W x 3 uint8 picture with image id i: background = id_colour(i), a white band across the top
    quarter and a red block in the bottom-left corner. Transposed, flipped up-down or left-right, it differs."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = id_colour(i)
    q = size // 4
    img[:q] = 255
    img[size - q:, :q] = (255, 0, 0)
    return img


def read_id(img):
    """The id of an `oriented` picture (PIL image or H x W x 3 array), and whether it is upright."""
    a = np.asarray(img).astype(int)
    h, w = a.shape[:2]
    r, g, _ = a[h - 1, w - 1]
    upright = (a[0, w - 1] > 230).all() and a[h - 1, 0, 0] > 230 and (a[h - 1, 0, 1:] < 25).all()
    return int(r + 250 * g), bool(upright)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet and its OOD sets; BREEDS (Living-17, Entity-30) on the ImageNet folders
# ---------------------------------------------------------------------------------------------------------------
class _ValNames:
    """ILSVRC2012_val_00000001.JPEG, ... (one global counter, as in the real val set)."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return f"ILSVRC2012_val_{self.n:08d}.JPEG"


def make_breeds(root, names=("living17", "entity30"), train_per_wnid=2, big=None):
    """Only the ImageNet wnid folders BREEDS needs: train/ of source AND target subclasses (the real train set has
    both; the loader must take only the source ones), val/ of source and target, and one unrelated wnid (tench).
    `big` = (name, superclass index): that superclass's first source wnid gets 25 train images (the hold-out test)."""
    root = Path(root)
    splits = reference("breeds_rand_splits")
    truth = {}
    val_name = _ValNames()
    train_counts = {}
    for name in names:
        for sc in splits[name]:
            for kind in ("source", "target"):
                for _, wnid, _ in sc[kind]:
                    train_counts.setdefault(wnid, train_per_wnid + len(train_counts) % 2)
        if big and big[0] == name:
            train_counts[splits[name][big[1]]["source"][0][1]] = 25
    train_counts["n01440764"] = 3  # tench: in no BREEDS hierarchy used here
    written_train, written_val = {}, {}
    for wnid, count in train_counts.items():
        written_train[wnid] = [write_image(root / "imagenet" / "train" / wnid / f"{wnid}_{1000 + k}.JPEG",
                                           (k, 50, 50)).relative_to(root).as_posix() for k in range(count)]
        written_val[wnid] = [write_image(root / "imagenet" / "val" / wnid / val_name(), (k, 80, 80))
                             .relative_to(root).as_posix() for k in range(1 + len(written_val) % 2)]
    for name in names:
        t = {"train": {}, "test": {}, "ood": {"target": {}}, "classnames": [], "source": set(), "target": set()}
        for position, sc in enumerate(splits[name]):
            t["classnames"].append(sc["superclass_name"].split(",")[0])  # the first of WordNet's synonyms
            for _, wnid, _ in sc["source"]:
                t["source"].add(wnid)
                t["train"].update({p: position for p in written_train[wnid]})
                t["test"].update({p: position for p in written_val[wnid]})
            for _, wnid, _ in sc["target"]:
                t["target"].add(wnid)
                t["ood"]["target"].update({p: position for p in written_val[wnid]})
        truth[name] = t
    return truth


def make_imagenet(root, big_class=5):
    """The full ImageNet layout the loader needs: 1,000 wnid folders in train/ and val/ (1 image each; 3 for the
    first 10 classes and 30 for `big_class`, so the hold-out has something to hold out), and every OOD set: V2
    (folders 0..999 named by class index), R and A (200 wnids each, .jpg; A's names have spaces), Sketch (1,000)."""
    root = Path(root)
    ref = reference("imagenet_classes")
    wnids = ref["wnids"]
    assert wnids == sorted(wnids)
    ra = reference("imagenet_r_a")
    val_name = _ValNames()
    t = {"train": {}, "test": {}, "ood": {"v2": {}, "r": {}, "sketch": {}, "a": {}}, "classnames": ref["classnames"],
         "wnids": wnids, "r_indices": ra["imagenet_r"]["indices"], "a_indices": ra["imagenet_a"]["indices"]}
    for label, wnid in enumerate(wnids):
        n = 30 if label == big_class else 3 if label < 10 else 1
        for k in range(n):
            p = write_image(root / "imagenet" / "train" / wnid / f"{wnid}_{10026 + k}.JPEG", (label % 256, k, 0))
            t["train"][p.relative_to(root).as_posix()] = label
        p = write_image(root / "imagenet" / "val" / wnid / val_name(), (label % 256, 9, 9))
        t["test"][p.relative_to(root).as_posix()] = label
        # V2: <class index>/<sha1>.jpeg, the folder name is the label
        for k in range(2 if label in (2, 10, 100) else 1):
            h = hashlib.sha1(f"{label}-{k}".encode()).hexdigest()
            v2 = root / "imagenetv2-matched-frequency-format-val"
            p = write_image(v2 / str(label) / f"{h}.jpeg", (label % 256, 1, 1))
            t["ood"]["v2"][p.relative_to(root).as_posix()] = label
        p = write_image(root / "sketch" / wnid / f"sketch_{label}.JPEG", (label % 256, 2, 2))
        t["ood"]["sketch"][p.relative_to(root).as_posix()] = label
    index = {w: i for i, w in enumerate(wnids)}
    for k, wnid in enumerate(ra["imagenet_r"]["wnids"]):
        p = write_image(root / "imagenet-r" / wnid / f"{'art' if k % 2 else 'cartoon'}_{k}.jpg", (k, 3, 3))
        t["ood"]["r"][p.relative_to(root).as_posix()] = index[wnid]
    for k, wnid in enumerate(ra["imagenet_a"]["wnids"]):
        name = ref["classnames"][index[wnid]]
        p = write_image(root / "imagenet-a" / wnid / f"0.{k:06d}_{name} _ {name}_0.86{k:04d}.jpg", (k, 4, 4))
        t["ood"]["a"][p.relative_to(root).as_posix()] = index[wnid]
    return t


def write_loc_val_solution(path, rows):
    """Kaggle's LOC_val_solution.csv: ImageId,PredictionString ('<wnid> x0 y0 x1 y1 <wnid> ...')."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for image_id, wnid in rows:
            w.writerow([image_id, f"{wnid} 12 34 200 180 {wnid} 40 50 120 160 "])


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10, STL-10, CIFAR-10.1
# ---------------------------------------------------------------------------------------------------------------
def _py2_pickle(obj):
    """Pickle a dict the way the real CIFAR-10 python batches were pickled (Python 2 cPickle, protocol 2): the str
    keys and str values become Python 2 byte strings (SHORT_BINSTRING), which Python 3 reads as str with
    encoding='latin1' (torchvision) and as bytes with encoding='bytes'."""
    raw = pickle.dumps(obj, protocol=2)
    strings = set(obj) | {v for v in obj.values() if isinstance(v, str)}
    strings |= {s for v in obj.values() if isinstance(v, list) for s in v if isinstance(s, str)}
    for s in sorted(strings, key=len, reverse=True):
        b = s.encode("latin1")
        assert len(b) < 256
        raw = raw.replace(b"X" + len(b).to_bytes(4, "little") + b, b"U" + bytes([len(b)]) + b)
    return raw


def make_cifar10(root, per_batch=8, n_test=12, n_stl=20, n_101=10):
    """cifar-10-batches-py/ (5 data batches, test_batch, batches.meta), stl10_binary/test_{X,y}.bin (column-major,
    labels 1..10, two per class), cifar10.1/cifar10.1_v6_{data,labels}.npy. Every picture is `oriented` with a
    unique id; truth maps id -> label (STL: mapped to CIFAR's, monkeys left out)."""
    root = Path(root)
    names = reference("few_shot_templates")["cifar10"]["classnames"]
    rng = np.random.default_rng(0)
    t = {"train": {}, "test": {}, "ood": {"stl10": {}, "cifar10.1": {}}, "classnames": names,
         "stl_labels": [], "stl_monkeys": 0}
    next_id = iter(range(10_000))
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n, label_name, key):
        ids, labels, rows = [], [], []
        for k in range(n):
            i, y = next(next_id), int(rng.integers(10)) if k >= 10 else k  # every class at least once
            img = oriented(i, 32)  # H x W x 3 -> CIFAR row: 1024 R, 1024 G, 1024 B, each row-major
            rows.append(img.transpose(2, 0, 1).reshape(-1))
            ids.append(i)
            labels.append(y)
            t[key][i] = y
        return {"batch_label": label_name, "labels": labels, "data": np.stack(rows).astype(np.uint8),
                "filenames": [f"{names[y]}_s_{i:06d}.png" for i, y in zip(ids, labels)]}

    for b in range(1, 6):
        d = batch(per_batch + (b == 1) * 3, f"training batch {b} of 5", "train")
        (folder / f"data_batch_{b}").write_bytes(_py2_pickle(d))
    (folder / "test_batch").write_bytes(_py2_pickle(batch(n_test, "testing batch 1 of 1", "test")))
    meta = {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(_py2_pickle(meta))
    (folder / "readme.html").write_text("<html></html>")

    stl = root / "stl10_binary"
    stl.mkdir()
    stl_names = reference("few_shot_templates")["stl10"]["classnames"]
    (stl / "class_names.txt").write_text("\n".join(stl_names) + "\n")
    xs, ys = [], []
    stl_to_cifar = [0, 2, 1, 3, 4, 5, 7, -1, 8, 9]  # from docs/datasets.md (independent of data.STL_TO_CIFAR)
    for k in range(n_stl):
        i, y_stl = next(next_id), k % 10 + 1  # STL labels are 1..10
        xs.append(oriented(i, 96).transpose(2, 1, 0).reshape(-1))  # column-major: [channel][column][row]
        ys.append(y_stl)
        t["stl_labels"].append(y_stl)
        if stl_to_cifar[y_stl - 1] >= 0:
            t["ood"]["stl10"][i] = stl_to_cifar[y_stl - 1]
        else:
            t["stl_monkeys"] += 1
    (stl / "test_X.bin").write_bytes(np.stack(xs).astype(np.uint8).tobytes())
    (stl / "test_y.bin").write_bytes(np.array(ys, np.uint8).tobytes())

    c101 = root / "cifar10.1"
    c101.mkdir()
    ids = [next(next_id) for _ in range(n_101)]
    labels = np.array([(3 * k + 1) % 10 for k in range(n_101)], np.int64)
    np.save(c101 / "cifar10.1_v6_data.npy", np.stack([oriented(i, 32) for i in ids]))
    np.save(c101 / "cifar10.1_v6_labels.npy", labels)
    t["ood"]["cifar10.1"] = dict(zip(ids, labels.tolist()))
    return t


# ---------------------------------------------------------------------------------------------------------------
# DomainNet (SENTRY's 40 classes)
# ---------------------------------------------------------------------------------------------------------------
DOMAINNET_DOMAINS = ("sketch", "real", "painting", "clipart")


def make_domainnet(root, lf_list="painting_test_mini.txt"):
    """domainnet/<domain>/<class>/<domain>_<NNN>_<MMMMMM>.jpg and SENTRY_splits/<domain>_{train,test}_mini.txt with
    CRLF line endings (`lf_list` is written with LF instead: both must be read). Some images on disk are in no list
    (as in the real, bigger DomainNet); sketch train has 2-3 images per class and 20 for 'bee'."""
    root = Path(root) / "domainnet"
    ref = reference("domainnet_sentry40")
    classes = ref["classnames"]
    t = {"train": {}, "test": {}, "ood": {"real": {}, "painting": {}, "clipart": {}}, "classnames": classes}
    counter = iter(range(1, 10**6))
    for domain in DOMAINNET_DOMAINS:
        lists = {"train": [], "test": []}
        for label, cls in enumerate(classes):
            n = {"train": (20 if cls == "bee" else 2 + label % 2) if domain == "sketch" else 1,
                 "test": 1 if domain == "sketch" or label % 3 else 0}  # OOD lists: a subset of the classes
            for split in ("train", "test", "unlisted"):
                for _ in range(n.get(split, 1)):
                    rel = f"{domain}/{cls}/{domain}_{label + 1:03d}_{next(counter):06d}.jpg"
                    write_image(root / rel, label_colour(label))
                    if split != "unlisted":
                        lists[split].append((rel, label))
        for split, lines in lists.items():
            name = f"{domain}_{split}_mini.txt"
            eol = "\n" if name == lf_list else "\r\n"
            (root / "SENTRY_splits").mkdir(exist_ok=True)
            (root / "SENTRY_splits" / name).write_bytes("".join(f"{rel} {y}{eol}" for rel, y in lines).encode())
            entries = {f"domainnet/{rel}": y for rel, y in lines}
            if domain == "sketch":
                t[split].update(entries)
            elif split == "test":
                t["ood"][domain].update(entries)
    return t


# ---------------------------------------------------------------------------------------------------------------
# FMoW (WILDS v1.1)
# ---------------------------------------------------------------------------------------------------------------
FMOW_COLUMNS = ["split", "img_filename", "img_path", "spatial_reference", "epsg", "category", "visible",
                "img_width", "img_height", "country_code", "cloud_cover", "timestamp", "lat", "lon"]
WKT = ('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],'
       'AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433],AUTHORITY["EPSG","4326"]]')
COUNTRIES = [  # name, alpha-2, alpha-3, country-code, region, sub-region (the ISO-3166 file WILDS ships)
    ("United States of America", "US", "USA", "840", "Americas", "Northern America"),
    ("Brazil", "BR", "BRA", "076", "Americas", "Latin America and the Caribbean"),
    ("France", "FR", "FRA", "250", "Europe", "Western Europe"),
    ("China", "CN", "CHN", "156", "Asia", "Eastern Asia"),
    ("Korea, Republic of", "KR", "KOR", "410", "Asia", "Eastern Asia"),
    ("Nigeria", "NG", "NGA", "566", "Africa", "Sub-Saharan Africa"),
    ("Australia", "AU", "AUS", "036", "Oceania", "Australia and New Zealand"),
    ("Antarctica", "AQ", "ATA", "010", "", ""),
]
FMOW_REGION = {c[2]: c[4] for c in COUNTRIES if c[4]}


def _fmow_rows():
    """(split, year, month, day, category, country) rows, 'seq' rows among them, with the split's edge years."""
    cats = ["airport_hangar", "airport", "zoo", "dam", "helipad", "lake_or_pond", "multi-unit_residential"]
    codes = ["USA", "FRA", "CHN", "NGA", "AUS", "BRA", "KOR", "XKX"]  # XKX: not in the mapping -> Other
    rows = [("seq", 2010, 5, 5, "dam", "USA"), ("seq", 2016, 6, 6, "zoo", "FRA")]
    k = 0
    for split, years in (("train", [2002, 2005, 2009, 2012, 2012]), ("val", [2004, 2011, 2012]),
                         ("test", [2003, 2008, 2012]), ("val", [2013, 2014, 2015, 2016]),
                         ("test", [2013, 2015, 2016, 2016, 2016, 2017, 2017, 2017]), ("train", [2013, 2016])):
        for year in years:
            for j in range(2 if split == "test" and year >= 2016 else 1):
                rows.append((split, year, 1 + k % 12, 1 + k % 28, cats[k % len(cats)], codes[k % len(codes)]))
                k += 1
                if k % 5 == 0:
                    rows.append(("seq", 2011 + k % 7, 3, 3, cats[k % len(cats)], codes[k % len(codes)]))
    # the year boundaries, to the second
    rows += [("train", "2012-12-31T23:59:59Z", "airport", "USA"), ("train", "2013-01-01T00:00:00Z", "airport", "USA"),
             ("test", "2015-12-31T23:59:59Z", "zoo", "FRA"), ("test", "2016-01-01T00:00:00Z", "zoo", "AUS"),
             ("seq", "2017-07-07T07:07:07Z", "zoo", "AUS")]
    return rows


def make_fmow(root, rows=None, columns=FMOW_COLUMNS):
    """fmow_v1.1/rgb_metadata.csv (WILDS' columns, ISO timestamps, quoted WKT with commas, 'seq' rows),
    country_code_mapping.csv (name,alpha-2,alpha-3,...,region,...) and images/rgb_img_<row>.png for the non-seq rows.
    Truth: items are image paths; official split by year (before 2013 ID; test rows from 2016 on OOD)."""
    root = Path(root)
    folder = root / "fmow_v1.1"
    (folder / "images").mkdir(parents=True)
    names = reference("wilds_templates")["fmow_classnames"]["names"]
    with open(folder / "country_code_mapping.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "alpha-2", "alpha-3", "country-code", "iso_3166-2", "region", "sub-region",
                    "intermediate-region", "region-code", "sub-region-code", "intermediate-region-code"])
        for name, a2, a3, num, region, sub in COUNTRIES:
            w.writerow([name, a2, a3, num, f"ISO 3166-2:{a2}", region, sub, "", "", "", ""])
    t = {"train": {}, "val": {}, "test": {}, "ood": {"test": {}}, "classnames": names, "region": {}, "unused": set(),
         "seq_rows": []}
    rows = rows or _fmow_rows()
    with open(folder / "rgb_metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i, row in enumerate(rows):
            if len(row) == 6:
                split, y, m, d, cat, code = row
                ts = f"{y}-{m:02d}-{d:02d}T{10 + i % 10}:11:{i % 60:02d}Z"
            else:
                split, ts, cat, code = row
            year = int(ts[:4])
            values = {"split": split, "img_filename": f"{cat}_{i}_0_rgb.jpg",
                      "img_path": f"{split}/{cat}/{cat}_{i}/{cat}_{i}_0_rgb.jpg", "spatial_reference": WKT,
                      "epsg": 32600 + i % 60, "category": cat, "visible": True, "img_width": 1024 + i,
                      "img_height": 768 + i, "country_code": code, "cloud_cover": i % 30, "timestamp": ts,
                      "lat": round(10 + i * 0.37, 6), "lon": round(-70 + i * 1.1, 6)}
            w.writerow([values[c] for c in columns])
            if split == "seq":
                t["seq_rows"].append(i)
                continue
            rel = write_image(folder / "images" / f"rgb_img_{i}.png", id_colour(i)).relative_to(root).as_posix()
            label = names.index(cat)
            t["region"][rel] = FMOW_REGION.get(code, "Other")
            if year < 2013:
                t[split][rel] = label
            elif split == "test" and year >= 2016:
                t["ood"]["test"][rel] = label
            else:
                t["unused"].add(rel)
    t["rows"] = len(rows)
    return t


# ---------------------------------------------------------------------------------------------------------------
# iWildCam (WILDS v2.0)
# ---------------------------------------------------------------------------------------------------------------
IWILDCAM_COLUMNS = ["", "split", "location_remapped", "location", "sequence_remapped", "sequence", "datetime", "y",
                    "category_id", "filename", "image_id"]


def make_iwildcam(root, columns=IWILDCAM_COLUMNS):
    """iwildcam_v2.0/metadata.csv (pandas' unnamed index column first, WILDS' columns and datetime format) and every
    image under train/ whatever its split. Splits train / val (unused) / test / id_val / id_test."""
    root = Path(root)
    folder = root / "iwildcam_v2.0"
    (folder / "train").mkdir(parents=True)
    labels_ref = reference("wilds_templates")["iwildcam_labels_csv"]
    plan = {"train": [0, 0, 1, 1, 5, 5, 17, 17, 17, 100, 181, 181] + [0] * 12, "val": [0, 1, 5],
            "test": [0, 1, 1, 5, 17, 17, 36, 36, 100, 181], "id_val": [0, 1, 5, 17, 181],
            "id_test": [0, 0, 1, 5, 17, 100, 181]}
    t = {"train": {}, "val": {}, "test": {}, "ood": {"test": {}}, "classnames": labels_ref["english_lower"],
         "unused": set()}
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        i = 0
        for split, ys in plan.items():
            for y in ys:
                name = f"{uuid.UUID(int=0x8b31d3be21bc11eaa13a137349068a90 + i)}.jpg"
                values = {"": i, "split": split, "location_remapped": i % 7, "location": 100 + i % 7,
                          "sequence_remapped": i // 3, "sequence": f"6f0{i // 3:05d}-21bc-11ea-a13a-137349068a90",
                          "datetime": f"2013-06-{1 + i % 28:02d} 16:{i % 60:02d}:20.000", "y": y,
                          "category_id": labels_ref["category_id"][y], "filename": name,
                          "image_id": name[:-4]}
                w.writerow([values[c] for c in columns])
                rel = write_image(folder / "train" / name, label_colour(y)).relative_to(root).as_posix()
                target = {"train": t["train"], "id_val": t["val"], "id_test": t["test"], "test": t["ood"]["test"]}
                if split in target:
                    target[split][rel] = y
                else:
                    t["unused"].add(rel)
                i += 1
    return t


# ---------------------------------------------------------------------------------------------------------------
# PatchCamelyon (HDF5, torchvision's PCAM layout) and Rendered SST2 (torchvision's RenderedSST2 layout)
# ---------------------------------------------------------------------------------------------------------------
def make_pcam(root, sizes=(("train", 12), ("valid", 4), ("test", 6))):
    """pcam/camelyonpatch_level_2_split_<split>_{x,y}.h5: x uint8 N x 96 x 96 x 3, y uint8 N x 1 x 1 x 1."""
    import h5py

    folder = Path(root) / "pcam"
    folder.mkdir(parents=True)
    t = {"classnames": reference("few_shot_templates")["patchcamelyon"]["classnames"]}
    next_id = iter(range(10_000))
    for split, n in sizes:
        ids = [next(next_id) for _ in range(n)]
        ys = [int(k % 2 if k < 2 else (i * 7) % 3 == 0) for k, i in enumerate(ids)]
        with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=np.stack([oriented(i, 96) for i in ids]), compression="gzip")
        with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=np.array(ys, np.uint8).reshape(n, 1, 1, 1))
        t[split] = dict(zip(ids, ys))
    return t


def make_sst2(root, sizes=(("train", 6, 5), ("valid", 2, 3), ("test", 3, 2))):
    """rendered-sst2/{train,valid,test}/{negative,positive}/<n>.png."""
    root = Path(root)
    t = {"classnames": reference("few_shot_templates")["rendered_sst2"]["classnames"]}
    k = 0
    for split, n_neg, n_pos in sizes:
        t[split] = {}
        for label, (cls, n) in enumerate((("negative", n_neg), ("positive", n_pos))):
            for _ in range(n):
                p = write_image(root / "rendered-sst2" / split / cls / f"{k}.png", label_colour(label), size=12)
                t[split][p.relative_to(root).as_posix()] = label
                k += 1
    return t


# ---------------------------------------------------------------------------------------------------------------
# Your own folders
# ---------------------------------------------------------------------------------------------------------------
FOLDER_CLASSES = ["golden_retriever", "red_fox", "tabby_cat"]  # sorted: the train folder order
EXTENSIONS = [".jpg", ".JPG", ".jpeg", ".png", ".PNG", ".bmp", ".webp", ".tif", ".TIFF"]


def make_folder(root, val=True, test=True, ood=(("sketches", FOLDER_CLASSES), ("night", FOLDER_CLASSES[1:])),
                templates=("a photo of a {}.", "a blurry photo of the {}."), train_per_class=(12, 20, 11)):
    """mydata/{train,[val],[test],<ood>...}/<class>/ images in every documented extension (mixed case), a
    non-image file and a hidden file in the class folders (to be ignored), and an optional templates.txt."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    t = {"classnames": [c.replace("_", " ") for c in FOLDER_CLASSES], "ood": {}}
    k = 0

    def fill(split, classes, per_class):
        nonlocal k
        out = {}
        for cls, n in zip(classes, per_class):
            label = FOLDER_CLASSES.index(cls)
            for _ in range(n):
                ext = EXTENSIONS[k % len(EXTENSIONS)]
                p = write_image(root / split / cls / f"img_{k:04d}{ext}", label_colour(label))
                out[p.relative_to(root).as_posix()] = label
                k += 1
            (root / split / cls / "notes.txt").write_text("not an image\n")
            (root / split / cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        return out

    t["train"] = fill("train", FOLDER_CLASSES, train_per_class)
    if val:
        t["val"] = fill("val", FOLDER_CLASSES, (2, 2, 2))
    if test:
        t["test"] = fill("test", FOLDER_CLASSES, (2, 3, 2))
    for name, classes in ood:
        t["ood"][name] = fill(name, classes, [2] * len(classes))
    if templates is not None:
        (root / "templates.txt").write_text("".join(f"{x}\n" for x in templates))
    t["templates"] = list(templates) if templates is not None else ["a photo of a {}."]
    return t


MAKERS = {"living17": make_breeds, "entity30": make_breeds, "cifar10": make_cifar10, "imagenet": make_imagenet,
          "domainnet": make_domainnet, "fmow": make_fmow, "iwildcam": make_iwildcam, "pcam": make_pcam,
          "sst2": make_sst2, "folder": make_folder}

if __name__ == "__main__":  # a miniature to try a dataset's whole path on before the real one is on disk
    import sys

    usage = f"usage: python tests/miniatures.py DATASET DIR   (DATASET: {', '.join(MAKERS)})"
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(usage)
        raise SystemExit(0)
    if len(sys.argv) != 3 or sys.argv[1] not in MAKERS:
        raise SystemExit(usage)
    name, out = sys.argv[1], Path(sys.argv[2])
    MAKERS[name](out)
    print(f"wrote a miniature {name} under {out}; try:\n  python lpft.py --dataset {name} --data-root {out} "
          f"--backbone embedded-clip-tiny --epochs 1 --batch-size 4")
