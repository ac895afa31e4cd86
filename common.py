"""What every method shares and that is not the method: backbones, seeding, device, precision and compile,
evaluation, feature distortion, the results writer and the dataclass -> argparse helper."""
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import data

try:
    import fcntl  # folder locks (Results)
except ImportError:  # Windows
    fcntl = None

# ---------------------------------------------------------------------------------------------------------------
# The embedded CLIP: a small conv image tower and a bag-of-words text tower, open_clip's tokenizer, pretrained with
# the CLIP loss by pretrain.py (docs/embedded.md explains the design and what we measured on the way)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddedCLIPConfig:
    """Everything that determines the embedded model's weights; the cache file is keyed by a hash of it."""
    name: str = "embedded-clip"
    n_corpus: int = 32_000  # pretraining images, all domains
    steps: int = 800
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    embed_dim: int = 128
    convs: tuple = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2))  # conv tower: (width, stride) per layer
    text_width: int = 128
    context_length: int = 16
    seed: int = 12_345  # disjoint from the downstream split seeds in data.py


EMBEDDED_BACKBONES = {
    "embedded-clip": EmbeddedCLIPConfig(),
    "embedded-clip-tiny": EmbeddedCLIPConfig(name="embedded-clip-tiny", n_corpus=512, steps=20, batch_size=32,
                                             convs=((8, 2), (16, 2), (32, 2)), embed_dim=32, text_width=32),
}


class ConvTower(nn.Module):
    """A small VGG-style conv net with BatchNorm (as in CLIP's and MoCo's ResNets, so LP-FT's eval-mode BatchNorm
    matters here too; GroupNorm learned shapes ~3x slower in our runs), global average pooling and a linear
    projection into CLIP's joint embedding space."""

    def __init__(self, convs, embed_dim):
        super().__init__()
        layers, c_in = [], 3
        for width, stride in convs:
            layers += [nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c_in = width
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, embed_dim)
        self.output_dim = embed_dim

    def forward(self, x):
        return self.proj(self.trunk(x).mean(dim=(2, 3)))


class EmbeddedCLIP(nn.Module):
    """A small CLIP with open_clip.CLIP's interface (visual, encode_image, encode_text, logit_scale), so every method
    treats it exactly like a real CLIP. Text tower: the mean of the caption's word embeddings (open_clip's BPE
    tokens, start/end/padding excluded), linearly projected. A randomly initialised transformer text tower collapsed
    to one embedding for all shape words within ~50 steps in our runs (docs/embedded.md); this one does not."""

    def __init__(self, cfg):
        super().__init__()
        self.visual = ConvTower(cfg.convs, cfg.embed_dim)
        self.context_length = cfg.context_length
        self.tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)  # CLIP's BPE, shipped with open_clip
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, cfg.text_width)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))  # CLIP's init

    def encode_image(self, image, normalize=False):
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=False):
        words = (text != 0) & (text != self.tokenizer.sot_token_id) & (text != self.tokenizer.eot_token_id)
        x = (self.token_embedding(text) * words[..., None]).sum(1) / words.sum(1, keepdim=True).clamp(min=1)
        x = self.text_projection(x)
        return F.normalize(x, dim=-1) if normalize else x


def cache_dir():
    """RFT_CACHE, else ~/.cache/robust-finetuning (an empty RFT_CACHE counts as unset: it made the cache the current
    folder; a quoted ~ is the home folder, not a folder named ~)."""
    try:
        return Path(os.environ.get("RFT_CACHE") or Path.home() / ".cache" / "robust-finetuning").expanduser()
    except RuntimeError as e:  # ~user of no such user, or no home folder at all
        where = f"RFT_CACHE={os.environ['RFT_CACHE']!r}" if os.environ.get("RFT_CACHE") else "the default cache folder"
        raise SystemExit(f"error: {where}: {e}; set RFT_CACHE to a full path") from None


def check_environment():
    """Refuse a malformed RFT_* variable before anything runs: RFT_WORKERS=abc stopped the first batch with a
    ValueError, and an RFT_CACHE that names a file stopped the run only when the pretrained model was written."""
    workers = os.environ.get("RFT_WORKERS")
    if workers and not re.fullmatch(r"\s*[0-9]+\s*", workers):  # empty: unset, as for the other variables
        raise SystemExit(f"error: RFT_WORKERS={workers!r}: expected a whole number, 0 or more, of data-loading "
                         "processes per training process (0: load in the training process; unset: a share of the "
                         "cores)")
    decode = os.environ.get("RFT_GPU_DECODE")
    if decode not in (None, "", "0", "1"):
        raise SystemExit(f"error: RFT_GPU_DECODE={decode!r}: expected 1 (decode JPEGs on the GPU) or 0 (in the loader "
                         "workers)")
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        which = "RFT_CACHE" if os.environ.get("RFT_CACHE") else "the default; RFT_CACHE sets another"
        why = "it is a file" if cache_dir().is_file() else e.strerror
        raise SystemExit(f"error: the cache folder {cache_dir()} ({which}) cannot be made: {why}; it holds the "
                         "embedded models and cached features: point RFT_CACHE at a folder you can write") from None


