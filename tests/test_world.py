"""The embedded world: deterministic, balanced, the documented splits."""
import itertools

import torch

import data


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
