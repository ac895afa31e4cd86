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