def cache_write_error(folder):
    """Why no file can be written in `folder` (made if missing), or None: asked before minutes of pretraining."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return e.strerror or str(e)


def next_aside(folder, stems):
    """The N under which files of `folder` go aside as <stem>.previous<N>[.suffix]: one after the highest of `stems`
    there (one removed by hand leaves a gap; a number is never used twice)."""
    names = "|".join(map(re.escape, stems))
    found = (re.fullmatch(rf"({names})\.previous(\d+)(\.\w+)?", p.name) for p in Path(folder).iterdir())
    return 1 + max((int(m[2]) for m in found if m), default=-1)


def embedded_cache_path(cfg):
    key = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{cfg.name}-{key}.pt"


def load_embedded_clip(name, log=print):
    cfg = EMBEDDED_BACKBONES[name]
    path = embedded_cache_path(cfg)
    world = data.rank_and_world()[1]
    if world > 1:  # decided together: a node whose own cache lacks it must not stop alone, the others would wait
        lacking = world - round(all_reduce_sum(float(path.exists()))[0])
        if lacking:  # each process would pretrain it, on torchrun's one thread: minutes, and another model
            raise SystemExit(f"error: {lacking} of the {world} processes find no cached {name} (this one "
                             f"{'finds' if path.exists() else 'lacks'} {path}); pretrain it once before a torchrun "
                             "job, on each node whose RFT_CACHE is its own (each process would pretrain it again, on "
                             f"one thread, which makes another model than a plain run's): python pretrain.py "
                             f"--backbone {name}")
    if not path.exists():
        try:
            import pretrain  # the pretraining script, run once per config
        except ModuleNotFoundError as e:
            if e.name != "pretrain":
                raise
            raise SystemExit(f"error: no cached {name} at {path}, and pretrain.py, which makes it, is not beside "
                             f"{Path(__file__).name}: copy pretrain.py along with common.py and data.py, or point "
                             "RFT_CACHE at a folder that holds the model") from None

        why = cache_write_error(path.parent)
        if why:
            raise SystemExit(f"error: no cached {name} at {path}, and {path.parent} cannot be written ({why}): the "
                             "model pretrained now could not be kept; point RFT_CACHE at a folder you can write, or at "
                             "one that holds the model")
        log(f"no cached {name} at {path}: pretraining it now (once)")
        with rng_kept():  # it seeds and draws its own: the run's random head must not depend on whether it ran
            pretrain.pretrain(cfg, path, log=log)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = EmbeddedCLIP(cfg)
        model.load_state_dict(saved["state_dict"])
    except Exception as e:  # cut short (a full disk, a copy interrupted), or not ours
        raise SystemExit(f"error: the cached {name} at {path} cannot be loaded ({unreadable(path, e)}); pretrain it "
                         f"again: python pretrain.py --backbone {name}") from None
    made = saved.get("made_with")  # every number depends on these (README, "How fragile these numbers are")
    if made:
        log(f"{name} pretrained with torch {made['torch']}, {made['threads']} thread(s) on {made['cpu']}")
        changed = [k for k, v in recipe_hashes().items() if made.get(k) not in (None, v)]  # None: not recorded
        if changed:  # the cache is keyed by the config only: an edited recipe or world would go unseen
            log(f"note: {' and '.join(changed)} changed since {path} was pretrained; the cached model is what loads "
                f"(`python pretrain.py --backbone {name} --force` pretrains it again)")
    return model


def recipe_hashes(folder=Path(__file__).parent):
    """Hashes of what makes an embedded model beside its config, which its cache file records: pretrain.py up to its
    main() (its command line makes no model; left out where the file is absent; models made before 2026-12-05 recorded
    the whole file's hash as "pretrain.py", which is no longer compared) and the embedded-world section of data.py,
    which draws the pretraining corpus (all of data.py if its section headers were moved)."""
    def sha(text):
        return hashlib.sha1(text).hexdigest()[:12]

    script = folder / "pretrain.py"
    hashes = {"pretrain.py's pretraining": sha(script.read_text().split("\ndef main(")[0].encode())} if \
        script.exists() else {}
    text = (folder / "data.py").read_text()
    world = re.search(r"^# The embedded world$.*?(?=^# -+\n# )", text, re.S | re.M)  # up to the next section header
    hashes["data.py's embedded world"] = sha((world.group(0) if world else text).encode())
    return hashes


# ---------------------------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------------------------
def rng_states(device):
    """The global random states (torch's on the CPU and on `device`, numpy's, Python's), in types that
    torch.load(weights_only=True) reads back: what a resumed run puts back."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest], "python": random.getstate()}


def set_rng_states(states, device):
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":  # resumed on the CPU: the GPU's state has no use
        torch.cuda.set_rng_state(states["cuda"], device)
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


def key_values(d):
    """{'epochs': 2, 'lr': 0.03} -> 'epochs 2, lr 0.03' (a recipe or split sizes, in a message)."""
    return ", ".join(f"{k} {v}" for k, v in d.items()) if d else "none"


def as_flag(name):
    """An Args field as its command-line flag: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def rng_kept():
    """The global random states (the current GPU's too, where CUDA is in use: a CPU run starts none) are after the
    block as they were before it, however it ends."""
    device = torch.device("cuda" if torch.cuda.is_initialized() else "cpu")
    states = rng_states(device)
    try:
        yield
    finally:
        set_rng_states(states, device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PROGRESS_EVERY = 60  # seconds between plain progress lines where stderr is no terminal (a batch job's log file)


def progress(iterable, desc="", total=None):
    """tqdm's bar on a terminal; in a log file, a plain line a minute at most, so that a long epoch or feature pass
    shows it is alive; nothing from the ranks other than 0 under torchrun."""
    if not is_main():
        return iterable
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _plain_progress(iterable, desc, total)


def _plain_progress(iterable, desc, total):
    start = last = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY:
            last, rate = now, i / max(now - start, 1e-9)
            of = f"/{total:,}" if total else ""
            print(f"{desc}: {i:,}{of} in {now - start:.0f} s ({rate:.2f}/s)", file=sys.stderr, flush=True)


def write_atomic(path, write):
    """`write(tmp)` to a temporary file in the same folder, on the disk (fsync), then rename: a crash, even of the
    machine, never leaves half a file, and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "r+b") as f:  # else a power cut after the rename can leave the new name on empty blocks
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


class BackgroundWrite(threading.Thread):
    """`write(*args)` in a thread of its own: resume.pt is written and flushed (2.4 GB: 5 s) while the next epoch
    trains. Not a daemon: the interpreter waits for it at exit, so a run that fails still leaves its last resume.pt
    whole. A plain thread, not an executor's: a process forked meanwhile (a loader worker) inherits no pool whose
    threads it lacks."""

    def __init__(self, write, *args):
        super().__init__(name="rft-background-write")
        self.write, self.args, self.error = write, args, None
        self.start()

    def run(self):
        try:
            self.write(*self.args)
        except BaseException as e:  # raised where the run waits for it: result()
            self.error = e

    def result(self):
        """Wait for the write; raise its error."""
        self.join()
        if self.error is not None:
            raise self.error


def wait_for_writes():
    """Wait until the background writes of this process are on the disk (or failed: their Results raise it)."""
    for thread in threading.enumerate():
        if isinstance(thread, BackgroundWrite):
            thread.join()


def cpu_copy(obj, into=None):
    """`obj` with each tensor in it (through dicts, lists and tuples) copied to the CPU: a snapshot that the
    in-place updates of the steps after it do not reach. `into`, an earlier copy of the same structure, is written
    over where a tensor's shape and dtype match: fresh memory costs more than the copy (ViT-B/16's resume.pt here:
    1.2-3.4 s into new memory, 0.2 s into the last copy; benchmarks/resume_write.py)."""
    if isinstance(obj, torch.Tensor):
        if isinstance(into, torch.Tensor) and (into.shape, into.dtype) == (obj.shape, obj.dtype):
            return into.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):  # a state dict's OrderedDict, with the module versions load_state_dict reads
        into = into if isinstance(into, dict) else {}
        copy = type(obj)((k, cpu_copy(v, into.get(k))) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(cpu_copy(v, w) for v, w in zip(obj, into))
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Backbones: image encoder (images -> features), plus the CLIP model and tokenizer where there is one
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Backbone:
    encoder: nn.Module  # images -> features; `encoder.output_dim` is the feature size
    clip: nn.Module = None  # the whole CLIP model (text tower for zero-shot heads and FLYP), None for plain ResNets
    tokenizer: object = None  # (the input resolution and normalisation it expects: data.preprocessing(name))
    key: str = None  # what identifies these weights (name and file), for the feature cache


OPEN_CLIP_MODELS = {  # name -> open_clip architecture. OpenAI trained CLIP with QuickGELU: plain 'ViT-B-16' loads
    "clip-vit-b16": "ViT-B-16-quickgelu",  # their weights from a file without a word (open_clip warns only for the
    "clip-rn50": "RN50-quickgelu",  # 'openai' tag) but computes GELU, a different function
}
WEIGHTS = {  # name -> (official file, where to download it, what it holds); the URLs are the ones in open_clip's
    # pretrained.py, torchvision's ResNet50_Weights.IMAGENET1K_V1 (what the LP-FT paper's supervised model was) and
    # the MoCo release; tests/test_backbones.py checks the first two against the installed libraries
    "clip-vit-b16": ("ViT-B-16.pt", "https://openaipublic.azureedge.net/clip/models/"
                     "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
                     "OpenAI's CLIP ViT-B/16 weights: their TorchScript archive or a state dict"),
    "clip-rn50": ("RN50.pt", "https://openaipublic.azureedge.net/clip/models/"
                  "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
                  "OpenAI's CLIP RN50 weights: their TorchScript archive or a state dict"),
    "moco-v2-rn50": ("moco_v2_800ep_pretrain.pth.tar", "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/"
                     "moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
                     "MoCo's released checkpoint: a dict whose 'state_dict' holds the ResNet-50 as module.encoder_q.*"),
    "resnet50": ("resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                 "torchvision's ResNet-50 state dict (conv1.weight ... fc.bias)"),
}
BACKBONES = sorted(EMBEDDED_BACKBONES) + sorted(WEIGHTS)
CLIP_BACKBONES = sorted(EMBEDDED_BACKBONES) + sorted(OPEN_CLIP_MODELS)  # the ones with a text tower


def weights_dir():
    """Where a backbone's official weights file is looked for when --weights is not given."""
    return cache_dir() / "weights"


def weights_file(name, weights=None):
    """The local weights file of a backbone: `weights` (a bare file name not in the current folder: in weights_dir()),
    else its official file in weights_dir(); never downloads."""
    file, _, what = WEIGHTS[name]
    path = Path(weights).expanduser() if weights else weights_dir() / file  # `--weights=~/x.pt`: bash leaves the ~
    bare = weights and Path(weights).name == weights  # `--weights ViT-B-16.pt`, as the README's commands say it
    if bare and not path.exists() and (weights_dir() / path).is_file():
        path = weights_dir() / path
    if path.is_file():
        return path
    tag = " (or an open_clip pretrained tag in your hub cache: --weights openai)" if name in OPEN_CLIP_MODELS else ""
    found = "is a folder, not a file" if path.is_dir() else "not found"
    if bare and not path.is_dir():
        found += f" (in {Path.cwd()}, nor in {weights_dir()})"
    if bare and name in OPEN_CLIP_MODELS and not path.suffix:  # a tag, of another model?
        found += (f", nor an open_clip pretrained tag of {OPEN_CLIP_MODELS[name]} (its tags: "
                  f"{', '.join(open_clip.list_pretrained_tags_by_model(OPEN_CLIP_MODELS[name]))})")
    problem = f"weights file {path} {found}" if weights else f"{name} needs --weights FILE{tag}: {path} not found"
    raise SystemExit(f"error: {problem}. {name} expects {what}, {where_to_get(name)}")


def where_to_get(name):
    """Where a backbone's official weights file comes from, and where to put it."""
    file, url, _ = WEIGHTS[name]
    return f"released as {file}: download it from {url}, then put it in {weights_dir()} or pass its path with --weights"


def _bad_weights(path, problem, name, saved=None):
    """A one-line error; where the file's keys are those of another backbone, it names that one."""
    fits = looks_like(saved)
    hint = f"; its keys are those of {fits} weights: pass --backbone {fits}" if fits not in (None, name) else ""
    raise SystemExit(f"error: {path} is not usable as {name} weights: {problem.rstrip('.')}{hint}. "
                     f"Expected: {WEIGHTS[name][2]}, {where_to_get(name)}")


def looks_like(saved):
    """Which backbone of WEIGHTS a weights file's tensors are for, by their names and shapes (None: none of them)."""
    sd = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(sd, dict) or not sd:
        return None
    if any(str(k).startswith("module.encoder_q.") for k in sd):
        return "moco-v2-rn50"
    sd = strip_prefix(sd)
    conv1 = sd.get("visual.conv1.weight")
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in sd and conv1 is not None:
        return "clip-vit-b16" if tuple(conv1.shape) == (768, 3, 16, 16) else None  # a ViT of another size or patch
    if "visual.layer1.0.conv1.weight" in sd:
        return "clip-rn50" if "visual.layer4.2.conv3.weight" in sd and "visual.layer4.3.conv1.weight" not in sd else None
    fc = sd.get("fc.weight")
    if "layer4.2.conv3.weight" in sd and "layer4.3.conv1.weight" not in sd and fc is not None and fc.shape[0] == 1000:
        return "resnet50"
    return None


def strip_prefix(sd, prefix="module."):
    """A state dict saved from nn.DataParallel or DDP has every key prefixed 'module.' (open_clip strips it too)."""
    if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _why(e, n):
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))  # torch colours parts of its messages
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= n else text[:n - 6].rsplit(" ", 1)[0] + " [...]"  # cut at a word, and said to be


def unreadable(path, e, n=200):
    """Why torch.load failed on `path`, in a user's terms where the first bytes tell (torch's own message about
    weights_only is advice for files that are checkpoints), else the error itself."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty (an interrupted download or copy?)"
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "a truncated zip archive (an interrupted download or copy?)"
    if not head.startswith((b"PK", b"\x80")):  # torch saves zip archives, or pickles (protocol 2+) before torch 1.6
        html = head.lstrip()[:1] == b"<"
        return f"not a PyTorch file: it starts with {head[:24]!r}" + (", a web page (a login or error page saved "
                                                                      "instead?)" if html else "")
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if pickled:  # torch's advice (weights_only=False) would run the file's code: not ours to give
        return (f"it holds pickled Python objects ({pickled.group(1)}; a whole model saved with torch.save(model)?), "
                "which are never loaded, as they could run code: save and pass model.state_dict() instead")
    return _why(e, n)


def is_torchscript(path):
    """torch.jit.save's zip archive: the one with a constants.pkl beside data.pkl (torch.load tells them apart so)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path, how_to_make):
    """A model.pt written by a method script's --save (method, args, state_dict; on the CPU), or a one-line error
    saying what is wrong; `how_to_make` says how to get one when there is no file."""
    if Path(path).is_dir():  # a run's folder
        inside = Path(path) / "model.pt"
        raise SystemExit(f"error: {str(path)!r} is a folder; pass its checkpoint, {str(inside)!r}" if inside.is_file()
                         else f"error: {str(path)!r} is a folder that holds no model.pt (a run without --save); "
                              f"{how_to_make}")
    if not Path(path).is_file():
        raise SystemExit(f"error: no fine-tuned checkpoint at {str(path)!r}; {how_to_make}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, foreign pickles
        raise SystemExit(f"error: could not read checkpoint {str(path)!r} ({unreadable(path, e)})")
    if not is_saved_model(ckpt):
        raise SystemExit(f"error: {str(path)!r} is not a model.pt written by a method script's --save (expected the "
                         "keys method, args and state_dict)")
    return ckpt


def is_saved_model(obj):
    """Whether a loaded file is a model.pt written by a method script's --save (Results.save_model)."""
    return isinstance(obj, dict) and {"method", "args", "state_dict"} <= set(obj)


def read_weights(path, name):
    """What a weights file holds, read without running pickled code: torch.load(weights_only=True) (a checkpoint, a
    state dict, safetensors), or for a TorchScript archive (OpenAI's CLIP .pt files) torch.jit.load's state dict
    (TorchScript's reader builds TorchScript objects only). A model.pt of our --save is refused: fine-tuned weights."""
    if is_torchscript(path):  # which torch.load refuses with weights_only
        try:
            saved = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            _bad_weights(path, f"a TorchScript archive torch.jit.load cannot read ({unreadable(path, e, 300)})", name)
    else:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            _bad_weights(path, f"not a checkpoint of tensors, torch.load fails ({unreadable(path, e, 300)})", name)
    if is_saved_model(saved):
        _bad_weights(path, f"it is a model.pt written by {saved['method']}.py --save, a fine-tuned model (wiseft.py and "
                           "feature_map.py read those); --weights takes the pretrained backbone's file", name)
    return saved


def _load_exact(net, state_dict, path, name, saved=None):
    """load_state_dict with strict=True (no key left out, no shape adapted), but a one-line SystemExit instead of a
    traceback listing hundreds of keys; `saved`, the file's content, tells which backbone it fits instead."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        _bad_weights(path, f"it holds a {type(state_dict).__name__}, not a state dict of tensors", name, saved)
    if not state_dict:
        _bad_weights(path, "it holds an empty state dict", name)
    expected = net.state_dict().keys()
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        _bad_weights(path, f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                           f"{unexpected[:3]}", name, saved)
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as e:  # the keys match but some shapes do not
        mismatch = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        _bad_weights(path, mismatch[0] if mismatch else str(e), name, saved)


def load_resnet50(name, path):
    """torchvision's ResNet-50 with fc = Identity: features are the 2048-d pooled penultimate layer, as in the LP-FT
    paper. MoCo's file holds the query encoder (encoder_q, with a 2048-2048-128 MLP `fc` head that is not part of the
    features), the key encoder and the queue; only encoder_q minus fc is kept."""
    import torchvision

    saved = read_weights(path, name)
    net = torchvision.models.resnet50()
    if name == "moco-v2-rn50":
        prefix = "module.encoder_q."
        state_dict = saved.get("state_dict") if isinstance(saved, dict) else None
        if not isinstance(state_dict, dict) or not any(str(k).startswith(prefix) for k in state_dict):
            _bad_weights(path, f"no {prefix}* keys in its 'state_dict'", name, saved)
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()
                      if k.startswith(prefix) and not k.startswith(prefix + "fc.")}
        net.fc = nn.Identity()
    else:
        state_dict = strip_prefix(saved) if isinstance(saved, dict) else saved
    _load_exact(net, state_dict, path, name, saved)
    net.fc = nn.Identity()
    net.output_dim = 2048
    return net


def load_open_clip(name, weights=None):
    """An open_clip CLIP model from a local file (OpenAI's TorchScript archive or a state dict) or from a pretrained
    tag already in the local Hugging Face hub cache."""
    import huggingface_hub

    arch = OPEN_CLIP_MODELS[name]
    # huggingface_hub reads HF_HUB_OFFLINE once, when open_clip imports it, so setting the variable here would be too
    # late (a tag missing from the cache then retries the network for ~45 s); its constant is read at each request.
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if is_hub_tag(name, weights):
        try:
            with quiet_logging():  # its own "Failed to download" line, before the error below says it all
                return open_clip.create_model(arch, pretrained=weights)
        except Exception as e:
            raise SystemExit(f"error: open_clip's {weights!r} weights for {arch} did not load from the local hub cache "
                             f"(nothing is downloaded): {_why(e, 200)}. Copy its hub cache into "
                             f"{huggingface_hub.constants.HF_HUB_CACHE} (HF_HOME or HF_HUB_CACHE set another), or use "
                             f"OpenAI's weights, {where_to_get(name)}")
    path = weights_file(name, weights)
    saved = read_weights(path, name)
    state_dict = saved.get("state_dict", saved) if isinstance(saved, dict) else saved  # open_clip's checkpoints
    if isinstance(state_dict, dict):  # OpenAI's archives keep three settings beside the weights
        state_dict = {k: v for k, v in strip_prefix(state_dict).items()
                      if k not in ("input_resolution", "context_length", "vocab_size")}
    # Loaded here, strictly: open_clip's own loader would resize a positional embedding of another size, silently
    with quiet_logging():  # open_clip warns that the model it builds is random: it is, until loaded below
        model = open_clip.create_model(arch)
    _load_exact(model, state_dict, path, name, saved)
    return model


@contextlib.contextmanager
def quiet_logging():
    """open_clip's log lines (Python's root logger) muted for a moment, where they would mislead."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def load_backbone(name, weights=None, log=print):
    """Build a pretrained backbone. Nothing is downloaded: real weights come from a local file (`weights`, else the
    official file name in weights_dir()) or, for open_clip, a pretrained tag already in the local hub cache; a missing
    or malformed file is a one-line error saying what is wrong and where to get the right one.

    name: one of BACKBONES. weights: a file path, or an open_clip pretrained tag such as 'openai'.
    """
    check_backbone(name, weights)
    if name in EMBEDDED_BACKBONES:
        clip = load_embedded_clip(name, log=log)
        return Backbone(clip.visual, clip, clip.tokenizer, key=weights_key(name, weights))
    if name in OPEN_CLIP_MODELS:
        clip = load_open_clip(name, weights)
        return Backbone(clip.visual, clip, open_clip.get_tokenizer(OPEN_CLIP_MODELS[name]), key=weights_key(name, weights))
    return Backbone(load_resnet50(name, weights_file(name, weights)), key=weights_key(name, weights))


def is_hub_tag(name, weights):
    """Whether `weights` names one of open_clip's pretrained tags for backbone `name` (such as 'openai'), not a file."""
    return bool(name in OPEN_CLIP_MODELS and weights and open_clip.get_pretrained_cfg(OPEN_CLIP_MODELS[name], str(weights)))


def check_backbone(name, weights=None, clip_for=None):
    """Fail before the dataset is listed if backbone `name` is unknown, its weights file is missing (load_backbone
    later checks what the file holds) or, when `clip_for` names what needs a text tower, it has none. (Listing
    ImageNet's 1.3 M files: ~1 s here from a warm page cache, measured on 128,000; more from a cold or network disk.)"""
    if name not in BACKBONES:
        raise SystemExit(f"error: unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)} (one of your own: "
                         "README, 'Another backbone')")
    if clip_for and name not in CLIP_BACKBONES:
        not_clip(clip_for, name)
    if name in WEIGHTS and not is_hub_tag(name, weights):
        weights_file(name, weights)
    elif name not in WEIGHTS and weights:  # it would be ignored
        raise SystemExit(f"error: --weights {weights}: {name} has no weights file (this project pretrains it on first "
                         f"use); drop --weights, or pass --backbone with one of: {', '.join(WEIGHTS)}")


def weights_record(name, weights):
    """Which weights a backbone loads: its file (resolved path, size, modification time), its hub tag, or for an
    embedded backbone its cached model, with hashes of its bytes and of its weights (a few MB: pretrained again, it
    keeps its path and size; pretrained again bit for bit, its weights, not its bytes: the file also holds the
    pretraining's time). Every results line carries it; the feature cache is keyed by it."""
    if is_hub_tag(name, weights):
        return {"tag": weights}
    embedded = name in EMBEDDED_BACKBONES
    path = embedded_cache_path(EMBEDDED_BACKBONES[name]) if embedded else weights_file(name, weights).resolve()
    if not path.exists():  # an embedded model is made on first use
        return {"file": str(path)}
    st = path.stat()
    hashes = embedded_hashes(str(path), st.st_size, st.st_mtime_ns) if embedded else {}
    return {"file": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, **hashes}


@functools.lru_cache(maxsize=8)
def embedded_hashes(path, size, mtime_ns):
    """The hashes of a cached embedded model's bytes and of its weights, once per version of the file (size and time
    in the key: setup, the first write, --resume and the feature cache ask for them)."""
    raw = Path(path).read_bytes()
    hashes = {"sha1": hashlib.sha1(raw).hexdigest()}
    try:
        weights = hashlib.sha1()
        for k, v in sorted(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)["state_dict"].items()):
            weights.update(k.encode() + v.numpy().tobytes())
        hashes["weights_sha1"] = weights.hexdigest()
    except Exception:  # not a model (cut short, say): loading it says so; its bytes' hash names it here
        pass
    return hashes


