"""Datasets, ID/OOD splits, class names and prompt templates.

The default dataset is the *embedded world*: a procedurally generated, DomainNet-like image world that needs no
download. Ten shape classes are drawn in four rendering domains (photo, sketch, painting, neon) with random pose,
size and colour. It provides
  * an unlabelled pretraining corpus of image-caption pairs from ALL domains (the CLIP/MoCo pretraining data saw
    OOD-like images without labels), see `generate` (pretrain.py trains on it);
  * a labelled downstream task: ID train / ID validation / ID test from the photo domain and one OOD test split per
    other domain, see `load_dataset`.
Everything is a deterministic function of a seed; images are generated in memory in a few seconds.
"""
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# The embedded world
# ---------------------------------------------------------------------------------------------------------------
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart", "arrow", "bar"]
DOMAINS = ["photo", "sketch", "painting", "neon"]
COLOURS = {  # name -> RGB in [0, 1]
    "red": (0.85, 0.12, 0.10), "orange": (0.95, 0.55, 0.05), "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.70, 0.20), "cyan": (0.10, 0.80, 0.85), "blue": (0.12, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.80), "pink": (0.95, 0.45, 0.70),
}
DOMAIN_WORDS = {"photo": "photo", "sketch": "sketch", "painting": "painting", "neon": "neon sign"}
WORLD_TEMPLATES = ["a {} of a {}.", "a {} showing a {}.", "a picture of a {}.", "a {}."]  # see `caption`
# Prompt templates for zero-shot heads on the downstream task (domain-agnostic, like CLIP's ImageNet templates).
EMBEDDED_TEMPLATES = ["a picture of a {}.", "a {}.", "an image of a {}.", "a drawing of a {}."]
IMAGE_SIZE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _box(px, py, hx, hy, cx=0.0, cy=0.0):
    """Signed distance to an axis-aligned box with half-sizes (hx, hy) centred at (cx, cy)."""
    qx, qy = (px - cx).abs() - hx, (py - cy).abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _convex(px, py, vertices):
    """Distance-like field of a convex polygon (counter-clockwise vertices): max over edges of the signed offset."""
    d = None
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        nx, ny = y1 - y0, -(x1 - x0)
        norm = math.hypot(nx, ny)
        e = ((px - x0) * nx + (py - y0) * ny) / norm
        d = e if d is None else torch.maximum(d, e)
    return d


def _regular(n, r, phase=math.pi / 2):
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _sdf(shape, px, py):
    """Signed distance (negative inside) of a unit-sized shape at local coordinates (px, py)."""
    rho = torch.sqrt(px ** 2 + py ** 2)
    if shape == "circle":
        return rho - 0.85
    if shape == "square":
        return _box(px, py, 0.7, 0.7)
    if shape == "triangle":
        return _convex(px, py, _regular(3, 1.0))
    if shape == "star":  # radial profile alternating between outer and inner radius
        phi = torch.atan2(py, px) - math.pi / 2
        t = torch.remainder(phi, 2 * math.pi / 5) / (2 * math.pi / 5)
        radius = 0.4 + 0.6 * (2 * (t - 0.5).abs())
        return (rho - radius) * 0.6
    if shape == "cross":
        return torch.minimum(_box(px, py, 0.9, 0.27), _box(px, py, 0.27, 0.9))
    if shape == "ring":
        return (rho - 0.68).abs() - 0.2
    if shape == "crescent":
        return torch.maximum(rho - 0.9, -(torch.sqrt((px - 0.45) ** 2 + (py - 0.15) ** 2) - 0.72))
    if shape == "heart":
        lobes = torch.minimum(torch.sqrt((px + 0.38) ** 2 + (py - 0.3) ** 2), torch.sqrt((px - 0.38) ** 2 + (py - 0.3) ** 2))
        return torch.minimum(lobes - 0.45, _convex(px, py, [(0.0, -0.95), (0.8, 0.12), (-0.8, 0.12)]))
    if shape == "arrow":
        head = _convex(px, py, [(0.95, 0.0), (0.2, 0.6), (0.2, -0.6)])
        return torch.minimum(head, _box(px, py, 0.5, 0.17, cx=-0.3))
    if shape == "bar":
        return _box(px, py, 0.95, 0.2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _smooth_noise(n, channels, cells, g):
    """Low-frequency noise in [0, 1]: a random coarse grid upsampled bicubically to the image size."""
    coarse = torch.rand(n, channels, cells, cells, generator=g)
    return F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)


def render(shapes, domains, colours, g):
    """Render one image per (shape, domain, colour) index triple; returns uint8 [N, 3, 32, 32].

    Pose (rotation, scale, position) and the domain's style parameters are drawn from the generator `g`.
    """
    n = len(shapes)
    palette = torch.tensor(list(COLOURS.values()))
    angle = torch.rand(n, generator=g) * 2 * math.pi
    scale = 0.42 + 0.4 * torch.rand(n, generator=g)  # shape radius as a fraction of the half-image
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 2 * (1.0 - scale[:, None]) * 0.7
    # Local coordinates: rotate and scale the pixel grid into each shape's frame.
    lin = (torch.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * 2 - 1
    gy, gx = torch.meshgrid(-lin, lin, indexing="ij")
    dx, dy = gx[None] - centre[:, 0, None, None], gy[None] - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    px, py = (cos * dx + sin * dy) / scale[:, None, None], (-sin * dx + cos * dy) / scale[:, None, None]
    # A mild low-frequency wobble of the outline makes every instance a little different (hand-drawn look).
    wobble = (_smooth_noise(n, 1, 4, g)[:, 0] - 0.5) * 0.12
    d = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE)
    for k, shape in enumerate(SHAPES):
        idx = (shapes == k).nonzero().flatten()
        if len(idx):
            d[idx] = _sdf(shape, px[idx], py[idx])
    d = (d + wobble) * scale[:, None, None] * (IMAGE_SIZE / 2)  # distance in pixels
    colour = (palette[colours] * (0.85 + 0.3 * torch.rand(n, 3, generator=g))).clamp(0, 1)[:, :, None, None]
    fill = torch.sigmoid(-d * 2.0)[:, None]  # anti-aliased inside mask
    line_w = 0.6 + 0.6 * torch.rand(n, 1, 1, generator=g)
    out = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for k, domain in enumerate(DOMAINS):
        idx = (domains == k).nonzero().flatten()
        if not len(idx):
            continue
        m, c, dd, m_ = len(idx), colour[idx], d[idx], fill[idx]
        if domain == "photo":  # filled, shaded shape on a smooth coloured background with sensor noise
            bg = 0.25 + 0.6 * _smooth_noise(m, 3, 2, g)
            shade = 0.75 + 0.5 * _smooth_noise(m, 1, 2, g)
            img = bg * (1 - m_) + (c * shade).clamp(0, 1) * m_ + 0.03 * torch.randn(m, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        elif domain == "sketch":  # dark pencil outline on paper, no colour
            paper = 0.88 + 0.1 * _smooth_noise(m, 1, 3, g)
            ink = torch.exp(-((dd / line_w[idx]) ** 2))[:, None] * (0.6 + 0.35 * _smooth_noise(m, 1, 6, g))
            img = (paper * (1 - ink)).expand(m, 3, -1, -1) + 0.02 * torch.randn(m, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        elif domain == "painting":  # brush-stroke texture on both the shape and a blotchy background
            freq = 2 + 4 * torch.rand(m, 1, 1, 1, generator=g)
            theta = torch.rand(m, 1, 1, 1, generator=g) * math.pi
            strokes = torch.sin(freq * (torch.cos(theta) * gx + torch.sin(theta) * gy) * math.pi)
            bg = _smooth_noise(m, 3, 5, g) * 0.8 + 0.1
            tex = 0.8 + 0.2 * strokes + 0.3 * (_smooth_noise(m, 3, 8, g) - 0.5)
            img = bg * (1 - m_) + (c * tex).clamp(0, 1) * m_
        else:  # neon: glowing coloured outline on a dark background, interior not filled
            glow = torch.exp(-dd.abs() / (1.2 * line_w[idx]))[:, None]
            core = torch.exp(-((dd / (0.5 * line_w[idx])) ** 2))[:, None]
            bg = 0.08 * _smooth_noise(m, 3, 3, g)
            img = bg + c * glow * 1.1 + 0.6 * core
        out[idx] = img.clamp(0, 1)
    return (out * 255).round().to(torch.uint8)


def generate(n, seed, domains=None, labels=None, chunk=4096):
    """`n` images with balanced shapes, colours and the given domains (index list; default: all).

    Returns a dict of uint8 images [n, 3, 32, 32] and the shape, domain and colour index of each image.
    Deterministic in (n, seed, domains): the same arguments give bit-identical images.
    """
    g = torch.Generator().manual_seed(seed)
    domains = list(range(len(DOMAINS))) if domains is None else list(domains)
    shape = torch.arange(n) % len(SHAPES)  # exactly balanced classes ...
    shape = shape[torch.randperm(n, generator=g)]  # ... in random order
    domain = torch.tensor(domains)[torch.randint(len(domains), (n,), generator=g)]
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    images = torch.cat([render(shape[i:i + chunk], domain[i:i + chunk], colour[i:i + chunk], g)
                        for i in range(0, n, chunk)]) if n else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    return {"images": images, "shape": shape, "domain": domain, "colour": colour}


def caption(shape, domain, colour, g, p_colour=0.3, p_domain=0.3):
    """One random caption that always names the shape; colour and domain words appear with probability 0.3 each.

    Always naming the shape makes the shape the one concept shared by every caption of an object, which is what
    makes CLIP learn shape features (captions that only sometimes name the shape taught colour and domain instead).
    """
    name = SHAPES[shape]
    if domain != DOMAINS.index("sketch") and torch.rand(1, generator=g).item() < p_colour:
        name = f"{list(COLOURS)[colour]} {name}"
    if torch.rand(1, generator=g).item() < p_domain:
        word = DOMAIN_WORDS[DOMAINS[domain]]
        return WORLD_TEMPLATES[int(torch.randint(2, (1,), generator=g))].format(word, name)
    return WORLD_TEMPLATES[2 + int(torch.randint(2, (1,), generator=g))].format(name)


# ---------------------------------------------------------------------------------------------------------------
# Splits: an in-memory one (the embedded world, arrays) and a file-backed one (real datasets); both yield normalised
# float batches on the device, so the method files never see the difference
# ---------------------------------------------------------------------------------------------------------------
def normalize(images_uint8, mean=MEAN, std=STD):
    """uint8 [N, 3, H, W] -> float, normalised. Done on the device: workers ship 4x fewer bytes as uint8."""
    mean, std = channel_constants(tuple(mean), tuple(std), images_uint8.device)
    return (images_uint8.float() / 255 - mean) / std


@functools.lru_cache(maxsize=16)
def channel_constants(mean, std, device):
    """`mean` and `std` as [1, 3, 1, 1] tensors on `device`, made once per device: on CUDA, torch.tensor(...,
    device=...) is a blocking copy (the host waits for every kernel queued on the stream), which at every batch would
    stall the host behind the GPU's previous step. Made outside inference mode, so training may use them too."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


@dataclass
class Split:
    """An in-memory labelled split: uint8 images [N, 3, H, W] and int64 labels [N].

    Optional, for the evaluation of some benchmarks: `classes`, the label subset a split is scored on (ImageNet-R/-A:
    200 of the 1,000 classes; argmax over those logits only); `groups` [N] and `group_names` (FMoW's regions)."""
    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple = MEAN
    std: tuple = STD
    classes: torch.Tensor = None
    groups: torch.Tensor = None
    group_names: list = None

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        idx = torch.as_tensor(idx)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx],
                                   groups=None if self.groups is None else self.groups[idx])

    def batches(self, batch_size, device="cpu", shuffle=False, drop_last=False, generator=None):
        """(normalised float images, labels) on `device`, one pass; under torch.distributed, this rank's share of
        each batch (see `BatchIndices`)."""
        indices = BatchIndices(len(self), batch_size, shuffle, drop_last, generator)
        return Batches(((normalize(self.images[idx].to(device, non_blocking=True), self.mean, self.std),
                         self.labels[idx].to(device, non_blocking=True)) for idx in indices), len(indices))


@dataclass
class Batches:
    """One pass of a split's batches that knows how many there are: progress bars show the total and time left."""
    iterator: object
    n: int

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.iterator)

    def __len__(self):
        return self.n


