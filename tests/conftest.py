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
    return Path(path)


def read_results(folder):
    """A run's results.jsonl: one record per evaluation (per C, epoch, alpha or draw), in order."""
    return [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines()]