def same_weights(a, b):
    """Whether two weights_records name the same pretrained weights, wherever their files lay: one hub tag; one
    embedded model (the hash of its weights; records before it was, the hash of the file); files of one name and size.
    A record that does not say (a model not made yet) differs from none."""
    if "tag" in a or "tag" in b:
        return a.get("tag") == b.get("tag")
    for key in ("weights_sha1", "sha1"):
        if key in a and key in b:
            return a[key] == b[key]
    return "bytes" not in a or "bytes" not in b or (Path(a["file"]).name, a["bytes"]) == (Path(b["file"]).name,
                                                                                           b["bytes"])


def weights_key(name, weights):
    """A backbone's identity for the feature cache: its name and weights_record."""
    return ":".join([name, *map(str, weights_record(name, weights).values())])


def to_device(model, device):
    """Move a model to `device`; convolutional models also go channels-last: the layout GPU tensor cores want, and
    1.1-1.3x faster for the embedded conv tower on CPU (docs/benchmarks.md; ResNet-18 on CPU was 0.8x)."""
    model = model.to(device)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def extract_features(encoder, split, device, precision="auto", batch_size=500, cache=None, desc=None):
    """Features of every image of a split, in order, as float32 on the CPU (under torchrun each rank extracts its
    share of every batch, with rank 0's BatchNorm statistics, and all ranks get all features). With `cache` (a
    `feature_cache` key) they are read from, or written to, <cache dir>/features/, and extracted under a random state
    of their own, seeded by the key: the ID training split's random view is the same whenever it is extracted, and
    what the run draws next does not depend on whether the features were cached."""
    path = cache_dir() / "features" / f"{cache}.pt" if cache else None
    world, feats = data.rank_and_world()[1], None
    if path is not None and path.is_file():
        try:
            feats = torch.load(path, weights_only=True)
        except Exception as e:  # damaged after its atomic write (a disk error, a copy cut short): made again
            print(f"note: the cached features at {path} cannot be read ({unreadable(path, e)}); extracting them "
                  "again", file=sys.stderr)
    if path is not None and all_reduce_sum(float(feats is not None))[0] == world:  # decided together: a rank that
        return feats  # extracts alone would wait for the others forever
    if world > 1:  # DDP keeps each rank's BatchNorm running statistics of its last step; model.pt holds rank 0's
        for buffer in encoder.buffers():
            torch.distributed.broadcast(buffer, 0)
    if path is None:
        return _extract(encoder, split, device, precision, batch_size, desc)
    with data.seeded(int(cache, 16), device):
        feats = _extract(encoder, split, device, precision, batch_size, desc)
    if is_main():
        try:
            save_atomic(feats, path)
        except OSError as e:  # a cache others share, read-only: the run goes on with what it extracted
            print(f"note: could not cache the features at {path} ({e.strerror or e}); they are extracted again next "
                  "time: point RFT_CACHE at a folder you can write to keep them", file=sys.stderr)
    return feats