def rank_and_world():
    """(this process's rank, number of processes) under torch.distributed (torchrun), else (0, 1)."""
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def check_training_batch(n, batch_size):
    """A training pass drops the last partial batch: it needs one full batch, split evenly over the processes."""
    world = rank_and_world()[1]
    if n < batch_size:
        raise SystemExit(f"error: {n} training images, fewer than one batch of {batch_size}: pass --batch-size {n} "
                         "or less")
    if batch_size % world:  # unequal shares would weigh the ranks' gradients unequally
        raise SystemExit(f"error: the batch size {batch_size} does not split evenly over {world} processes: pass "
                         f"--batch-size with a multiple of {world}, such as {max(world, batch_size - batch_size % world)}")


@dataclass
class BatchIndices:
    """The index batches of one pass over n examples (a new shuffle from `generator` at every pass). `batch_size` is
    the global batch: under torch.distributed each rank takes its contiguous share of every batch (torch's
    tensor_split), so N processes together see exactly the batches one process would, whatever N is."""
    n: int
    batch_size: int
    shuffle: bool = False
    drop_last: bool = False
    generator: torch.Generator = None

    def __iter__(self):
        rank, world = rank_and_world()
        if self.drop_last:
            check_training_batch(self.n, self.batch_size)
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for i in range(0, self.n - self.n % self.batch_size if self.drop_last else self.n, self.batch_size):
            yield order[i:i + self.batch_size].tensor_split(world)[rank]

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


@dataclass
class SeededBatchIndices(BatchIndices):
    """BatchIndices whose batches pair each index with the seed of that example's random draws in this pass (its
    augmentation, see `FileSplit`). The seeds follow from the generator's state as the pass starts, read without
    advancing it, so the order is the one BatchIndices draws, and a generator put back (--resume) gives back the
    crops too (an unshuffled pass leaves the generator as it was: the next one, unless something else draws from the
    generator in between, gets the same seeds). Without a generator they come from torch's global one, which they
    advance, as an unseeded order does."""

    def __iter__(self):
        seeds = example_seeds(self.n, self.generator)  # before the order is drawn: its state at the start of the pass
        for idx in super().__iter__():
            yield list(zip(idx.tolist(), seeds[idx].tolist()))


def example_seeds(n, generator=None):
    """n seeds, one per example, for one pass (see SeededBatchIndices)."""
    if generator is None:
        pass_seed = int(torch.empty((), dtype=torch.int64).random_())
    else:
        digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
        pass_seed = int.from_bytes(digest, "little")
    return torch.randint(2**32, (n,), generator=torch.Generator().manual_seed(pass_seed))  # torch's Mersenne Twister
    # takes 32 bits of a seed: on ImageNet ~190 pairs of images per pass share their random draws, harmlessly


@contextlib.contextmanager
def seeded(seed, device="cpu"):
    """Within the block torch's random numbers come from `seed` (on the CPU, and on `device` where that is a GPU);
    after it the random states are as they were."""
    device = torch.device(device)
    gpus = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(seed)
        if gpus:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@dataclass
