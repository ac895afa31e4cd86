"""Datasets, ID/OOD splits, class names and prompt templates.

The default dataset is the *embedded world*: a procedurally generated, DomainNet-like image world that needs no
download. Ten shape classes are drawn in four rendering domains (photo, sketch, painting, neon) with random pose,
size and colour. It provides
  * an unlabelled pretraining corpus of image-caption pairs from ALL domains (the CLIP/MoCo pretraining data saw
    OOD-like images without labels), see `pretraining_corpus`;
  * a labelled downstream task: ID train / ID validation / ID test from the photo domain and one OOD test split per
    other domain, see `load_dataset`.
Everything is a deterministic function of a seed; images are generated in memory in a few seconds.
"""
import math
from dataclasses import dataclass, field

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
# Splits and loaders
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """An in-memory labelled split: uint8 images [N, 3, H, W] and int64 labels [N]."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size, device="cpu", shuffle=False, drop_last=False, generator=None):
        """Yield (normalised float images, labels) on `device`."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield normalize(self.images[idx].to(device, non_blocking=True)), self.labels[idx].to(device, non_blocking=True)


def normalize(images_uint8):
    mean = torch.tensor(MEAN, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images_uint8.device).view(1, 3, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


@dataclass
class Dataset:
    """What every method needs: ID train / val / test, named OOD tests, class names, prompt templates."""
    name: str
    train: Split
    val: Split
    test: Split
    ood: dict
    classnames: list
    templates: list
    backbone: str  # the default backbone of this dataset
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of one embedded-world task. The pretraining corpus lives in the backbone's config (common.py)."""
    n_train: int = 4000  # labelled ID training images (photo)
    n_val: int = 1000  # held-out ID validation images, used for all model selection
    n_test: int = 1000  # ID test images and images per OOD domain
    id_domain: str = "photo"


WORLDS = {
    "embedded": (WorldConfig(), "embedded-clip"),
    "embedded-tiny": (WorldConfig(n_train=200, n_val=100, n_test=100), "embedded-clip-tiny"),  # for tests
}


def embedded_world(name="embedded", seed=0):
    """The labelled downstream task of the embedded world. `seed` only changes the ID training draw.

    Validation and test images come from fixed seeds so that every run is scored on the same images.
    The seeds are disjoint from the pretraining corpus's seeds (see common.EMBEDDED_BACKBONES).
    """
    cfg, backbone = WORLDS[name]
    id_dom = DOMAINS.index(cfg.id_domain)

    def split(n, s, doms):
        w = generate(n, s, domains=doms)
        return Split(w["images"], w["shape"])

    ood = {d: split(cfg.n_test, 10_000 + k, [k]) for k, d in enumerate(DOMAINS) if k != id_dom}
    return Dataset(name=name, train=split(cfg.n_train, 1_000 + seed, [id_dom]), val=split(cfg.n_val, 2_000, [id_dom]),
                   test=split(cfg.n_test, 3_000, [id_dom]), ood=ood, classnames=list(SHAPES),
                   templates=list(EMBEDDED_TEMPLATES), backbone=backbone, info={"id_domain": cfg.id_domain})


DATASETS = sorted(WORLDS)


def load_dataset(name, seed=0, data_root=None):
    """Build dataset `name` (see DATASETS); a clear error lists the choices for an unknown name."""
    if name in WORLDS:
        return embedded_world(name, seed)
    raise SystemExit(f"error: unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


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


if __name__ == "__main__":
    import sys

    save_samples(sys.argv[1] if len(sys.argv) > 1 else "docs/world.png")