def _extract(encoder, split, device, precision, batch_size, desc):
    """extract_features without the cache. A compiled encoder gets every batch padded to the full size, so the last
    one does not make torch.compile build a second graph."""
    encoder.eval()
    static = isinstance(encoder, torch._dynamo.eval_frame.OptimizedModule)
    feats = []
    with autocast(device, precision):
        for x, _ in progress(split.batches(batch_size, device), desc or f"features of {len(split):,} images"):
            n, full = len(x), -(-batch_size // data.rank_and_world()[1])
            if n == 0:  # this rank's share of a last batch smaller than the number of ranks (a ViT refuses 0 rows)
                feats.append(all_gather(torch.zeros(0, encoder.output_dim, device=x.device)).cpu())
                continue
            x = torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))]) if static and n < full else x
            feats.append(all_gather(encoder(x)[:n].float()).cpu())
    return torch.cat(feats) if feats else torch.empty(0, encoder.output_dim)


def data_fingerprint(split):
    """A hash of a split's labels and of each image file's path, inode, size and modification time: swapping, moving,
    replacing or editing an image changes it (0.38 s per 128,000 files here, warm). Images in one array or HDF5 file
    (CIFAR-10, PCam) are covered by their reader's fingerprint: a hash of the pixels, or the file's identity."""
    h = hashlib.sha1(split.labels.numpy().tobytes())
    read = getattr(split, "read", None)
    if hasattr(read, "fingerprint"):
        h.update(read.fingerprint().encode())
    for item in split.items:
        try:
            st = os.stat(item) if isinstance(item, (str, os.PathLike)) else None
        except OSError:  # a missing file is reported by the loader, naming it
            st = None
        h.update(f"{item}\0{st and (st.st_ino, st.st_size, st.st_mtime_ns)}\n".encode())
    return h.hexdigest()


def feature_cache(backbone, dataset, split, device, precision, seed=0):
    """The cache key of a real dataset's split under a pretrained backbone, or None (the embedded world's features
    take seconds). It covers the weights, the split's images and labels (data_fingerprint), the preprocessing, where
    JPEGs are decoded (RFT_GPU_DECODE), the precision on `device` (a cache shared by a CPU and a GPU machine keeps
    their 'auto' apart) and the kind of device (their fp32 differs too); the ID training split's features depend on
    the seed too (one random augmented view per image, as the LP-FT code takes), unless its transform draws nothing
    (CIFAR-10): then every seed reads seed 0's features."""
    if dataset.name in data.WORLDS or backbone.key is None:
        return None
    part = {"id_train": dataset.train, **eval_splits(dataset)}[split]
    pre = data.preprocessing(dataset.backbone, dataset.name)
    if split == "id_train" and not data.augments(pre):  # one view for every seed: seed 0's key (its existing cache)
        seed = 0
    parts = [backbone.key, dataset.name, dataset.info.get("root"), split, len(part), data_fingerprint(part),
             repr(pre), resolve_precision(device, precision), seed if split == "id_train" else None]
    if pre.squash:  # (appended, not in repr: the keys of the other datasets' caches stay valid)
        parts.append(f"resized whole, training at {pre.squash:g} x the size")
    if torch.device(device).type != "cpu":  # a GPU's fp32 is not a CPU's: cuDNN convolves in TF32 by default
        parts.append(torch.device(device).type)  # (appended, not always there: the CPU caches' keys stay valid)
    if getattr(part, "decode_on_device", False):  # nvJPEG and tensor resizing give other pixels than PIL's
        parts.append("decoded on the device")  # (appended, not always there: the keys of existing caches stay valid)
    if split == "id_train":  # its crops come from each image's seed (data.SeededBatchIndices), no longer from the
        parts.append("crops seeded per image")  # loader workers' streams: features cached before are another view
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot heads: classifiers built from class names and prompt templates by a CLIP text tower
# ---------------------------------------------------------------------------------------------------------------
class ClassificationHead(nn.Linear):
    """A linear head on L2-normalised features (`normalize=True`), as CLIP classifies: with weight = logit scale x
    class text embeddings it is the zero-shot head; WiSE-FT's fine-tuning starts from it."""

    def __init__(self, weight, bias=None, normalize=True):
        super().__init__(weight.shape[1], weight.shape[0])
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias)

    def forward(self, features):
        return super().forward(F.normalize(features, dim=-1) if self.normalize else features)


@functools.lru_cache(maxsize=8)
def tokenize(tokenizer, texts):
    """Token ids of a tuple of texts, kept: FLYP and WiSE-FT rebuild the head many times (ImageNet: 80,000 captions,
    ~10 s of BPE in Python each time)."""
    return tokenizer(list(texts))


TEXT_BATCH = 1024  # captions per text-tower call (ImageNet's 80,000 in one: ~180 GiB of ViT-B/16 activations in fp32)


@torch.no_grad()
def zeroshot_weights(clip, tokenizer, classnames, templates, device, precision="auto"):
    """One embedding per class: every template filled with the class name, embedded by the text tower,
    L2-normalised, averaged over templates and normalised again (CLIP's recipe). Returns [classes, dim] float32."""
    texts = tuple(t.format(c) for c in classnames for t in templates)
    clip.eval()  # as _extract: no dropout in the head (FLYP rebuilds it mid-training; the loops set train mode again)
    with autocast(device, precision):
        emb = torch.cat([F.normalize(clip.encode_text(tokens.to(device)).float(), dim=-1)
                         for tokens in tokenize(tokenizer, texts).split(TEXT_BATCH)])
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)


def zeroshot_head(clip, tokenizer, classnames, templates, device, precision="auto"):
    """The zero-shot classifier of a CLIP model: logits = scale * normalise(f(x)) . class embeddings."""
    weight = clip.logit_scale.exp().detach().float() * zeroshot_weights(clip, tokenizer, classnames, templates, device,
                                                                         precision)
    return ClassificationHead(weight).to(device)


def require_clip(backbone, what):
    """The backbone, if it is a CLIP model (it has a text tower); otherwise a clear error."""
    if backbone.clip is None:
        not_clip(what, "this backbone")
    return backbone


def not_clip(what, name):
    raise SystemExit(f"error: {what} needs a CLIP backbone (a text tower to embed class names), and {name} has none; "
                     f"pass --backbone with one of: {', '.join(CLIP_BACKBONES)}")


# ---------------------------------------------------------------------------------------------------------------
# Device, precision, compile
# ---------------------------------------------------------------------------------------------------------------
CHOICES = {"precision": ("auto", "bf16", "fp32"), "compile": ("auto", "on", "off")}