class FileSplit:
    """A split read on demand: `items[i]` is what `read` turns into a PIL image (a path, or an index into an array),
    `transform` makes it a uint8 [3, H, W] tensor (random for the ID training split, fixed otherwise). Batches come
    from a DataLoader with worker processes, pinned memory and persistent workers. Same interface as `Split`.

    Each image's random draws in a pass (its crop) come from a seed of its own (see `SeededBatchIndices`), not from
    the loader worker that reads it: a run's crops are the same whatever the number of workers or processes, and a
    resumed run draws those of the run that never stopped.

    With `decode_on_device` (JPEG files only; set by RFT_GPU_DECODE=1), workers only read the files' bytes and each
    batch is decoded where it is headed (nvJPEG on a GPU: torchvision.io.decode_jpeg(device='cuda')), then cropped
    there, which takes JPEG decoding, the usual bottleneck of a fast GPU, off the CPU cores."""
    items: list
    labels: torch.Tensor
    read: object
    transform: object
    mean: tuple = MEAN
    std: tuple = STD
    classes: torch.Tensor = None
    groups: torch.Tensor = None
    group_names: list = None
    decode_on_device: bool = False
    cpu_decoded_files: int = 0  # with decode_on_device: files nvJPEG refused, decoded on the CPU instead
    device_decoder_works: bool = False  # with decode_on_device: set once it has decoded a file

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        idx = torch.as_tensor(idx)
        return dataclasses.replace(self, items=[self.items[i] for i in idx.tolist()], labels=self.labels[idx],
                                   groups=None if self.groups is None else self.groups[idx])

    def __getitem__(self, key):
        """split[i]: image i through the split's transform, and its label. split[i, seed]: the transform's random draws
        (a training crop) from `seed`, as the loader reads (see SeededBatchIndices). With decode_on_device, the image
        is the file's undecoded bytes, with i and seed: the loader's collate_bytes packs them, `_decode` decodes."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        if self.decode_on_device:
            return (torchvision_io().read_file(self.items[i]), i, seed), self.labels[i]  # the undecoded file
        return self._transform(self.read(self.items[i]), seed), self.labels[i]

    def batches(self, batch_size, device="cpu", shuffle=False, drop_last=False, generator=None):
        device = torch.device(device)
        loader = self._loader(batch_size, device, shuffle, drop_last, generator)
        return Batches(self._batches(loader, device), len(loader))

    def _batches(self, loader, device):
        try:
            for x, y in loader:
                x = self._decode(x, device) if self.decode_on_device and len(y) else x.to(device, non_blocking=True)
                yield normalize(x, self.mean, self.std), y.to(device, non_blocking=True)
        except UnreadableImage as e:  # one line, not a worker's traceback
            e.__traceback__ = None  # torch re-raises a worker's error from a frame that holds it: a cycle that would keep
            # the loader's workers until the garbage collector, which waits 5 s for each
            raise SystemExit("error: " + e.line()) from None

    def _decode(self, packed, device):
        """A batch of JPEG files (see `collate_bytes`) -> images on `device`, each through the split's transform there."""
        tvio = torchvision_io()
        data, lengths, index, seeds = packed
        files = list(data.split(lengths.tolist()))
        wait_for_queued_work(device)
        try:
            images = tvio.decode_jpeg(files, mode=tvio.ImageReadMode.RGB, device=device)
        except torch.OutOfMemoryError:
            raise  # not the files' fault
        except RuntimeError:  # a file nvJPEG refuses (ImageNet holds a few CMYK JPEGs and one PNG named .JPEG)
            images = self._decode_each(files, index.tolist(), device)
        self.device_decoder_works = True
        # float: CUDA resizes no uint8 bicubic; rounded and clamped as the uint8 images of the PIL path are
        return torch.stack([self._transform(img.float(), seed)
                            for img, seed in zip(images, seeds.tolist())]).round_().clamp_(0, 255)

    def _transform(self, image, seed):
        """The split's transform, its random draws (a training crop) from `seed`, else from torch's global generator."""
        with contextlib.nullcontext() if seed is None else seeded(seed):
            return self.transform(image)

    def _decode_each(self, files, index, device):
        """A refused batch, file by file: on `device` what it takes, on the CPU the rest (only those: a CMYK JPEG
        among 512 costs one CPU decode, not 512). A decoder that has taken no file yet does not work here: stop."""
        tvio = torchvision_io()
        images, errors = [], []
        for file, i in zip(files, index):
            try:
                images.append(tvio.decode_jpeg(file, mode=tvio.ImageReadMode.RGB, device=device))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:
                errors.append(str(e))  # not e: its traceback holds this frame, a cycle that would keep the workers
                images.append(self._decode_one(i).to(device))
        if len(errors) == len(files) and not self.device_decoder_works:
            raise SystemExit(f"error: RFT_GPU_DECODE=1, but JPEG decoding on {device} refused all {len(files)} files "
                             f"of the first batch ({errors[0]}). Unset RFT_GPU_DECODE to decode in the loader workers, "
                             f"or check that torchvision.io.decode_jpeg(..., device='{device.type}') works here")
        if errors and not self.cpu_decoded_files:  # said once: a run's speed depends on how often it happens
            warnings.warn(f"JPEG decoding on {device} refused {len(errors)} of a batch's {len(files)} files ({errors[0]}); "
                          f"files it refuses are decoded on the CPU (FileSplit.cpu_decoded_files counts them)",
                          stacklevel=2)
        self.cpu_decoded_files += len(errors)
        return images

    def _decode_one(self, i):
        """What the CPU path reads (PIL: also a BMP, TIFF or 16-bit PNG behind a .jpg name), as a uint8 tensor."""
        import torchvision.transforms.functional as TF

        return TF.pil_to_tensor(self.read(self.items[i]))

    def _loader(self, batch_size, device, shuffle, drop_last, generator):
        # One loader per way of iterating, kept. The training loader's workers persist (no start-up at every epoch);
        # an evaluation loader's end with each pass (a second or two to start them again), or a run would keep a
        # pool of idle workers per split: ~900 processes over 8 ranks of 16 workers and 7 splits. A loader reads a
        # copy of the split: the split holding a loader that holds the split would be a reference cycle, and a
        # loader the garbage collector frees waits 5 s for each worker before it kills it (10 s a split, 2 workers).
        key = (batch_size, device.type, shuffle, drop_last, id(generator))
        loaders = self.__dict__.setdefault("_loaders", {})
        if key not in loaders:
            workers = num_workers() if len(self) > 2 * batch_size else 0  # tiny splits: workers cost more than they save
            sampler = SeededBatchIndices(len(self), batch_size, shuffle, drop_last, generator)
            loaders[key] = torch.utils.data.DataLoader(
                dataclasses.replace(self), batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0 and shuffle, prefetch_factor=4 if workers else None,
                collate_fn=functools.partial(collate, on_device=self.decode_on_device),
                generator=torch.Generator())  # the workers' base seed, not drawn from the global generator: a resumed
            # run starts its workers at another point of that stream (and the crops come from the images' seeds)
        return loaders[key]


