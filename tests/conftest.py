import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """A fresh cache per test session: the tiny embedded CLIP is pretrained once (seconds) and shared by all tests,
    including the subprocess runs, which inherit RFT_CACHE."""
    path = os.environ.get("RFT_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["RFT_CACHE"] = path
    import common

    # Made before any test: the first test to need it would otherwise spend its pretraining (and time it).
    common.load_backbone("embedded-clip-tiny", log=lambda msg: None)
    return Path(path)


def read_results(folder):
    """A run's results.jsonl: one record per evaluation (per C, epoch, alpha or draw), in order."""
    return [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines()]


def write_noise_pngs(folder, sizes, seed):
    """Random-noise PNGs of the given (width, height): unlike the miniatures' single-colour images, every crop, flip
    or resampling other than the intended one changes their pixels."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{k}.png")


def what_was_computed(folder):
    """A run's results lines and saved model, less what differs between any two runs (time, the command line)."""
    import torch

    return computed_lines(folder), torch.load(Path(folder) / "model.pt", weights_only=True)["state_dict"]


def computed_lines(folder):
    """A run's results lines less what differs between any two runs (time, the command line)."""
    return [{k: v for k, v in r.items() if k not in ("time", "epoch_seconds", "args", "command")}
            for r in read_results(folder)]


def record_optimizers(monkeypatch, name, before_step=lambda opt: None):
    """Replaces torch.optim.<name> for one test by a subclass that records each optimiser built (the list returned)
    and calls `before_step(opt)` before each step, where a spy reads the learning rate or the gradients."""
    import torch

    made = []

    class Recorded(getattr(torch.optim, name)):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(self)

        def step(self, closure=None):
            before_step(self)
            return super().step(closure)

    monkeypatch.setattr(torch.optim, name, Recorded)
    return made


def record_models(monkeypatch):
    """The models a method script moves to its device (common.to_device), in order: the live model, for a spy to
    look at mid-run (train or eval mode, say)."""
    import common

    models, to_device = [], common.to_device
    monkeypatch.setattr(common, "to_device",
                        lambda model, device: models.append(to_device(model, device)) or models[-1])
    return models


def record_loss_gradients(monkeypatch, module, also=lambda value: None):
    """Wraps module.clip_loss: each call records (logit_scale, its gradient of that loss alone) and calls also(loss).
    Returns that list and a `before_step` for record_optimizers that checks each step applies exactly the gradient
    of its own loss: neither accumulated over steps nor clipped."""
    import torch

    seen, loss = [], module.clip_loss

    def spy(image_features, text_features, logit_scale):
        value = loss(image_features, text_features, logit_scale)
        seen.append((logit_scale, torch.autograd.grad(value, logit_scale, retain_graph=True)[0]))
        also(value)
        return value

    def before_step(opt):
        scale, grad = seen[-1]
        assert torch.equal(scale.grad, grad), f"step {len(seen)}"

    monkeypatch.setattr(module, "clip_loss", spy)
    return seen, before_step


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, where):
    """The run stops as its progress bar `where` ("epoch 3/3") would start, as a killed or preempted job would."""
    import common

    progress = common.progress

    def stopping(iterable, desc="", total=None):
        if desc == where:
            raise Interrupted(where)
        return progress(iterable, desc, total)

    monkeypatch.setattr(common, "progress", stopping)