def get_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown --device {name!r}; choose auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu...: a raw error after the data was read
        raise SystemExit(f"error: --device {name}: these scripts run on cpu or cuda (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} requested but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)  # else the pin-memory thread and nvJPEG's streams open a context on cuda:0 too
    return device


def compute_capability(device):
    """A CUDA device's compute capability, (0, 0) for a CPU. bf16 tensor cores came with 8.0 (A100; older GPUs
    emulate bf16, slower than fp32); Triton, which generates torch.compile's GPU kernels, needs 7.0 (V100)."""
    device = torch.device(device)
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else (0, 0)


def resolve_precision(device, precision="auto"):
    """'bf16' or 'fp32': what `precision` ('auto' | 'bf16' | 'fp32') means on `device` ('auto': bf16 on a GPU with
    bf16 tensor cores)."""
    if precision not in CHOICES["precision"]:
        raise SystemExit(f"error: unknown precision {precision!r}; choose {', '.join(CHOICES['precision'])}")
    if precision == "auto":
        return "bf16" if compute_capability(device) >= (8, 0) else "fp32"
    return precision


def autocast(device, precision="auto"):
    """The one precision context: bf16 autocast by default on a GPU with bf16 tensor cores, else full fp32
    ('auto' | 'bf16' | 'fp32')."""
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def maybe_compile(model, flag="auto", device="cpu"):
    """torch.compile the model (not the loop), or a model's method such as clip.encode_text, when flag is 'on', or
    'auto' on a GPU that Triton supports. Keep the unwrapped model for saving: compiled modules prefix their state
    dict with `_orig_mod.`.
    dynamic=False: shapes are static by design (training drops the last partial batch, evaluation pads), so each
    mode gets one graph specialised to its batch; by default the second shape seen (evaluation's batch after
    training's) makes torch.compile build that graph for any batch size, with generic kernels."""
    if flag == "on" or (flag == "auto" and compute_capability(device) >= (7, 0)):
        return torch.compile(model, dynamic=False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=N <script>.py ...` trains with DistributedDataParallel. Batch sizes
# stay global (each rank takes its share of every batch, data.BatchIndices), evaluation features are gathered, and
# only rank 0 writes results.
# ---------------------------------------------------------------------------------------------------------------
def init_distributed(device):
    """Join torchrun's process group (WORLD_SIZE > 1): NCCL with one GPU per rank, gloo on CPUs. Returns the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(torch.distributed.destroy_process_group)
    return device


def is_main():
    return data.rank_and_world()[0] == 0


def distribute(module, device):
    """`module` wrapped in DistributedDataParallel (gradients averaged over ranks) when there are several processes,
    else `module` itself. BatchNorm normalises each rank's share with its own statistics, as the reference code's
    nn.DataParallel does per GPU; the running statistics are rank 0's (DDP broadcasts them at each forward, and
    extract_features once more before evaluating, since the last step leaves each rank its own).
    A compiled model inside still overlaps the gradient all-reduce with the backward: Dynamo compiles it during DDP's
    forward and splits its graph at DDP's gradient buckets (DDPOptimizer)."""
    if data.rank_and_world()[1] == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def shard(tensor):
    """This rank's share of a tensor that describes a whole global batch (the same split as data.BatchIndices)."""
    rank, world = data.rank_and_world()
    return tensor.tensor_split(world)[rank]


class _AllGather(torch.autograd.Function):
    """Rows of every rank, in rank order; the backward sums the gradient over ranks (every rank's loss depends on
    every row) and returns this rank's rows, so the gradient equals one process's on the whole batch."""

    @staticmethod
    def forward(ctx, x, total):
        rank, world = data.rank_and_world()
        if total is None:  # shares unknown (the last evaluation batch may be uneven): ask the ranks, and wait for them
            sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
            torch.distributed.all_gather(sizes, torch.tensor([len(x)], device=x.device))
            sizes = [int(n) for n in sizes]
        else:  # the shares of `total` rows, split as shard() splits them: nothing to ask, the host does not wait
            sizes = [len(share) for share in torch.arange(total).tensor_split(world)]
            if sizes[rank] != len(x):
                raise ValueError(f"all_gather: rank {rank} has {len(x)} rows, but its share of {total} is "
                                 f"{sizes[rank]}")
        padded = x if len(x) == max(sizes) else torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(world)]  # all_gather needs equal shapes
        torch.distributed.all_gather(parts, padded.contiguous())
        ctx.start, ctx.size = sum(sizes[:rank]), len(x)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.size], None


def all_gather(x, total=None):
    """Every rank's rows of `x` concatenated (differentiable); `x` itself in a single process. Pass `total`, the
    global row count, where it is known (a training batch): otherwise the ranks exchange their row counts first, and
    reading them makes the host wait for the device once per call."""
    return x if data.rank_and_world()[1] == 1 else _AllGather.apply(x, total)


def all_reduce_sum(*values):
    """Python numbers summed over ranks (training-loss totals); unchanged in a single process."""
    if data.rank_and_world()[1] == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return tuple(t.tolist())


def check_training_loss(loss, epoch, lr):
    """Stop a run whose epoch's training loss is no longer a number: it diverged, every later epoch would train NaN
    weights, and a finished run would be filed (its `done` marker) as a result of the recipe. What came before stays:
    the earlier epochs' results lines and resume point."""
    if not math.isfinite(loss):
        raise SystemExit(f"error: the training loss of epoch {epoch} is {loss}: the run diverged; train with a lower "
                         f"--lr than {lr:g}")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and feature distortion
# ---------------------------------------------------------------------------------------------------------------
def eval_splits(dataset):
    """The evaluation splits of a dataset in a fixed order: ID val, ID test, then each OOD test."""
    return {"id_val": dataset.val, "id_test": dataset.test, **{f"ood_{k}": v for k, v in dataset.ood.items()}}


def split_features(encoder, dataset, device, precision="auto", only=None, pretrained=None):
    """Features on every evaluation split (or the splits named in `only`). Of the pretrained encoder, they are the
    origin of feature distortion: pass its Backbone as `pretrained` and a real dataset's are cached on disk (a
    fine-tuned encoder's never are: they are new at each evaluation)."""
    def cache(k):
        return feature_cache(pretrained, dataset, k, device, precision) if pretrained else None

    return {k: extract_features(encoder, s, device, precision, cache=cache(k), desc=f"features {k}")
            for k, s in eval_splits(dataset).items() if only is None or k in only}


def distortion(features, ref):
    """How far features moved from the pretrained ones: mean ||f(x) - f0(x)||^2 / mean ||f0(x)||^2.
    (The LP-FT paper's diagnostic is the mean squared change; dividing by the mean squared norm makes it
    comparable across backbones.)"""
    return ((features - ref) ** 2).sum(1).mean().item() / (ref ** 2).sum(1).mean().clamp_min(1e-12).item()


def macro_f1(pred, labels):
    """Mean F1 over the classes present in `labels` (WILDS' iWildCam metric: scikit-learn's f1_score, average='macro',
    labels=unique(y_true)); a class never predicted scores 0."""
    scores = []
    for c in labels.unique():
        hit, true = pred == c, labels == c
        tp, fp, fn = (hit & true).sum(), (hit & ~true).sum(), (~hit & true).sum()
        scores.append(2 * tp / (2 * tp + fp + fn))
    return 100.0 * torch.stack(scores).float().mean().item()


def worst_group_acc(pred, labels, groups, names):
    """The lowest accuracy over the groups present, 'Other' excluded (WILDS' FMoW worst-region accuracy)."""
    accs = [(pred[groups == g] == labels[groups == g]).float().mean().item() for g in groups.unique().tolist()
            if names[g] != "Other"]
    return 100.0 * min(accs) if accs else float("nan")


@torch.inference_mode()
def evaluate(features, classify, dataset, ref, device):
    """Accuracy and feature distortion on the splits in `features` (split_features of the current encoder), with
    `classify` mapping features to logits; `ref` holds the pretrained encoder's split_features. A split scored on a
    class subset (ImageNet-R/-A) takes the argmax over those classes' logits only. The head runs in fp32, also under
    an enclosing autocast: it costs nothing next to the encoder, and bf16 logits (8 significant bits) flip near-ties.
    Keys: acc/<split>, distortion/<split>, the dataset's own metric where it has one (macro_f1/<split> for
    iWildCam, worst_region_acc/<split> for FMoW), and <key>/ood_avg over the OOD splits."""
    metrics = {}
    for name, split in eval_splits(dataset).items():
        if name not in features:
            continue
        feats = features[name]
        with torch.autocast(torch.device(device).type, enabled=False):
            logits = classify(feats.to(device).float()).float().cpu()
        pred = logits.argmax(1) if split.classes is None else split.classes[logits[:, split.classes].argmax(1)]
        metrics[f"acc/{name}"] = 100.0 * (pred == split.labels).float().mean().item()
        if dataset.metric == "macro_f1":
            metrics[f"macro_f1/{name}"] = macro_f1(pred, split.labels)
        if dataset.metric == "worst_region_acc" and split.groups is not None:
            metrics[f"worst_region_acc/{name}"] = worst_group_acc(pred, split.labels, split.groups, split.group_names)
        metrics[f"distortion/{name}"] = distortion(feats, ref[name])
    for key in dict.fromkeys(("acc", dataset.metric, "distortion")):
        ood = [v for k, v in metrics.items() if k.startswith(f"{key}/ood_")]
        if ood:
            metrics[f"{key}/ood_avg"] = sum(ood) / len(ood)
    return metrics


def format_metrics(metrics):
    acc = " ".join(f"{k[4:]} {v:.1f}" for k, v in metrics.items() if k.startswith("acc/"))
    dist = " ".join(f"{k[11:]} {metrics[k]:.4f}" for k in ("distortion/id_test", "distortion/ood_avg") if k in metrics)
    return f"acc: {acc}" + (f" | distortion {dist}" if dist else "")


# ---------------------------------------------------------------------------------------------------------------
# Results: one JSON line per evaluation, a `done` marker per run, checkpoints; all written atomically
# ---------------------------------------------------------------------------------------------------------------
def git_commit():
    """HEAD of the repository holding this file; "-dirty" when a tracked file changed or the script that runs, beside
    this file, is not tracked (a new method file: HEAD does not hold it). None outside git, or where common.py is not
    tracked (a copy inside another project, whose commits do not hold this code)."""
    here = Path(__file__).resolve().parent

    def git(*args):  # no optional locks: `git status` would write .git/index, racing the other ranks and the user
        return subprocess.run(["git", "--literal-pathspecs", *args], cwd=here, capture_output=True, text=True,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or git("ls-files", "--error-unmatch", Path(__file__).name).returncode != 0:
            return None
        script = Path(sys.argv[0]).resolve()
        new = script.parent == here and script.is_file() and git("ls-files", "--error-unmatch", script.name).returncode
        dirty = new or git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return None


def host():
    """The CPU model and torch's thread count: CPU float results depend on both (the kernels differ by instruction
    set, sums split by thread), so the embedded model pretrained on two machines differs, and so do its numbers."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "threads": torch.get_num_threads()}


class Results:
    """Appends one JSON line per evaluation to <out>/results.jsonl; each line carries the run's args, git commit,
    library versions, device, host and seed so that every number traces back to its command. Under torchrun only
    rank 0 writes (every rank holds the same metrics)."""

    def __init__(self, out_dir, method, args, device):
        wait_for_writes()  # a run this process stopped (in a notebook, say) has its last resume.pt written before
        # this one looks for it or clears the folder of unfinished writes
        self.writing, self.snapshot = None, None  # the background write of resume.pt under way, and what it writes
        self.dir = Path(out_dir)
        self.path = self.dir / "results.jsonl"
        self.writes, self.started, self.device = is_main(), False, device
        self.classnames = None  # set by describe(); kept in model.pt (WiSE-FT checks them)
        self.weights_of = None  # (backbone, --weights), set by setup(): the header's `weights` says which file
        # Checked now, not at the first write after an epoch of training: the folder must be one we can create.
        existing = next(p for p in (self.dir.absolute(), *self.dir.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise SystemExit(f"error: --out {out_dir}: {existing} is a file; pass a folder (it is created if missing)")
        try:  # a folder made and removed: os.access says yes to root, also on a read-only mount or in /proc
            tempfile.TemporaryDirectory(dir=existing, prefix=".rft-probe").cleanup()
        except OSError as e:
            raise SystemExit(f"error: --out {out_dir}: cannot write in {existing} ({e.strerror}); pass a folder you can "
                             "write to") from None
        if self.writes and self.dir.is_dir():  # else held at the first write, which makes the folder
            hold_folder(self.dir)
        self.header = {"method": method, "args": dataclasses.asdict(args), "seed": args.seed, "commit": git_commit(),
                       "versions": {"torch": str(torch.__version__), "open_clip": open_clip.__version__,
                                    "python": sys.version.split()[0]},
                       "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
                       "host": host(),
                       "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                       "processes": data.rank_and_world()[1]}
        self.pending = self._find_resume_point(method, args) if vars(args).get("resume") else None

    def _start(self, keep=()):
        """At the first write: a new run in an old folder keeps the old files aside, never mixes them with its own or
        loses them. Not before: a run that fails before its first evaluation leaves a finished folder as it was.
        `keep`: the files a resumed run goes on with."""
        if self.started:
            return
        self.started = True
        if self.weights_of:  # taken again: an embedded model the run pretrained after setup() exists by now
            self.header["weights"] = weights_record(*self.weights_of)
        self.dir.mkdir(parents=True, exist_ok=True)
        hold_folder(self.dir)
        n = next_aside(self.dir, ("results", "model", "resume", "done"))  # an earlier run's files, under one N
        # resume.pt: an interrupted run's, not resumed; done: a finished run's selected evaluation
        for name in ("results.jsonl", "model.pt", "resume.pt", "done"):
            old = self.dir / name
            if old.exists() and name not in keep:
                aside = self.dir / f"{old.stem}.previous{n}{old.suffix}"
                os.replace(old, aside)
                print(f"note: {old} of an earlier run is kept as {aside.name}", file=sys.stderr)

    def log(self, step, metrics, **extra):
        writes = self.writes and self.pending is None  # a resumed run's lines before resume() are in resume.pt already
        if writes:
            self._start()  # first: it completes the header
        record = {**self.header, "step": step, **extra, "metrics": metrics, "time": time.time()}
        if writes:
            old = self.path.read_text() if self.path.exists() else ""
            write_text_atomic(self.path, old + json.dumps(record) + "\n")
        return record

    def save_model(self, model, **extra):
        """<out>/model.pt: the unwrapped model's state dict, on the CPU (a plain torch.load reads it on any machine),
        plus the header (method, args, commit) that made it and the class names."""
        if self.writes:
            self._start()
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            save_atomic({**self.header, **extra, "classnames": self.classnames, "state_dict": state},
                        self.dir / "model.pt")

    # --resume: after each epoch, <out>/resume.pt holds what the loop needs to go on as if never stopped. `training`
    # names the objects whose state that is: the model, optimizer, scheduler and the data order's generator.
    def save_for_resume(self, epoch, best, training, unit="epoch"):
        """Write <out>/resume.pt: the state after `epoch` (the loop's `unit`s finished: few-shot FLYP counts draws),
        what the loop carries on (`best`: the best epoch so far, val accuracy, epoch and weights; few-shot FLYP: the
        draws' records), the global RNG states and the results lines written so far (one file, replaced atomically)."""
        if self.writes:
            self._start()
            self._written()  # one write at a time (its copy is then free to reuse); one that failed stops the run here
            state = {k: v.get_state() if isinstance(v, torch.Generator) else v.state_dict()
                     for k, v in training.items()}
            self.snapshot = cpu_copy({"method": self.header["method"], "args": self.header["args"],
                                      "commit": self.header["commit"], **self._made_with(), "epoch": epoch,
                                      "unit": unit, "best": best, "training": state, "rng": rng_states(self.device),
                                      "lines": self.path.read_text()}, into=self.snapshot)
            self.writing = BackgroundWrite(save_atomic, self.snapshot, self.dir / "resume.pt")

    def _written(self):
        """Wait for the background write of resume.pt, if one is under way; raise its error."""
        writing, self.writing = self.writing, None
        if writing is not None:
            writing.result()

    def _made_with(self):
        """The recipe and data sizes describe() recorded: a resumed run must have the same."""
        return {"recipe": self.header.get("recipe"), "sizes": self.header.get("data", {}).get("sizes")}

    def resume(self, training):
        """(best, first epoch) to start the loop with: (None, 1) for a new run; for --resume, the state resume.pt holds
        is put back into `training` (and the global RNGs), the results file is its lines, and the loop goes on after
        its epoch. What the run did before this call (LP-FT's probe, say) was redone but not written again."""
        if self.pending is None:
            return None, 1
        ckpt, self.pending = in_todays_terms(torch.load(self.pending, map_location="cpu", weights_only=True)), None
        now = self._made_with()
        for key, what in (("recipe", "recipe"), ("sizes", "data (split sizes)")):  # RECIPES edited, another data root
            if ckpt[key] != now[key]:
                then, here = ckpt[key] or {}, now[key] or {}  # a recipe flag left out, or RECIPES edited: pass it
                flags = " ".join(f"{as_flag(k)} {v}" for k, v in then.items() if here.get(k) != v)
                fix = (f"pass {flags}, as it ran" if key == "recipe" and flags
                       else "resume with the code and data it was started with")
                raise SystemExit(f"error: --resume: {self.dir}: its resume.pt was made with the {what} "
                                 f"{key_values(ckpt[key])}, this run's is {key_values(now[key])}; {fix}, or move "
                                 f"{self.dir / 'resume.pt'} aside to start from the beginning")
        lines = ckpt["lines"].splitlines()  # each results line records the pretrained weights of its run
        then = json.loads(lines[0]).get("weights") if lines else None
        here = weights_record(*self.weights_of) if self.weights_of else self.header.get("weights")
        if then and here and not same_weights(then, here):  # the distortion origin would move, too
            was, loads = then.get("tag") or then["file"], here.get("tag") or here["file"]
            if was == loads and "sha1" in then and "sha1" in here:  # an embedded model made again
                loads += ", pretrained again since; pretrain.py --force keeps the one it replaces beside it"
            raise SystemExit(f"error: --resume: {self.dir}: its epochs were fine-tuned from other pretrained weights "
                             f"({was}) than this run loads ({loads}); resume with the weights (and RFT_CACHE) it "
                             f"started with, or move {self.dir / 'resume.pt'} aside to start from the beginning")
        for k, v in training.items():  # a torch.Generator has get/set_state; the others, a state dict
            if isinstance(v, torch.Generator):
                v.set_state(ckpt["training"][k])
            else:
                v.load_state_dict(ckpt["training"][k])
        set_rng_states(ckpt["rng"], self.device)
        if self.writes:
            self._start(keep=("results.jsonl", "resume.pt"))
            write_text_atomic(self.path, ckpt["lines"])
            unit = ckpt.get("unit", "epoch")  # a resume.pt from before units were named: epochs
            print(f"note: resuming {self.dir} (resume.pt; {unit}s finished: {ckpt['epoch']})", file=sys.stderr)
        return ckpt["best"], ckpt["epoch"] + 1

    def _find_resume_point(self, method, args):
        """For --resume: the path of resume.pt, checked (the same method and options), or None to start from the
        beginning (there is none yet: the run stopped in its first epoch, or never started)."""
        path, where = self.dir / "resume.pt", f"--resume: {self.dir}"
        ckpt, problem, found = None, None, None  # found: what this rank found instead of a resume.pt it could read
        if (self.dir / "done").is_file():
            problem = (f"error: {where} holds a finished run (its `done` marker) and nothing to resume; drop --resume "
                       "to run it again (its files are kept aside)")
            found = "a finished run's `done` marker"
        elif path.is_file():
            try:  # mapped: its weights (2.4 GB for FLYP's ViT-B/16) are read by resume(), after the data and the model
                ckpt = in_todays_terms(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # written by another torch, say
                problem = (f"error: {where}: could not read resume.pt ({unreadable(path, e)}); move {path} aside to "
                           "start from the beginning")
                found = "a resume.pt it could not read"
        same_resume_point_on_every_rank(path, ckpt, found)  # before a rank stops: the others would wait for it
        if problem:
            raise SystemExit(problem)
        if ckpt is None:
            if self.writes:
                print(f"note: {where} holds no resume.pt: starting from the beginning", file=sys.stderr)
            return None
        if ckpt["method"] != method:
            raise SystemExit(f"error: {where}: its resume.pt is {ckpt['method']}'s, not {method}'s; pass the --out of "
                             f"a {method} run, or move {path} aside to start from the beginning")

        def flag(name, value):  # as a command line says it
            if value is None:
                return f"no {as_flag(name)}"
            if isinstance(value, bool):
                return as_flag(name) if value else as_flag(f"no_{name}")
            return f"{as_flag(name)} {value}"

        # where it runs, not what it computes; and the recipe's flags: resume() compares the recipe they make
        free = {*WHERE_IT_RUNS, *(ckpt["recipe"] or {})}
        now = dataclasses.asdict(args)
        changed = [f"{flag(k, now.get(k))} (it ran with {flag(k, v)})" for k, v in ckpt["args"].items()
                   if k not in free and now.get(k) != v]
        changed += [f"{flag(k, now[k])} (it ran with {flag(k, v)})" for k, v in (ckpt["recipe"] or {}).items()
                    if now.get(k) is not None and now[k] != v]  # a recipe flag given: said now, not after the data
        if changed:
            raise SystemExit(f"error: {where}: its resume.pt comes from a run with other options: "
                             f"{', '.join(changed)}; resume with the options it was started with, or move {path} aside "
                             "to start from the beginning")
        if ckpt["commit"] != self.header["commit"] and self.writes:  # each results line says which code made it
            print(f"note: {where}: its resume.pt was written at commit {ckpt['commit']}; the code here is at "
                  f"{self.header['commit']}", file=sys.stderr)
        return path

    def done(self, final):
        """Mark the run finished; the marker holds the selected evaluation (what tables report)."""
        recipe, args = self.header.get("recipe"), self.header["args"]
        record = {"method": self.header["method"], "dataset": args["dataset"], "seed": self.header["seed"],
                  "commit": self.header["commit"], "backbone": self.header.get("data", {}).get("backbone"),
                  "weights": self.header.get("weights"), "recipe": recipe, "options": run_options(args, recipe),
                  **final}  # backbone, weights, recipe, options: what summarize.py checks before it averages seeds
        if self.writes:
            self._start()
            try:
                self._written()  # before resume.pt goes: else it could be written again after
            except Exception as e:  # the run has finished: the last resume.pt is not needed
                print(f"note: {self.dir / 'resume.pt'} of the last epoch was not written ({e}); the run finished, "
                      "so nothing is lost", file=sys.stderr)
            write_text_atomic(self.dir / "done", json.dumps(record) + "\n")
            (self.dir / "resume.pt").unlink(missing_ok=True)  # a finished run has nothing to resume
            release_folder(self.dir)  # the run is over: the folder is free for the next


def run_options(args, recipe):
    """The options of a run (a dict of its Args) that make its result what it is, besides its recipe, dataset, seed
    and pretrained weights (recorded on their own): L2-SP's alpha, LP's C grid, the precision..."""
    return {k: v for k, v in args.items() if k not in {*WHERE_IT_RUNS, *SEED_BY_SEED, *(recipe or {})}}


def other_settings(done, module, dataset):
    """How a finished run's `done` marker differs from what `python <method>.py --dataset <dataset>` runs (its
    recipe and default options), as flags: '--epochs 1 (not 2)', ...; [] where it does not (or does not say). Only
    flags both know count: one added to Args since the run, or dropped, is no difference."""
    args, defaults = module.Args(dataset=dataset), getattr(module, "RECIPES", {}).get(dataset)
    made = recipe(args, defaults) if defaults else None
    wanted = {"recipe": made, "options": run_options(dataclasses.asdict(args), made)}
    return [f"{as_flag(k)} {v} (not {wanted[field][k]})" for field in wanted
            for k, v in (done.get(field) or {}).items() if k in (wanted[field] or {}) and wanted[field][k] != v]


def why_run_again(out, module, dataset, seed):
    """For run_all.sh: why the run in `out` starts afresh (its files kept aside) instead of being skipped as finished
    or going on with --resume: its `done` marker, or the resume.pt of a run stopped before it finished, comes from
    other settings than `python <method>.py --dataset <dataset> --seed <seed>` (a quick run by hand in that folder,
    say: --epochs 1, --backbone embedded-clip-tiny, another weights file), or its marker cannot be read. None: skip it,
    or go on."""
    done, resume = Path(out, "done"), Path(out, "resume.pt")
    if done.is_file():
        try:
            record = json.loads(done.read_text())
        except (OSError, ValueError):  # no run wrote it (they write atomically): summarize.py would refuse it
            record = None
        if not isinstance(record, dict) or {"method", "dataset", "seed", "metrics"} - record.keys():
            return "its done marker is not a finished run's"
        # the backbone a `done` records is resolved; not compared for WiSE-FT (its checkpoint's), nor for a CLIP one
        # by hand where the default has no text tower (run_all.sh's own FLYP or zero-shot run cannot run there)
        backbone, done_on = data.default_backbone(dataset), record.get("backbone")
        if hasattr(module.Args, "checkpoint") or done_on in CLIP_BACKBONES and backbone not in CLIP_BACKBONES:
            backbone = None
        differ = [f"{as_flag(k)} {v} (not {want})" for k, v, want in (
            ("seed", record["seed"], seed), ("backbone", done_on, backbone)) if None not in (v, want)
            and v != want] + other_settings(record, module, dataset)
        if record.get("weights") and backbone is not None and done_on == backbone and \
                backbone not in EMBEDDED_BACKBONES:  # an embedded model made again is a matter for its note
            try:
                want = weights_record(backbone, None)
            except SystemExit:  # no default file: run_all.sh's own run would say so
                want = {}
            if "bytes" in want and not same_weights(record["weights"], want):
                had = record["weights"].get("tag") or record["weights"].get("file")
                differ.append(f"--weights {had} (not {want['file']})")
        return f"done with other settings than run_all.sh's: {', '.join(differ)}" if differ else None
    if not resume.is_file():
        return None
    try:
        ckpt = in_todays_terms(torch.load(resume, map_location="cpu", weights_only=True, mmap=True))
        made = {"recipe": ckpt["recipe"], "options": run_options(ckpt["args"], ckpt["recipe"])}
    except Exception:  # unreadable: --resume says so, and what to do
        return None
    now = dataclasses.asdict(module.Args(dataset=dataset, seed=seed))  # --resume compares these as given
    differ = [f"{as_flag(k)} {v} (not {'the default' if now[k] is None else now[k]})" for k, v in ckpt["args"].items()
              if k in SEED_BY_SEED and k in now and v != now[k]] + other_settings(made, module, dataset)
    return f"its resume.pt is from a run with other settings than run_all.sh's: {', '.join(differ)}" if differ else None


def in_todays_terms(ckpt):
    """A resume.pt of older code as today's code writes it: few-shot FLYP was `flyp-fewshot` before 822b093, and its
    --shots a flag outside its recipe before 6c6679a (an interrupted run of either goes on)."""
    method = {"flyp-fewshot": "flyp_fewshot"}.get(ckpt.get("method"), ckpt.get("method"))
    if method == "flyp_fewshot" and ckpt.get("recipe") is not None and "shots" not in ckpt["recipe"]:
        ckpt = {**ckpt, "recipe": {"shots": ckpt["args"]["shots"], **ckpt["recipe"]},
                "args": {**ckpt["args"], "shots": None}}
    return {**ckpt, "method": method}


def same_resume_point_on_every_rank(path, ckpt, found=None):
    """Under torchrun rank 0 writes resume.pt and every rank reads it. A rank that finds none (--out on a node's own
    disk) or another one (a stale copy) would go on from elsewhere, and the ranks' collectives would no longer pair up:
    a hang, or a run that mixes two; one that stops alone (a `done` marker on its node: `found`) leaves the others
    waiting. Every rank stops instead, saying what each found."""
    world = data.rank_and_world()[1]
    if world == 1:
        return
    if found is None and ckpt is None:
        found = "no resume.pt"
    elif found is None:  # its results lines carry each evaluation's time: another run's (or epoch's) file differs
        lines = hashlib.blake2b(ckpt["lines"].encode(), digest_size=4).hexdigest()
        found = f"resume.pt with {ckpt.get('unit', 'epoch')}s finished: {ckpt['epoch']} (results lines {lines})"
    views = [None] * world
    torch.distributed.all_gather_object(views, (platform.node(), found))
    if len({found for _, found in views}) > 1:
        seen = "; ".join(f"rank {rank} on {node}: {found}" for rank, (node, found) in enumerate(views))
        raise SystemExit(f"error: --resume: the ranks found different resume points at {path} ({seen}). Only rank 0 "
                         "writes it and every rank reads it: pass an --out on a file system that every node shares")


WHERE_IT_RUNS = ("resume", "out", "device", "compile", "save", "data_root")  # options that do not change a result
SEED_BY_SEED = ("dataset", "seed", "backbone", "weights", "checkpoint")  # each seed's own, or compared on their own
HELD = {}  # the --out folders this process holds -> the descriptor that holds each
RUN_FILES = ("results.jsonl", "done", "model.pt", "resume.pt")  # what a run writes atomically into its --out


def hold_folder(path):
    """Lock a run's --out folder, or stop if another process holds it: two runs writing into one folder at once would
    mix their results lines and put their files over each other's. flock: the lock goes when the process ends,
    however it ends; where there are no such locks (Windows, some network file systems) runs go on without."""
    key = os.path.realpath(path)
    if fcntl is None or key in HELD:  # one process runs one method at a time: its next run takes the folder over
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"error: --out {path}: another run is writing there now; wait for it to finish, or pass "
                         "another --out") from None
    except OSError:  # this file system has no locks
        os.close(fd)
        return
    HELD[key] = fd
    for name in RUN_FILES:  # what a killed run was writing (write_atomic's <name>.tmp<pid>); other files are not ours
        for tmp in Path(path).glob(f"{name}.tmp*"):
            if re.fullmatch(rf"{re.escape(name)}\.tmp\d+", tmp.name):
                tmp.unlink(missing_ok=True)


def release_folder(path):
    """Unlock a folder hold_folder locked (unlocked, not only closed: loader workers forked meanwhile hold copies of
    the descriptor, which would keep the lock while they live)."""
    fd = HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_text_atomic(path, text):
    write_atomic(path, lambda tmp: tmp.write_text(text))


def select_best(records, key="acc/id_val"):
    """Model selection on ID validation accuracy only (never an OOD split); ties go to the earlier evaluation."""
    return max(records, key=lambda r: (r["metrics"][key], -r["step"]))


# ---------------------------------------------------------------------------------------------------------------
# Arguments: a dataclass whose field docstrings become --help
# ---------------------------------------------------------------------------------------------------------------
def _field_docs(cls):
    """Map each field of a dataclass to the string literal written right below it in the source."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def parse_args(cls, argv=None, description=None, recipes=None):
    """Build an argparse parser from a dataclass: one --flag per field (underscores become dashes), the field's
    docstring as help, its default shown; booleans get --flag / --no-flag. `recipes` (a method's RECIPES: dataset ->
    defaults) is listed at the end of --help, where the fields it sets say their default comes from."""
    import argparse

    epilog = None
    if recipes:
        width = max(map(len, recipes)) + 2
        epilog = "RECIPES (each dataset's defaults; a flag overrides them):\n" + "\n".join(
            f"  {name:<{width}}" + key_values(r) for name, r in recipes.items())
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # wiseft.py --alpha 0.25 ran as --alpha-step 0.25
    docs = _field_docs(cls)
    listed = {"dataset": data.DATASETS, "backbone": BACKBONES}  # checked where they are used, listed here
    from_recipes = {k for r in (recipes or {}).values() for k in r}
    for f in dataclasses.fields(cls):
        flag = as_flag(f.name)
        choices = f"; one of: {', '.join(listed[f.name])}" if f.name in listed else ""
        # a recipe's field and a None default: their help says what the default is ("the dataset's recipe")
        default = "" if f.name in from_recipes or f.default is None else f" (default: {f.default})"
        help_ = f"{docs.get(f.name, '')}{choices}{default}"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            kind = kind if kind in (int, float, str) else str
            parser.add_argument(flag, type=kind, default=f.default, help=help_, metavar=f.name.upper())
    return cls(**vars(parser.parse_args(argv)))


COUNTS = ("epochs", "batch_size", "num_c", "max_iter", "shots", "draws")  # at least 1 (few-shot --steps 0 = zero-shot)
POSITIVE = ("c_min", "c_max")  # above 0; every other number of an Args may be 0, none negative (nor inf, nor NaN)
BELOW_1 = ("momentum",)  # and below 1: SGD with momentum 1 or more never forgets a gradient and grows


def check_args(args):
    """Refuse an impossible option before anything runs, naming the flag and what it takes (a zero batch size
    would otherwise surface as a ZeroDivisionError minutes later, --compile maybe as silence)."""
    for f in dataclasses.fields(args):
        value, flag = getattr(args, f.name), as_flag(f.name)
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise SystemExit(f"error: {flag} {value!r}: choose {', '.join(CHOICES[f.name])}")
        if value == "" and f.default is None:  # `--data-root $DATA` with DATA unset would quietly mean the default
            raise SystemExit(f"error: {flag} is empty; pass a value or leave the flag out")
        if value is None or isinstance(value, (bool, str)):
            continue
        if f.name in COUNTS:
            ok, what = value >= 1, "at least 1"
        elif f.name in POSITIVE:
            ok, what = value > 0, "above 0"
        elif f.name == "seed":
            ok, what = 0 <= value < 2 ** 32, "from 0 to 2**32 - 1 (numpy's range)"
        elif f.name in BELOW_1:
            ok, what = 0 <= value < 1, "0 or more and below 1"
        else:
            ok, what = value >= 0, "0 or more"
        if not math.isfinite(value):
            raise SystemExit(f"error: {flag} {value}: must be a finite number, {what}")
        if not ok:
            raise SystemExit(f"error: {flag} {value}: must be {what}")
    if getattr(args, "c_min", 0) > getattr(args, "c_max", 1):  # would sweep the same grid, but backwards
        raise SystemExit(f"error: --c-min {args.c_min} is above --c-max {args.c_max}: the sweep runs from min to max")
    if getattr(args, "num_c", 2) == 1 and args.c_min != args.c_max:  # logspace(min, max, 1) is [min]: max unused
        raise SystemExit(f"error: --num-c 1 would fit --c-min {args.c_min} only (--c-max {args.c_max} unused); pass "
                         "the one C as both --c-min and --c-max")


def recipe(args, defaults):
    """A dataset's recipe (a method file's RECIPES entry) with every flag the user set in its place."""
    return {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}


def describe(dataset, results, log, recipe=None):
    """Say what the run trains and is scored on, and put it in every results line: split sizes, where a held-out
    split comes from (benchmarks without an ID validation split), the data root, the recipe actually used. More than
    a log line: --resume compares this header, `done` records it, and --save stores the class names that wiseft.py
    checks. A batch size the training split cannot fill stops the run here, not after LP-FT's first stage."""
    if recipe and "batch_size" in recipe:
        data.check_training_batch(len(dataset.train), recipe["batch_size"])
    sizes = {"id_train": len(dataset.train), **{k: len(v) for k, v in eval_splits(dataset).items()}}
    results.header.update(data={"name": dataset.name, "backbone": dataset.backbone, "sizes": sizes, **dataset.info},
                          recipe=recipe)
    results.classnames = list(dataset.classnames)
    held = [f"{k}: {v}" for k, v in dataset.info.items() if k in ("val", "test")]
    log(f"{dataset.name} with {dataset.backbone}: " + ", ".join(f"{k} {n:,}" for k, n in sizes.items())
        + (f" ({'; '.join(held)})" if held else "")
        + (" | recipe: " + key_values(recipe) if recipe else ""))
    if len(dataset.val) < 10 * len(dataset.classnames):  # one image more or less right moves the choice
        log(f"note: ID validation holds {len(dataset.val):,} images for {len(dataset.classnames):,} classes: what is "
            "chosen on it (the epoch, LP's C) rests on few images; give it 10 or more per class")
    if dataset.name == "embedded-tiny":  # its numbers would otherwise look like a result
        log(f"note: embedded-tiny is the tests' smoke world (its CLIP is pretrained for "
            f"{EMBEDDED_BACKBONES['embedded-clip-tiny'].steps} steps): accuracies sit near chance and compare nothing; "
            "use --dataset embedded for results")


def check_method_name(method, caller):
    """A script beside this file that calls setup itself (`caller`: the file that did) runs as its own name, or a
    variant of it (ft.py's ft-zeroshot-head): a copy of ft.py still calling itself ft would put its runs over FT's and
    its numbers in FT's table row."""
    script = Path(getattr(sys.modules["__main__"], "__file__", None) or ".")
    if script.suffix != ".py" or script.absolute() != Path(caller).absolute() or \
            script.absolute().parent != Path(__file__).absolute().parent:
        return  # imported (the tests, a sweep calling ft.main, a notebook): its caller names the runs
    if method != script.stem and not method.startswith(script.stem + "-"):
        raise SystemExit(f"error: {script.name} runs as the method {method!r}, whose run folders (runs/{method}/...) "
                         f"and table row are another script's; name a copy after its file: common.setup(args, "
                         f"\"{script.stem}\") (run_all.sh writes its runs under <ROOT>/{script.stem}/)")


def setup(args, method, clip_for=None):
    """Check the options, the backbone and its weights file (and that it is a CLIP model, if `clip_for` names what
    needs one); seed, device (deterministic algorithms on CPU, cuDNN autotuning on CUDA), the results writer and a
    log function."""
    check_method_name(method, sys._getframe(1).f_code.co_filename)
    check_args(args)
    check_environment()
    backbone = args.backbone or data.default_backbone(args.dataset)
    check_backbone(backbone, args.weights, clip_for)
    seed_everything(args.seed)
    device = init_distributed(get_device(args.device))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:  # shapes are static (full training batches, padded evaluation): cuDNN times its algorithms once per shape
        torch.backends.cudnn.benchmark = True
    out = args.out or os.path.join("runs", method, args.dataset, f"seed{args.seed}")
    results = Results(out, method, args, device)
    results.weights_of = (backbone, args.weights)
    results.header["weights"] = weights_record(backbone, args.weights)  # the file a default or relative path meant

    def log(msg):
        if is_main():
            tqdm.write(f"[{method}] {msg}")
            sys.stdout.flush()  # one line per evaluation shows up at once, also when stdout is a file

    if device.type == "cuda":  # say what 'auto' turns off on an older GPU
        major, minor = compute_capability(device)
        said = []
        if args.precision == "auto" and major < 8:
            said.append("--precision auto means fp32 (bf16 tensor cores came with 8.0)")
        if args.compile == "auto" and major < 7:
            said.append("--compile auto means no torch.compile (Triton needs 7.0)")
        if said:
            log(f"note: {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}: {'; '.join(said)}")
    return device, results, log