def wait_for_queued_work(device):
    """Before nvJPEG decodes on `device`: the host waits for the kernels queued on the current stream. torchvision's
    CUDA decoder allocates its outputs on the caller's stream but writes them from a private stream that does not
    wait for the caller's, so it can overwrite memory that the previous training step, still queued, is reading
    (pytorch/vision#9606). The decoder waits for its own stream anyway: this costs the overlap of decoding with that
    step, not a second wait."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def torchvision_io():
    import torchvision.io

    return torchvision.io


def collate(samples, on_device=False):
    """A loader's batch: undecoded files packed for the device (collate_bytes), else torch's default. Under torchrun a
    last evaluation batch of fewer images than processes leaves some ranks an empty share: no images, no labels (an
    empty tensor with no pixels to size it by), yet a batch, as the ranks must gather every batch together."""
    if not samples:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return collate_bytes(samples) if on_device else torch.utils.data.default_collate(samples)


def collate_bytes(samples):
    """A batch of ((file bytes, index, seed), label) -> ((all bytes in one tensor, each file's length, index and seed),
    labels). One tensor, not one per file: workers hand each tensor over as a file descriptor, and hundreds per batch
    exhaust them. The indices name a file that fails to decode; the seeds are the images' crops'."""
    files = [b for (b, _, _), _ in samples]
    index, seeds = torch.tensor([[i, seed] for (_, i, seed), _ in samples]).unbind(1)
    return (torch.cat(files), torch.tensor([len(b) for b in files]), index, seeds), torch.stack([y for _, y in samples])


def num_workers():
    """Data-loading processes per training process: RFT_WORKERS, else an equal share of the CPU cores this process
    may use among the processes torchrun starts on this machine (LOCAL_WORLD_SIZE), up to 16 each."""
    share = usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(os.environ.get("RFT_WORKERS") or min(16, max(1, share)))


def usable_cores():
    """The CPU cores this process may run on: its affinity mask (a SLURM or cgroup cpuset allocation, taskset), not
    os.cpu_count(), which counts every core of the machine (128 on a node where a job was given 8)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


class UnreadableImage(OSError):
    """An image file PIL cannot decode (a truncated download, a file that is not an image)."""

    PREFIX = "cannot read image file "

    @classmethod
    def of(cls, path, error, fix="restore it from the download (a folder dataset of your own may also drop it)"):
        return cls(f"{cls.PREFIX}{path} ({error}): {fix}")

    def line(self):
        """The one-line message, also where a loader worker re-raised it with its traceback in the text."""
        text = str(self)
        return text[text.rindex(self.PREFIX):].splitlines()[0]


def read_image(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for broken files
        raise UnreadableImage.of(path, e) from e


class ArrayImages:
    """Image i of a uint8 [N, H, W, 3] array (CIFAR-10, STL-10, CIFAR-10.1 in memory)."""

    def __init__(self, array):
        self.array = array

    def __call__(self, i):
        from PIL import Image

        return Image.fromarray(self.array[i])

    def fingerprint(self):
        """What identifies the images, whose items are only indices: a hash of the pixels (0.5 s a GB here)."""
        return hashlib.sha1(np.ascontiguousarray(self.array).data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing: what the backbone expects (resolution, normalisation) and the training augmentation of its papers
# ---------------------------------------------------------------------------------------------------------------
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the LP-FT code's 0.228 is a typo


@dataclass(frozen=True)
class Preprocess:
    size: int  # training and evaluation resolution
    resize: int  # evaluation: shorter side resized to this, then a centre crop of `size`
    mean: tuple
    std: tuple
    interpolation: str  # 'bicubic' (CLIP) or 'bilinear'
    crop_scale: tuple  # training: RandomResizedCrop scale range
    flip: bool  # training: random horizontal flip
    # Nonzero: images are resized whole, not cropped (SQUASHED): to `size` x `size` for evaluation; for training to
    # a square of `squash` x `size`, then a random crop of `size`. Out of repr, so the feature caches' keys of the
    # other datasets stay valid (common.feature_cache appends it).
    squash: float = field(default=0.0, repr=False)


# The datasets whose images the LP-FT code resizes whole instead of cropping them (its configs): CIFAR-10's 32 px
# images are squashed to the model's size and neither cropped nor flipped in training; DomainNet's (SENTRY's
# transforms) are squashed to 224 px for evaluation and to 256 x 256 for training, then randomly cropped and flipped.
SQUASHED = {"cifar10": dict(squash=1.0, flip=False), "domainnet": dict(squash=256 / 224, flip=True)}


def preprocessing(backbone, dataset=None):
    """CLIP backbones: CLIP's own preprocessing; training crops of scale 0.9-1, no flip (WiSE-FT / FLYP code).
    ResNets (MoCo-v2, supervised): ImageNet's; RandomResizedCrop + flip (LP-FT code). Embedded backbones: 32 px.
    A `dataset` in SQUASHED keeps the backbone's size, interpolation and normalisation, with its paper's geometry."""
    if backbone.startswith("embedded"):
        pre = Preprocess(IMAGE_SIZE, IMAGE_SIZE, MEAN, STD, "bilinear", (0.9, 1.0), False)
    elif backbone.startswith("clip"):
        pre = Preprocess(224, 224, CLIP_MEAN, CLIP_STD, "bicubic", (0.9, 1.0), False)
    else:
        pre = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear", (0.08, 1.0), True)
    return dataclasses.replace(pre, **SQUASHED.get(dataset, {}))


def augments(pre):
    """Whether the training transform draws at random (torchvision names those steps Random...): not for CIFAR-10's
    images, resized whole (SQUASHED)."""
    return any(type(step).__name__.startswith("Random") for step in transforms(pre, train=True).transforms)


def transforms(pre, train):
    """PIL image -> uint8 [3, size, size] tensor (normalisation happens on the device, see `normalize`)."""
    from torchvision.transforms import v2

    mode = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}[pre.interpolation]
    resize = functools.partial(v2.Resize, interpolation=mode, antialias=True)
    if not train:
        steps = [resize([pre.size, pre.size])] if pre.squash else [resize(pre.resize), v2.CenterCrop(pre.size)]
    elif pre.squash:
        side = round(pre.size * pre.squash)
        steps = [resize([side, side])] + ([v2.RandomCrop(pre.size)] if side > pre.size else [])
    else:
        steps = [v2.RandomResizedCrop(pre.size, scale=pre.crop_scale, interpolation=mode, antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if train and pre.flip else []
    return v2.Compose(steps + [v2.PILToTensor()])


@dataclass
class Dataset:
    """What every method needs: ID train / val / test, named OOD tests, class names, prompt templates, and the
    benchmark's headline metric ('acc', 'macro_f1' for iWildCam, 'worst_region_acc' for FMoW's OOD test)."""
    name: str
    train: Split
    val: Split
    test: Split
    ood: dict
    classnames: list
    templates: list
    backbone: str  # the backbone this dataset is run with (--backbone, else the dataset's default)
    info: dict = field(default_factory=dict)
    metric: str = "acc"


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of one embedded-world task. The pretraining corpus lives in the backbone's config (common.py)."""
    n_train: int = 4000  # labelled ID training images (photo)
    n_val: int = 1000  # held-out ID validation images, used for all model selection
    n_test: int = 1000  # ID test images and images per OOD domain
    id_domain: str = "photo"


WORLDS = {
    "embedded": (WorldConfig(), "embedded-clip"),
    "embedded-tiny": (WorldConfig(n_train=200, n_val=100, n_test=100), "embedded-clip-tiny"),  # the tests' smoke world: near chance
}


def embedded_world(name="embedded", seed=0, backbone=None):
    """The labelled downstream task of the embedded world. `seed` only changes the ID training draw.

    Validation and test images come from fixed seeds so that every run is scored on the same images.
    The seeds are disjoint from the pretraining corpus's seeds (see common.EMBEDDED_BACKBONES).
    """
    cfg = WORLDS[name][0]
    id_dom = DOMAINS.index(cfg.id_domain)

    def split(n, s, doms):
        w = generate(n, s, domains=doms)
        return Split(w["images"], w["shape"])

    ood = {d: split(cfg.n_test, 10_000 + k, [k]) for k, d in enumerate(DOMAINS) if k != id_dom}
    return Dataset(name=name, train=split(cfg.n_train, 1_000 + seed, [id_dom]), val=split(cfg.n_val, 2_000, [id_dom]),
                   test=split(cfg.n_test, 3_000, [id_dom]), ood=ood, classnames=list(SHAPES),
                   templates=list(EMBEDDED_TEMPLATES), backbone=backbone or default_backbone(name),
                   info={"id_domain": cfg.id_domain})


# ---------------------------------------------------------------------------------------------------------------
# Real datasets, read from their published on-disk formats under one data root (docs/datasets.md has the layouts).
# Facts (class lists, BREEDS splits, templates) are shipped in reference/ with their provenance.
# ---------------------------------------------------------------------------------------------------------------
REFERENCE = Path(__file__).resolve().parent / "reference"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
HIDDEN = (".", "__")  # folder-name prefixes that are never data: .ipynb_checkpoints, __MACOSX, ...
VAL_FRACTION = 0.1  # ID validation held out of ID train where the benchmark defines none (fixed seed 0)


def reference(name):
    """A fact file of reference/ (class lists, BREEDS splits, prompt templates), which travels with data.py."""
    path = REFERENCE / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: data.py reads class lists, splits and prompt templates from the "
                         "reference/ folder beside it; copy that folder along with data.py")
    return json.loads(path.read_text())


def fail(dataset, message):
    """The one error of every loader: what is wrong, and where the layout is documented."""
    raise SystemExit(f"error: {dataset}: {message}\n       expected layout and downloads: docs/datasets.md#{dataset}")


# ImageNet-V2's folder as its tarball unpacks it, as recipes name it, as imagenetv2_pytorch renames it: one layout
V2_FOLDERS = ("imagenetv2-matched-frequency-format-val", "imagenetv2-matched-frequency", "ImageNetV2-matched-frequency")
# Names other tools give a folder we read (imagenetv2_pytorch, Kaggle, WiSE-FT's docs), or its download, for the hint
ALSO_CALLED = {V2_FOLDERS[0]: V2_FOLDERS[1:],  # V2 is read under these names too: the hint is for their archives
               "sketch": ("imagenet-sketch",), "cifar-10-batches-py": ("cifar-10-python",),
               "SENTRY_splits": ("txt",),  # SENTRY's repository: data/DomainNet/txt/
               "train": ("ILSVRC2012_img_train",), "val": ("ILSVRC2012_img_val",)}
ARCHIVE = re.compile(r"\.(tar|tar\.gz|tar\.xz|tar\.bz2|tgz|zip|7z|gz)$", re.IGNORECASE)


def missing_hint(path):
    """A hint for a missing `path`, looked for only then: --data-root one level too deep (DIR/imagenet given, so
    DIR/imagenet/imagenet/train looked for), or the first missing folder or file there as an archive not yet
    unpacked, or under another name (CIFAR-10.1 for cifar10.1, ALSO_CALLED), or in a folder inside that (a clone of
    the CIFAR-10.1 repository: CIFAR-10.1/datasets/; ImageNet-Sketch/sketch/), or without that folder (SENTRY's
    lists fetched into domainnet/), or one level down (an archive unpacked into a folder of its own name:
    rendered-sst2/rendered-sst2/train; --data-root one level too high). A folder that cannot be listed gives no
    hint."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.name and p.name == p.parent.name and p.parent.is_dir() and not p.exists():
            return f"; did you mean the parent folder {p.parent.parent}?"
    first = next((p for p in reversed((path, *path.parents)) if not p.exists()), None)
    if first is None or not first.parent.is_dir():
        return ""
    def squash(name):  # ImageNet-Sketch.zip -> imagenetsketch
        return re.sub(r"[^a-z0-9]", "", ARCHIVE.sub("", name).lower())

    names, rest = {squash(n) for n in (first.name, *ALSO_CALLED.get(first.name, ()))}, path.relative_to(first)
    try:
        for e in sorted(first.parent.iterdir()):
            if e.name == first.name or squash(e.name) not in names:
                continue
            if ARCHIVE.search(e.name):
                return f"; found {e} there: unpack it to {first.name}"
            if rest == Path(".") and e.is_dir():  # the folder itself, inside one of another tool's name
                nested = next((d for d in sorted(e.iterdir()) if d.is_dir() and squash(d.name) in names), None)
                if nested:  # ImageNet-Sketch/sketch/
                    return f"; found {nested} there: move or link it to {first}"
            if (e / rest).exists():
                return f"; found {e} there: rename it to {first.name}"
            inside = [d for d in sorted(e.iterdir()) if d.is_dir() and (d / rest).exists()]
            if inside:
                return f"; found {inside[0] / rest} there: move or link {inside[0]} to {first}"
        if rest != Path(".") and (first.parent / rest).exists():  # without the folder around it
            return f"; found {first.parent / rest}: move it (and what goes with it) into {first}"
        wanted = path.relative_to(first.parent)
        below = next((d for d in sorted(first.parent.iterdir()) if d.is_dir() and (d / wanted).exists()), None)
    except OSError:  # a folder we may enter but not list
        return ""
    if below is None:
        return ""
    if below.name == first.parent.name:
        return f"; found it one level deeper, in {below}: move that folder's contents up into {first.parent}"
    return (f"; found {below / wanted} one level down: pass {below} if that is your data root, or move the contents "
            f"of {below} up into {first.parent}")


def note(message):
    """A loader's note, said once: by the first process of a torchrun job (the others load the same data)."""
    if rank_and_world()[0] == 0:
        print(f"note: {message}")


def note_unreleased_sizes(dataset, sizes, released):
    """Test sets of other than their released number of images (an unpacking cut short, another version) are named:
    their accuracies do not compare with published ones. Said, not refused: a subset can be deliberate."""
    off = [f"{k} {n:,} (released: {released[k]:,})" for k, n in sizes.items() if n != released[k]]
    if off:
        note(f"{dataset}: test sets whose image counts differ from the released ones, so their accuracies do not "
             f"compare with published numbers: {', '.join(off)}")


def require(dataset, path, what="", folder=False):
    """A file (or folder) a loader needs: missing, it is an error naming it."""
    if not (path.is_dir() if folder else path.is_file()):
        fail(dataset, f"{path} not found{f' ({what})' if what else ''}{missing_hint(path)}")


def read_or_fail(dataset, path, read, what, fix="download it again"):
    """read(path), for a file a loader needs: missing or unreadable (a truncated download, an HTML page saved under
    its name), it is an error naming the file, not a traceback."""
    require(dataset, path)
    try:
        return read(path)
    except Exception as e:  # whatever a truncated or foreign file makes the reader raise
        fail(dataset, f"{path} is no {what} ({type(e).__name__}: {str(e)[:200]}): {fix}")


def class_labels(dataset, values, classes, expected, where):
    """The labels of text values (class names or indices, from a list file or CSV): `classes` maps each valid value
    to its label. The first invalid one stops here, `where(i)` naming value i's file and line; unchecked, it was a
    KeyError, an IndexError mid-training, or (in the head's range but not the benchmark's) scored silently."""
    labels = [classes.get(v, -1) for v in values]
    bad = [i for i, y in enumerate(labels) if y < 0]
    if bad:
        v = values[bad[0]]
        near = {str(k).lower(): k for k in classes}.get(str(v).lower())  # 'Airport' for 'airport'
        fail(dataset, f"{where(bad[0])}: {v!r} is not {expected}" + (f"; {len(bad)} such rows" if len(bad) > 1 else "")
                      + (f"; did you mean {near!r}?" if near else ""))
    return labels


def listed_images(dataset, listing, paths, what):
    """The images a list file or CSV names (`what`: which ones), checked up front with one stat each: a missing one
    would stop a run mid-epoch, and deleting it is no fix while `listing` still names it."""
    if not paths:
        fail(dataset, f"no images {what} in {listing}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        fail(dataset, f"{len(missing)} of {len(paths)} images {what} in {listing} missing (e.g. "
                      f"{', '.join(missing[:3])}): restore them from the download{missing_hint(missing[0])}")
    return paths


def list_images(folder):
    """Sorted image paths in folder and its sub-folders (as torchvision's ImageFolder finds them), without hidden files
    and the hidden and system folders that `subfolders` leaves out."""
    found, todo = [], [folder]
    while todo:  # scandir, not os.walk: half the time on ImageNet's flat class folders
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.name.startswith("."):  # ._x.jpg is macOS metadata
                    continue
                if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    found.append(e.path)
                elif e.is_dir() and not e.name.startswith(HIDDEN):
                    todo.append(e.path)
    return sorted(found)


def image_folder(dataset, folder, classes, labels=None, flat_hint=None):
    """(paths, labels) of the images in folder/<class>/ for each class folder name in `classes`; a class's label is
    its position in `classes`, or labels[i] when given. A missing class folder is an error that names it, and says
    `flat_hint` (how to sort them) when the images lie directly in `folder`."""
    folder = Path(folder)
    require(dataset, folder, folder=True)
    missing = [c for c in classes if not (folder / c).is_dir()]
    if missing:
        hint = ""
        if (folder / f"{missing[0]}.tar").is_file():  # ImageNet's train archive holds one tar a class
            unpack = 'for f in *.tar; do mkdir "${f%.tar}" && tar -xf "$f" -C "${f%.tar}" && rm "$f"; done'
            hint = (f"; its classes are still archives ({missing[0]}.tar, ...): unpack each into a folder of its "
                    f"name, e.g. cd {folder} && {unpack}")
        elif flat_hint:  # only now, on the error path: one scan that stops at the first image
            with os.scandir(folder) as entries:
                if any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
                    hint = f"; its images lie directly in it, not in class folders: {flat_hint}"
        hint = hint or missing_hint(folder / missing[0])
        fail(dataset, f"{len(missing)} of {len(classes)} class folders missing under {folder} (e.g. "
                      f"{', '.join(missing[:3])}){hint}")
    items, targets, empty = [], [], []
    for i, c in enumerate(classes):
        files = list_images(folder / c)
        items += files
        targets += [i if labels is None else labels[i]] * len(files)
        empty += [] if files else [c]
    looked = f"looked for {', '.join(IMAGE_EXTENSIONS)} files"
    if not items:
        fail(dataset, f"no images under {folder}/<class>/ ({looked} in {len(classes)} class folders)")
    if empty:  # an unpacking cut short (or a class never added): its class would be silently missing
        packed = [c for c in empty if (folder / f"{c}.tar").is_file()]
        fix = (f"{packed[0]}.tar is still beside its folder: unpack it there" if packed else
               "add images or remove the folder" if dataset == "folder" else "restore them from the download")
        fail(dataset, f"{len(empty)} of {len(classes)} class folders under {folder} hold no images (e.g. "
                      f"{', '.join(empty[:3])}; {looked}): {fix}")
    return items, targets


def file_split(items, labels, pre, train=False, read=read_image, **extra):
    items = list(items)
    on_device = (os.environ.get("RFT_GPU_DECODE") == "1" and read is read_image
                 and all(str(p).lower().endswith((".jpg", ".jpeg")) for p in items))
    return FileSplit(items, torch.as_tensor(labels, dtype=torch.long), read, transforms(pre, train), pre.mean, pre.std,
                     decode_on_device=on_device, **extra)


def holdout(labels, fraction=VAL_FRACTION, seed=0):
    """Stratified hold-out: (kept indices, held-out indices), a `fraction` of each class (at least one image of any
    class with two or more), drawn with a fixed seed so every run selects on the same images."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        held.append(idx[:max(1, round(fraction * len(idx))) if len(idx) > 1 else 0])
    held = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def train_val(items, labels, pre, read=read_image):
    """ID train and an ID validation split held out of it (the benchmark defines none)."""
    keep, held = holdout(labels)
    pick = (lambda idx: [items[i] for i in idx.tolist()]) if isinstance(items, list) else (lambda idx: items[idx])
    labels = torch.as_tensor(labels)
    return (file_split(pick(keep), labels[keep], pre, train=True, read=read),
            file_split(pick(held), labels[held], pre, read=read))


def imagenet_split(dataset, root, split, wnids, labels=None):
    """The images of ImageNet's train/ or val/ wnid folders. val/ as downloaded is flat: the error then says how to
    sort it."""
    folder = root / "imagenet" / split
    if not folder.exists():  # Kaggle's download, unpacked as it comes, under DIR/imagenet or DIR
        kaggle = (p / "ILSVRC" / "Data" / "CLS-LOC" / split for p in (root / "imagenet", root))
        found = next((k for k in kaggle if k.is_dir()), None)
        if found:
            fail(dataset, f"{folder} not found; found Kaggle's layout, {found}: link it there (mkdir -p "
                          f"{folder.parent} && ln -s {found} {folder})")
    sort = f"python data.py prepare-imagenet-val {folder} LOC_val_solution.csv" if split == "val" else None
    return image_folder(dataset, folder, wnids, labels, flat_hint=sort)


def breeds(name, root, pre):
    """Living-17 / Entity-30: ImageNet images of each superclass's source subclasses (ID) and target subclasses (OOD),
    BREEDS split 'rand' (reference/breeds_rand_splits.json). ID test and OOD come from ImageNet val."""
    hierarchy = reference("breeds_rand_splits")[name]

    def part(split, side):
        wnids = [w for sup in hierarchy for _, w, _ in sup[side]]
        labels = [sup["label"] for sup in hierarchy for _ in sup[side]]
        return imagenet_split(name, root, split, wnids, labels)

    train, val = train_val(*part("train", "source"), pre)
    test, target = file_split(*part("val", "source"), pre), file_split(*part("val", "target"), pre)
    note_unreleased_sizes(name, {"test": len(test), "target": len(target)},  # ImageNet val: 50 images a class
                          {k: 50 * sum(len(sup[side]) for sup in hierarchy) for k, side in (("test", "source"),
                                                                                           ("target", "target"))})
    return dict(train=train, val=val, test=test, ood={"target": target},
                classnames=[sup["superclass_name"].split(",")[0] for sup in hierarchy],  # "dog, domestic dog, ...": a
                # WordNet synonym list reads badly in a prompt ("a photo of a dog, domestic dog, Canis familiaris.")
                templates=reference("openai_imagenet_templates")["openai_imagenet_templates"],
                info={"val": f"{VAL_FRACTION:.0%} of ID train held out (BREEDS defines no validation split)"})


def cifar10(name, root, pre):
    """CIFAR-10 (torchvision's python batches) -> STL-10 test (monkey dropped, labels mapped to CIFAR's) and
    CIFAR-10.1 v6."""
    import pickle

    def batch(path):
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(d["labels"])

    def batches(files):
        xs, ys = [], []
        for f in files:
            path = root / "cifar-10-batches-py" / f
            x, y = read_or_fail(name, path, batch, "CIFAR-10 python batch", "download cifar-10-python.tar.gz again and "
                                "unpack it")
            xs.append(x)
            ys += list(array_labels(name, path, y, 0, 9, len(x)))
        return np.ascontiguousarray(np.concatenate(xs)), ys

    def cifar101_images(path):
        x = np.load(path)
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or not len(x):
            raise ValueError(f"a {x.dtype} array of shape {x.shape}, not uint8 N x 32 x 32 x 3, N > 0")
        return x

    def stl_images(path):  # uint8 images stored column-major [N, 3, 96, 96]
        x = np.fromfile(path, np.uint8)
        if not len(x):
            raise ValueError("empty file")
        return x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)

    def array_split(x, y, train=False):
        return file_split(range(len(y)), y, pre, train, read=ArrayImages(x))

    x, y = batches([f"data_batch_{i}" for i in range(1, 6)])
    keep, held = holdout(y)
    y = torch.as_tensor(y)
    train, val = array_split(x[keep.numpy()], y[keep], True), array_split(x[held.numpy()], y[held])
    test = array_split(*batches(["test_batch"]))
    stl_x, stl_y = root / "stl10_binary" / "test_X.bin", root / "stl10_binary" / "test_y.bin"
    c101_x, c101_y = root / "cifar10.1" / "cifar10.1_v6_data.npy", root / "cifar10.1" / "cifar10.1_v6_labels.npy"
    for p in (stl_x, stl_y, c101_x, c101_y):  # all four named before any is read
        require(name, p)
    # STL-10 binary: images, and labels 1..10 in STL's class order.
    stl_again = "download stl10_binary.tar.gz again and unpack it"
    sx = read_or_fail(name, stl_x, stl_images, "STL-10 binary image file (3 x 96 x 96 bytes an image)", stl_again)
    sy = read_or_fail(name, stl_y, lambda p: np.fromfile(p, dtype=np.uint8).astype(np.int64), "STL-10 label file",
                      stl_again)
    sy = torch.as_tensor(STL_TO_CIFAR)[torch.as_tensor(array_labels(name, stl_y, sy, 1, 10, len(sx), stl_x) - 1)]
    keep = (sy >= 0).numpy()  # no monkeys in CIFAR-10
    c101_again = "download it again from the CIFAR-10.1 repository's datasets/ folder (the raw file, not its web page)"
    cx = read_or_fail(name, c101_x, cifar101_images, "CIFAR-10.1 image array", c101_again)
    cy = read_or_fail(name, c101_y, lambda p: np.load(p).astype(np.int64), "CIFAR-10.1 label array", c101_again)
    cy = array_labels(name, c101_y, cy, 0, 9, len(cx), c101_x)
    names = reference("few_shot_templates")["cifar10"]
    return dict(train=train, val=val, test=test,
                ood={"stl10": array_split(np.ascontiguousarray(sx[keep]), sy[keep]), "cifar10.1": array_split(cx, cy)},
                classnames=names["classnames"], templates=names["templates"],
                info={"val": f"{VAL_FRACTION:.0%} of the 50,000 training images held out"})


def array_labels(dataset, path, labels, low, high, images, images_in=None):
    """Labels read from an array file: one per image (of the file `images_in`, when another), each in low..high (an
    index outside would map silently through negative indexing, or fail mid-run)."""
    if len(labels) != images or (len(labels) and (labels.min() < low or labels.max() > high)):
        found = f"{labels.min()}..{labels.max()}" if len(labels) else "none"
        where, them = (f" in {images_in}", "both") if images_in else ("", "it")
        fail(dataset, f"{path}: {len(labels)} labels ({found}) for {images} images{where}; expected one per image, "
                      f"each in {low}..{high}: download {them} again")
    return labels


# STL-10 class i (airplane, bird, car, cat, deer, dog, horse, monkey, ship, truck) -> CIFAR-10 class; -1 = no match
STL_TO_CIFAR = [0, 2, 1, 3, 4, 5, 7, -1, 8, 9]


def imagenet(name, root, pre):
    """ImageNet (train/val in wnid folders) -> ImageNet-V2 (matched frequency), -R, -Sketch, -A. V2's folders are
    class indices; -R and -A hold 200 classes and are scored on those 200 logits only. A missing OOD set is skipped
    with a message; the ID folders are required."""
    meta = reference("imagenet_classes")
    wnids, index = meta["wnids"], {w: i for i, w in enumerate(meta["wnids"])}
    train, val = train_val(*imagenet_split(name, root, "train", wnids), pre)
    test = file_split(*imagenet_split(name, root, "val", wnids), pre)
    ood, missing = {}, []
    v2 = next((root / f for f in V2_FOLDERS if (root / f).is_dir()), root / V2_FOLDERS[0])
    if v2.is_dir():
        ood["v2"] = file_split(*image_folder(name, v2, [str(i) for i in range(1000)]), pre)  # folder i = class i
    else:
        missing.append(str(v2))
    subsets = reference("imagenet_r_a")
    for key, folder, subset in (("r", "imagenet-r", "imagenet_r"), ("sketch", "sketch", None), ("a", "imagenet-a", "imagenet_a")):
        path = root / folder
        if not path.is_dir():
            missing.append(str(path))
            continue
        classes = subsets[subset]["wnids"] if subset else wnids
        items, labels = image_folder(name, path, classes, [index[w] for w in classes])
        ood[key] = file_split(items, labels, pre, classes=torch.tensor(subsets[subset]["indices"]) if subset else None)
    if missing:
        note(f"{name}: OOD sets not found, skipped: {', '.join(p + missing_hint(p) for p in missing)} "
             "(see docs/datasets.md#imagenet)")
    note_unreleased_sizes(name, {"test": len(test), **{k: len(v) for k, v in ood.items()}},
                          {"test": 50_000, "v2": 10_000, "r": 30_000, "sketch": 50_889, "a": 7_500})
    return dict(train=train, val=val, test=test, ood=ood, classnames=meta["classnames"],
                templates=reference("openai_imagenet_templates")["openai_imagenet_templates"],
                info={"val": f"{VAL_FRACTION:.0%} of ImageNet train held out; ImageNet val is the ID test set",
                      "missing_ood": missing})


def domainnet(name, root, pre):
    """DomainNet, SENTRY's 40-class split (reference/domainnet_sentry40.json): ID = sketch, OOD = real, painting,
    clipart test lists. SENTRY's list files give paths relative to the DomainNet root and the label."""
    meta, base = reference("domainnet_sentry40"), root / "domainnet"

    def listed(domain, part):
        path = base / "SENTRY_splits" / f"{domain}_{part}_mini.txt"
        require(name, path, f"SENTRY's data/DomainNet/txt/{path.name}")
        lines = [(n, line.strip().rsplit(None, 1)) for n, line in enumerate(read_text(name, path).splitlines(), 1)
                 if line.strip()]
        for n, r in lines:
            if len(r) != 2:
                fail(name, f"{path} line {n}: {r[0]!r} is not '<domain>/<class>/<file>.jpg <label>'")
        labels = class_labels(name, [r[1] for _, r in lines], {str(i): i for i in range(len(meta["classnames"]))},
                              f"a class index 0..{len(meta['classnames']) - 1}", lambda i: f"{path} line {lines[i][0]}")
        return listed_images(name, path, [str(base / r[0]) for _, r in lines], "listed"), labels

    train, val = train_val(*listed("sketch", "train"), pre)
    return dict(train=train, val=val, test=file_split(*listed("sketch", "test"), pre),
                ood={d: file_split(*listed(d, "test"), pre) for d in ("real", "painting", "clipart")},
                classnames=meta["classnames"],
                templates=reference("openai_imagenet_templates")["openai_imagenet_templates"],
                info={"val": f"{VAL_FRACTION:.0%} of sketch train held out (SENTRY validated on its test list)"})


def read_text(dataset, path):
    """A text file a loader needs (a list, a CSV, templates), as UTF-8 with or without a byte-order mark (a spreadsheet
    or Notepad adds one); anything else (still gzipped, UTF-16) is an error naming the file."""
    require(dataset, path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        fail(dataset, f"{path} is not UTF-8 text ({e.reason} at byte {e.start}; still compressed, or saved as UTF-16?): "
                      "download it again, or save it as UTF-8")


def read_csv(dataset, path, columns):
    """The rows of a CSV file as dicts of `columns` alone (FMoW's 524k rows also hold a 400-character map projection
    each: 0.8 GB in every process of a torchrun job); a missing file, a missing one of `columns` or a row of another
    number of fields than the header (a download cut short mid-row; a stray comma) is an error naming it."""
    import csv

    reader = csv.DictReader(io.StringIO(read_text(dataset, path), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        fail(dataset, f"{path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(reader.fieldnames or [])})")
    rows = []
    for i, r in enumerate(reader):
        if None in r or None in r.values():  # DictReader files extra fields under None and fills short rows with None
            fields = len(r) - 1 + len(r[None]) if None in r else sum(v is not None for v in r.values())
            fail(dataset, f"{csv_line(path, i)} has {fields} fields, the header {len(reader.fieldnames)}: the file "
                          "is cut short or damaged; download it again")
        rows.append({c: r[c] for c in columns})
    return rows


def csv_line(path, i):
    """Where read_csv's row i is in its file, for errors: after the header (no field spans lines in WILDS' CSVs)."""
    return f"{path} line {i + 2}"


class ArticleTemplate(str):
    """A prompt template that puts 'a'/'an' before the class name with underscores made spaces (the WiSE-FT / FLYP
    FMoW templates marked append_proper_article); `.format` does it, so every caller fills templates alike."""

    def format(self, name):
        name = name.replace("_", " ")
        return super().format(("an " if name[:1].lower() in "aeiou" else "a ") + name)


FMOW_REGIONS = ["Asia", "Europe", "Africa", "Americas", "Oceania", "Other"]


def fmow(name, root, pre):
    """FMoW (WILDS v1.1, official split): ID train/val/test = images before 2013, OOD test = 2016 and later; the
    OOD metric is the worst accuracy over regions ('Other' excluded), as WILDS reports it."""
    import datetime

    base, csv_path = root / "fmow_v1.1", root / "fmow_v1.1" / "rgb_metadata.csv"
    rows = read_csv(name, csv_path, ["split", "category", "country_code", "timestamp"])
    region_of = {r["alpha-3"]: r["region"] for r in read_csv(name, base / "country_code_mapping.csv", ["alpha-3", "region"])}
    require(name, base / "images", "the rgb_img_<i>.png files", folder=True)
    classes = reference("wilds_templates")["fmow_classnames"]["names"]
    line = functools.partial(csv_line, csv_path)
    # every row's category, 'seq' rows too, as WILDS maps them
    row_label = class_labels(name, [r["category"] for r in rows], {c: i for i, c in enumerate(classes)},
                             f"one of the {len(classes)} FMoW categories ({', '.join(classes[:3])}, ...; "
                             "reference/wilds_templates.json)", line)
    utc = datetime.timezone.utc

    def year_start(y):
        return datetime.datetime(y, 1, 1, tzinfo=utc)

    parts = {k: ([], [], []) for k in ("train", "id_val", "id_test", "test")}
    for i, r in enumerate(rows):  # the image of CSV row i is images/rgb_img_<i>.png ('seq' rows included)
        if r["split"] not in ("train", "val", "test"):  # 'seq': never used, so a time it lacks stops nothing
            continue
        try:
            t = datetime.datetime.fromisoformat((r["timestamp"] or "").replace("Z", "+00:00"))
        except ValueError:
            fail(name, f"{line(i)}: timestamp {r['timestamp']!r} is not an ISO 8601 date-time such as "
                       "2016-02-03T04:05:06Z")
        t = t if t.tzinfo else t.replace(tzinfo=utc)
        ood_test, ood_val = t >= year_start(2016), year_start(2013) <= t < year_start(2016)
        split = r["split"]
        key = ({"train": "train", "val": "id_val", "test": "id_test"}.get(split) if not (ood_test or ood_val)
               else "test" if split == "test" and ood_test else None)  # OOD val ('val' 2013-2015) is not used
        if key:
            parts[key][0].append(str(base / "images" / f"rgb_img_{i}.png"))
            parts[key][1].append(row_label[i])
            region = region_of.get(r["country_code"]) or "Other"  # unknown codes and empty regions (Antarctica)
            parts[key][2].append(FMOW_REGIONS.index(region if region in FMOW_REGIONS else "Other"))

    def split(key, train=False):
        items, labels, groups = parts[key]
        what = {"train": "of split 'train' before 2013", "id_val": "of split 'val' before 2013",
                "id_test": "of split 'test' before 2013", "test": "of split 'test' from 2016 on"}[key]
        return file_split(listed_images(name, csv_path, items, what), labels, pre, train,
                          groups=torch.tensor(groups, dtype=torch.long), group_names=FMOW_REGIONS)

    templates = reference("wilds_templates")["fmow_templates"]
    return dict(train=split("train", True), val=split("id_val"), test=split("id_test"), ood={"test": split("test")},
                classnames=classes, metric="worst_region_acc",
                templates=[ArticleTemplate(t["template"]) if t["class_name_transform"] == "append_proper_article"
                           else t["template"] for t in templates])


def iwildcam(name, root, pre):
    """iWildCam (WILDS v2.0, official split): train / id_val / id_test by camera, OOD test = new cameras; the papers
    report macro-F1 over the classes present."""
    base, csv_path = root / "iwildcam_v2.0", root / "iwildcam_v2.0" / "metadata.csv"
    rows = read_csv(name, csv_path, ["split", "filename", "y"])
    require(name, base / "train", "every image, whatever its split", folder=True)
    meta = reference("wilds_templates")
    n = len(meta["iwildcam_labels_csv"]["english_lower"])
    labels = class_labels(name, [r["y"] for r in rows], {str(i): i for i in range(n)}, f"a class index 0..{n - 1}",
                          lambda i: f"{csv_line(csv_path, i)}, column y")

    def split(key, train=False):
        sel = [i for i, r in enumerate(rows) if r["split"] == key]
        items = [str(base / "train" / rows[i]["filename"]) for i in sel]
        return file_split(listed_images(name, csv_path, items, f"with split '{key}'"), [labels[i] for i in sel], pre,
                          train)

    return dict(train=split("train", True), val=split("id_val"), test=split("id_test"), ood={"test": split("test")},
                classnames=meta["iwildcam_labels_csv"]["english_lower"], templates=meta["iwildcam_templates"],
                metric="macro_f1")


class HDF5Images:
    """Image i of an HDF5 file's `x` array, as torchvision's PCAM reads it, but with the file opened once per process
    (PCAM opens both of its files for every image: 14-20x slower per read, docs/benchmarks.md); never across a
    fork, which h5py handles do not survive."""

    def __init__(self, path):
        self.path, self.images, self.pid = str(path), None, None

    def __call__(self, i):
        from PIL import Image

        if self.pid != os.getpid():
            import h5py

            self.images, self.pid = h5py.File(self.path, "r")["x"], os.getpid()
        try:
            image = self.images[i]
        except OSError as e:  # a damaged compressed chunk, which opening and counting the images do not read
            raise UnreadableImage.of(self.path, f"image {i}: {e}", "the file is damaged; download it again") from e
        return Image.fromarray(image).convert("RGB")

    def __getstate__(self):  # spawned workers open their own
        return {"path": self.path, "images": None, "pid": None}

    def fingerprint(self):
        """What identifies the images, whose items are only indices: the file's path, inode, size and time."""
        st = os.stat(self.path)
        return f"{self.path}\0{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def pcam(name, root, pre):
    """PatchCamelyon in torchvision's layout (its HDF5 files; needs h5py): train / valid / test, no OOD split
    (FLYP's few-shot benchmark)."""
    try:
        import h5py
    except ImportError:
        raise SystemExit("error: pcam needs h5py to read PatchCamelyon's HDF5 files: pip install h5py")

    files = [root / "pcam" / f"camelyonpatch_level_2_split_{s}_{xy}.h5" for s in ("train", "valid", "test") for xy in "xy"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        zipped = [f for f in missing if (root / "pcam" / f"{f}.gz").is_file()]
        unzip = f"; {len(zipped)} lie there gzipped, as downloaded: gunzip {root / 'pcam'}/*.h5.gz" if zipped else ""
        fail(name, f"{len(missing)} of PatchCamelyon's HDF5 files missing in {root / 'pcam'}: {', '.join(missing)}"
                   + (unzip or missing_hint(root / "pcam")))

    def labels_in(path):
        with h5py.File(path, "r") as f:
            return np.asarray(f["y"]).reshape(-1)  # N x 1 x 1 x 1

    def images_in(path):  # only counted here: HDF5Images reads them
        with h5py.File(path, "r") as f:
            return len(f["x"])

    def split(tag, train=False):
        x, y = (root / "pcam" / f"camelyonpatch_level_2_split_{tag}_{xy}.h5" for xy in "xy")
        labels = read_or_fail(name, y, labels_in, "PatchCamelyon HDF5 file with a 'y' array")
        images = read_or_fail(name, x, images_in, "PatchCamelyon HDF5 file with an 'x' array")
        labels = array_labels(name, y, labels.astype(np.int64), 0, 1, images, x)
        return file_split(range(len(labels)), labels, pre, train, read=HDF5Images(x))

    meta = reference("few_shot_templates")["patchcamelyon"]
    return dict(train=split("train", True), val=split("valid"), test=split("test"), ood={},
                classnames=meta["classnames"], templates=meta["templates"])


def sst2(name, root, pre):
    """Rendered SST2 in torchvision's layout (rendered-sst2/{train,valid,test}/{negative,positive}): FLYP's other
    few-shot benchmark; no OOD split."""
    meta, base = reference("few_shot_templates")["rendered_sst2"], root / "rendered-sst2"

    def split(part, train=False):
        return file_split(*image_folder(name, base / part, ["negative", "positive"]), pre, train)

    return dict(train=split("train", True), val=split("valid"), test=split("test"), ood={},
                classnames=meta["classnames"], templates=meta["templates"])


def subfolders(path):
    """Sorted sub-folder names, without hidden and system ones (.ipynb_checkpoints, __MACOSX, ...)."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(HIDDEN))


def folder(name, root, pre):
    """Your own data: <root>/train/<class>/* (required), <root>/val and <root>/test (optional, else held out of
    train), and every other sub-folder of <root> is a named OOD test set with the same class folders (a subset is
    fine). Class names are the train folder names with '_' read as ' '; templates from <root>/templates.txt (one per
    line, '{}' for the class name) or 'a photo of a {}.'."""
    require(name, root / "train", "the ID training images go in train/<class name>/", folder=True)
    classes = subfolders(root / "train")
    if len(classes) < 2:  # one class would score 100% whatever the model does
        fail(name, f"{root / 'train'} holds {len(classes)} class folder(s){f' ({classes[0]})' if classes else ''}: "
                   "a classifier needs at least 2, one per class: train/<class name>/")
    index = {c: i for i, c in enumerate(classes)}

    def split(path, train=False):
        ood = "" if path.name in ("train", "val", "test") else (
            f"; every other sub-folder of {root} is an OOD test set (a name starting with '.' or '__' hides one)")
        present = subfolders(path)
        unknown = [c for c in present if c not in index]
        if unknown:
            fail(name, f"{path} has class folders that train/ lacks: {', '.join(unknown[:5])}{ood}")
        if not present:
            fail(name, f"{path} holds no class folders: {path.name}/<class name>/*.jpg{ood}")
        return image_folder(name, path, present, [index[c] for c in present])

    others = [d for d in subfolders(root) if d not in ("train", "val", "test")]
    for d in others:  # valid/ would be scored as an OOD set while ID val is held out of train, silently
        meant = {"val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test",
                 "train": "train", "training": "train"}.get(d.lower())
        if meant:
            fail(name, f"{root / d} would be scored as an OOD test set named {d!r}: rename it to {meant}/ if it holds "
                       f"ID {'validation' if meant == 'val' else meant} images, or give the OOD set another name")
        if d == "avg":  # its acc/ood_avg would be overwritten by the average over the OOD sets
            fail(name, f"{root / d}: an OOD test set cannot be named 'avg' (acc/ood_avg is the average over all OOD "
                       "sets); rename the folder")

    items, labels = split(root / "train")
    info = {}
    if not (root / "test").is_dir():
        keep, held = holdout(labels, seed=1)
        test = file_split([items[i] for i in held.tolist()], torch.as_tensor(labels)[held], pre)
        items, labels = [items[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]
        info["test"] = f"{VAL_FRACTION:.0%} of train held out (no test/ folder)"
    else:
        test = file_split(*split(root / "test"), pre)
    if (root / "val").is_dir():
        train, val = file_split(items, labels, pre, train=True), file_split(*split(root / "val"), pre)
    else:
        train, val = train_val(items, labels, pre)
        info["val"] = f"{VAL_FRACTION:.0%} of train held out (no val/ folder)"
    ood = {d: file_split(*split(root / d), pre) for d in others}
    templates = read_templates(name, root / "templates.txt") if (root / "templates.txt").is_file() else ["a photo of a {}."]
    return dict(train=train, val=val, test=test, ood=ood, classnames=[c.replace("_", " ") for c in classes],
                templates=templates, info=info)


def read_templates(name, path):
    """Caption templates, one per non-blank line, each with one '{}' where the class name goes."""
    templates = [t for t in read_text(name, path).splitlines() if t.strip()]
    if not templates:
        fail(name, f"{path} holds no templates: one per line, such as 'a photo of a {{}}.'")
    for t in templates:
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            fail(name, f"{path}: template {t!r} needs exactly one '{{}}' (where the class name goes) and no other "
                       "braces, such as 'a photo of a {}.'")
    return templates


# name -> (loader, default backbone: the one its papers used that loads here; see docs/datasets.md)
REAL = {
    "living17": (breeds, "moco-v2-rn50"),
    "entity30": (breeds, "moco-v2-rn50"),
    "cifar10": (cifar10, "moco-v2-rn50"),
    "imagenet": (imagenet, "clip-vit-b16"),
    "domainnet": (domainnet, "clip-rn50"),
    "fmow": (fmow, "clip-vit-b16"),
    "iwildcam": (iwildcam, "clip-vit-b16"),
    "pcam": (pcam, "clip-vit-b16"),
    "sst2": (sst2, "clip-vit-b16"),
    "folder": (folder, "clip-vit-b16"),
}
DATASETS = sorted(WORLDS) + sorted(REAL)


def default_backbone(name):
    """The backbone dataset `name` runs with when --backbone is not given (its paper's)."""
    if name not in WORLDS and name not in REAL:
        raise SystemExit(f"error: unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return (WORLDS.get(name) or REAL[name])[1]


def load_dataset(name, seed=0, data_root=None, backbone=None):
    """Build dataset `name` (see DATASETS) for `backbone` (default: the dataset's), whose preprocessing the real
    datasets apply. Real data lives under `data_root` or $RFT_DATA (for 'folder': the folder itself)."""
    backbone = backbone or default_backbone(name)
    if name in WORLDS:
        return embedded_world(name, seed, backbone)
    loader = REAL[name][0]
    root = data_root or os.environ.get("RFT_DATA")
    if not root:
        fail(name, "no data root: pass --data-root DIR or set RFT_DATA")
    root = os.path.expanduser(root)  # `--data-root=~/data`: bash leaves the ~
    if not os.path.isdir(root):
        fail(name, f"data root {root}{'' if data_root else ' (from $RFT_DATA)'} is not a folder")
    parts = loader(name, Path(root), preprocessing(backbone, name))
    parts["info"] = {**parts.get("info", {}), "root": str(Path(root).resolve())}  # where the data came from
    return Dataset(name=name, backbone=backbone, **parts)


def save_samples(path, per_cell=2, seed=0):
    """A grid of samples: one row per (domain, draw), one column per shape (the README's picture)."""
    import torchvision

    g = torch.Generator().manual_seed(seed)
    rows = []
    for d in range(len(DOMAINS)):
        for _ in range(per_cell):
            shapes = torch.arange(len(SHAPES))
            rows.append(render(shapes, torch.full_like(shapes, d), torch.randint(len(COLOURS), (len(SHAPES),), generator=g), g))
    grid = F.interpolate(torch.cat(rows).float() / 255, scale_factor=3, mode="nearest")
    torchvision.utils.save_image(grid, path, nrow=len(SHAPES), padding=2, pad_value=1.0)


def prepare_imagenet_val(val_dir, solution_csv):
    """Move ImageNet's flat validation images into wnid folders, using Kaggle's LOC_val_solution.csv (ImageId,
    PredictionString; the prediction string starts with the wnid). Moves, never copies or deletes; rerunnable."""
    val_dir, moved = Path(val_dir), 0
    if not val_dir.is_dir():
        raise SystemExit(f"error: {val_dir} is not a folder; pass ImageNet's val folder (ILSVRC/Data/CLS-LOC/val)")
    if not Path(solution_csv).is_file():
        raise SystemExit(f"error: {solution_csv} not found; LOC_val_solution.csv comes with Kaggle's ImageNet "
                         "(imagenet-object-localization-challenge)")
    rows = read_csv("imagenet", Path(solution_csv), ["ImageId", "PredictionString"])  # a row cut short: its line
    if not rows:
        raise SystemExit(f"error: {solution_csv} holds no rows; Kaggle's LOC_val_solution.csv has 50,000")
    bad = next((i for i, r in enumerate(rows) if not re.match(r"n\d{8}( |$)", r["PredictionString"])), None)
    if bad is not None:  # checked before anything moves
        raise SystemExit(f"error: {csv_line(solution_csv, bad)}: PredictionString {rows[bad]['PredictionString']!r} "
                         "does not start with a wnid such as n01440764")
    for r in rows:
        wnid, name = r["PredictionString"].split()[0], r["ImageId"] + ".JPEG"
        src = val_dir / name
        if src.is_file():  # already-moved images are skipped, so a second run is a no-op
            (val_dir / wnid).mkdir(exist_ok=True)
            os.replace(src, val_dir / wnid / name)
            moved += 1
    print(f"moved {moved} images into {len({r['PredictionString'].split()[0] for r in rows})} wnid folders under {val_dir}"
          + ("" if moved else " (none of the CSV's images lay directly in it: already sorted, or another folder?)"))


if __name__ == "__main__":
    import sys

    usage = ("usage: python data.py prepare-imagenet-val IMAGENET_VAL_DIR LOC_val_solution.csv\n"
             "       python data.py [PNG]   (a sample grid of the embedded world; default docs/world.png)")
    if sys.argv[1:2] == ["prepare-imagenet-val"] and len(sys.argv) == 4:
        prepare_imagenet_val(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] in (["-h"], ["--help"]):
        print(usage)
    elif len(sys.argv) <= 2 and sys.argv[1:2] != ["prepare-imagenet-val"] and not sys.argv[-1].startswith("-"):
        save_samples(out := sys.argv[1] if len(sys.argv) > 1 else "docs/world.png")
        print(f"wrote {out}")
    else:
        raise SystemExit(usage)
