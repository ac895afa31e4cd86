"""The embedded world: deterministic, balanced, the documented splits."""
import itertools
import re

import torch

import common
import data
from conftest import ROOT


def test_generator_is_deterministic_and_seed_dependent():
    a, b, c = data.generate(64, seed=3), data.generate(64, seed=3), data.generate(64, seed=4)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["images"], c["images"])


def test_generator_is_balanced_and_well_formed():
    w = data.generate(400, seed=0)
    assert w["images"].shape == (400, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and w["images"].dtype == torch.uint8
    assert torch.bincount(w["shape"], minlength=len(data.SHAPES)).tolist() == [40] * len(data.SHAPES)
    assert set(w["domain"].tolist()) == set(range(len(data.DOMAINS)))
    # Every image shows something: the object differs from the background.
    assert (w["images"].float().std(dim=(1, 2, 3)) > 5).all()


def test_generator_draws_the_balanced_shapes_in_random_order():
    """Exactly balanced, but not cyclic: a prefix of the images (a small split) must not be a fixed pattern."""
    w = data.generate(400, seed=0)
    assert not torch.equal(w["shape"], torch.arange(400) % len(data.SHAPES))
    assert not torch.equal(w["shape"], data.generate(400, seed=1)["shape"])


def test_domains_look_different():
    """Per-domain mean colour statistics are far apart (sketch is bright grey, neon is dark)."""
    means = [data.generate(100, seed=1, domains=[d])["images"].float().mean().item() for d in range(len(data.DOMAINS))]
    sketch, neon = means[data.DOMAINS.index("sketch")], means[data.DOMAINS.index("neon")]
    assert sketch > 180 and neon < 60


def test_embedded_task_splits():
    ds = data.load_dataset("embedded-tiny", seed=0)
    cfg = data.WORLDS["embedded-tiny"][0]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (cfg.n_train, cfg.n_val, cfg.n_test)
    assert sorted(ds.ood) == sorted(d for d in data.DOMAINS if d != "photo")
    assert all(len(s) == cfg.n_test for s in ds.ood.values())
    assert ds.classnames == data.SHAPES
    # The seed changes the ID training draw only; evaluation splits are shared by every run.
    other = data.load_dataset("embedded-tiny", seed=1)
    assert not torch.equal(ds.train.images, other.train.images)
    assert torch.equal(ds.test.images, other.test.images) and torch.equal(ds.ood["sketch"].images, other.ood["sketch"].images)
    # No image is in two splits: validation is not the test set, and no OOD set repeats another.
    splits = {"train": ds.train, "val": ds.val, "test": ds.test, **ds.ood}
    images = {name: {bytes(x.numpy()) for x in split.images} for name, split in splits.items()}
    assert all(not images[a] & images[b] for a, b in itertools.combinations(images, 2))
    # Each OOD set is drawn from its own domain (sketch is bright grey, neon dark: test_domains_look_different).
    assert ds.ood["sketch"].images.float().mean() > 180 and ds.ood["neon"].images.float().mean() < 60


def test_captions_always_name_the_shape():
    g = torch.Generator().manual_seed(0)
    for shape in range(len(data.SHAPES)):
        for domain in range(len(data.DOMAINS)):
            text = data.caption(shape, domain, 0, g)
            assert data.SHAPES[shape] in text


def test_unknown_dataset_lists_choices():
    import pytest

    with pytest.raises(SystemExit, match="embedded"):
        data.load_dataset("imagenet-on-mars")


def test_captions_name_a_colour_never_for_sketches_and_only_the_images_own_domain():
    """Sketches are grey pencil on paper: a colour word would describe what the image does not show. The domain word
    is the image's own; both words appear in some captions (p = 0.3 each), so the checks have something to check."""
    g = torch.Generator().manual_seed(0)
    colours, seen = list(data.COLOURS), set()
    for domain, name in enumerate(data.DOMAINS):
        others = [w for d, w in data.DOMAIN_WORDS.items() if d != name and w not in data.DOMAIN_WORDS[name]]
        for i in range(200):
            colour = i % len(colours)
            text = data.caption(i % len(data.SHAPES), domain, colour, g)
            assert not any(f" {w} " in f" {text[:-1]} " for w in others), (name, text)
            named = [c for c in colours if f" {c} " in f" {text} "]
            assert named in ([], [colours[colour]]) and not (named and name == "sketch"), (name, text)
            seen.update({("colour", name)} if named else set())
            seen.update({("domain", name)} if data.DOMAIN_WORDS[name] in text else set())
    assert seen == {("domain", d) for d in data.DOMAINS} | {("colour", d) for d in data.DOMAINS if d != "sketch"}


def domain_of(images):
    """Each image's domain, read off its rendering style as the module docstring describes it (not from data.py's
    code): a sketch is grey pencil on paper (no colour at all), neon is dark, a photo carries per-pixel sensor noise
    (a large median second difference along rows), and a painting is the smooth rest."""
    x = images.float()
    grey = (x.amax(1) - x.amin(1)).flatten(1).amax(1) == 0
    dark = x.mean(dim=(1, 2, 3)) < 80
    noisy = (x[..., 2:] - 2 * x[..., 1:-1] + x[..., :-2]).abs().flatten(1).median(1).values >= 8
    return ["sketch" if g else "neon" if d else "photo" if n else "painting" for g, d, n in zip(grey, dark, noisy)]


def test_each_split_of_the_embedded_task_is_drawn_from_its_own_domain_with_balanced_shape_labels():
    """ID train, val and test are photos only and each OOD set is its own domain only (a split with other domains
    mixed in, or painting drawn as photos, moves the ID/OOD numbers with no error); the labels are the shapes, exactly
    balanced (colours, 8 of them, would leave classes 8 and 9 empty); the OOD sets are independent draws."""
    for k, name in enumerate(data.DOMAINS):  # the style reader itself reads each domain right
        assert set(domain_of(data.generate(50, seed=5, domains=[k])["images"])) == {name}
    ds = data.load_dataset("embedded-tiny", seed=0)
    splits = {"photo/train": ds.train, "photo/val": ds.val, "photo/test": ds.test,
              **{f"{d}/ood": s for d, s in ds.ood.items()}}
    for key, split in splits.items():
        assert set(domain_of(split.images)) == {key.split("/")[0]}, key
        counts = torch.bincount(split.labels, minlength=len(data.SHAPES)).tolist()
        assert counts == [len(split) // len(data.SHAPES)] * len(data.SHAPES), key
    labels = [tuple(s.labels.tolist()) for s in ds.ood.values()]
    assert len(set(labels)) == len(labels)


def test_the_class_names_name_the_shapes_drawn():
    """Label k is drawn as the shape ds.classnames[k] names (zero-shot heads are built from these names): rendered as
    sketches, a 'bar' is a long thin outline and a 'circle' a round one (ratio of the ink's principal second moments;
    by hand, a filled box of half-sizes 0.95 x 0.2 gives (0.95 / 0.2)^2 ~ 23, its outline less, a circle 1)."""
    g = torch.Generator().manual_seed(0)
    names = data.load_dataset("embedded-tiny").classnames

    def elongation(name):
        k = names.index(name)
        x = data.render(torch.full((20,), k), torch.full((20,), data.DOMAINS.index("sketch")),
                        torch.zeros(20, dtype=torch.long), g)[:, 0].float()
        ink = (x.amax(dim=(1, 2), keepdim=True) - x).clamp(min=0)
        w = ink * (ink > 40)
        w = w / w.sum(dim=(1, 2), keepdim=True)
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        dx, dy = xs - (w * xs).sum((1, 2), keepdim=True), ys - (w * ys).sum((1, 2), keepdim=True)
        cov = torch.stack([torch.stack([(w * dx * dx).sum((1, 2)), (w * dx * dy).sum((1, 2))], -1),
                           torch.stack([(w * dx * dy).sum((1, 2)), (w * dy * dy).sum((1, 2))], -1)], -2)
        ev = torch.linalg.eigvalsh(cov)
        return (ev[:, 1] / ev[:, 0]).median().item()

    assert elongation("bar") > 4 and elongation("circle") < 1.5


def test_the_embedded_task_zero_shot_templates_are_its_domain_agnostic_ones():
    """The downstream task's prompts are EMBEDDED_TEMPLATES (one slot, no domain word: a 'sketch of a ...' prompt
    would favour one domain), not the pretraining captions' templates."""
    templates = data.load_dataset("embedded-tiny").templates
    assert templates == data.EMBEDDED_TEMPLATES and templates != data.WORLD_TEMPLATES
    for t in templates:
        assert t.count("{}") == 1 and not any(w in t for w in data.DOMAIN_WORDS.values()), t


def test_an_in_memory_split_shuffles_with_the_generator_drops_the_partial_batch_and_normalises():
    """The embedded world's splits (data.Split) batch as FileSplit does: a training pass is the run's seeded
    generator's next permutation with the partial last batch dropped (40 images in 16s: 2 batches), an evaluation
    pass keeps every image in order, and pixels go through the split's own mean and std (by hand: black -> -mean/std,
    white -> (1 - mean)/std)."""
    images = (torch.arange(40) % 2 * 255).to(torch.uint8).view(40, 1, 1, 1).expand(40, 3, 1, 1).clone()
    split = data.Split(images, torch.arange(40), mean=(0.5, 0.25, 0.75), std=(0.5, 0.25, 0.125))
    g, same = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        batches = split.batches(16, shuffle=True, drop_last=True, generator=g)
        ys = [y for _, y in batches]
        assert len(batches) == 2 and [len(y) for y in ys] == [16, 16]
        orders.append(torch.cat(ys).tolist())
        assert orders[-1] == torch.randperm(40, generator=same)[:32].tolist()
    assert orders[0] != orders[1]
    assert len(split.batches(16)) == 3  # the progress bar's total: the partial batch counts
    passes = list(split.batches(16))
    assert [len(y) for _, y in passes] == [16, 16, 8] and torch.cat([y for _, y in passes]).tolist() == list(range(40))
    x = torch.cat([x for x, _ in passes])[:, :, 0, 0]
    assert x[0::2].tolist() == [[-1.0, -1.0, -6.0]] * 20 and x[1::2].tolist() == [[1.0, 3.0, 2.0]] * 20


def test_the_full_world_has_the_documented_sizes_and_backbone():
    """README: the downstream task is 4,000 photo training images, 1,000 validation, 1,000 test (read from the
    README's sentence, not restated), run by default with the CLIP pretrained on the README's 32,000 images."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"\*\*photo\*\* images \(([\d,]+) train, ([\d,]+) validation, ([\d,]+) test\)", text)
    n_train, n_val, n_test = (int(g.replace(",", "")) for g in found.groups())
    cfg = data.WORLDS["embedded"][0]
    assert (cfg.n_train, cfg.n_val, cfg.n_test, cfg.id_domain) == (n_train, n_val, n_test, "photo")
    corpus = re.search(r"pretrained with the CLIP contrastive loss on\s+([\d,]+) captioned images", text).group(1)
    assert common.EMBEDDED_BACKBONES[data.default_backbone("embedded")].n_corpus == int(corpus.replace(",", ""))
