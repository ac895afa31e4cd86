"""PatchCamelyon reads: data.HDF5Images (the file opened once per process) against torchvision's PCAM (both files
opened for every image), on the same fabricated HDF5 files, in one run. Checks that both return the same pixels.

    python benchmarks/hdf5_reads.py     # 2,048 images of 96 x 96 x 3 in three layouts; 1,000 reads, shuffled and in order
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def fabricate(root, n, chunks):
    """`chunks` None: one contiguous, uncompressed array; else gzip-compressed chunks of that shape."""
    # PCam's layout: pcam/camelyonpatch_level_2_split_test_{x,y}.h5, x uint8 N x 96 x 96 x 3, y N x 1 x 1 x 1
    folder = Path(root) / "pcam"
    folder.mkdir(parents=True)
    x = np.random.default_rng(0).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    with h5py.File(folder / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=chunks, compression=chunks and "gzip")
    with h5py.File(folder / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f.create_dataset("y", data=(np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1))
    return folder / "camelyonpatch_level_2_split_test_x.h5"


def per_read(read, order):
    read(order[0])  # opens the file (ours) outside the clock
    start = time.perf_counter()
    for i in order:
        read(i)
    return (time.perf_counter() - start) / len(order)


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--reads", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for layout, chunks in [("contiguous", None), ("gzip, 1-image chunks", (1, 96, 96, 3)),
                               ("gzip, 64-image chunks", (64, 96, 96, 3))]:
            folder = Path(root) / layout.replace(" ", "_")
            path = fabricate(folder, args.images, chunks)
            theirs = torchvision.datasets.PCAM(str(folder), split="test")
            ours = data.HDF5Images(path)
            shuffled = np.random.default_rng(1).integers(0, args.images, args.reads).tolist()
            assert all(np.array_equal(np.asarray(ours(i)), np.asarray(theirs[i][0])) for i in shuffled[:50])
            for order, indices in [("shuffled", shuffled), ("in order", list(range(min(args.reads, args.images))))]:
                t_theirs, t_ours = per_read(lambda i: theirs[i][0], indices), per_read(ours, indices)
                print(f"{layout:22s} {order:8s}: torchvision PCAM {t_theirs * 1e3:.3f} ms/image, "
                      f"HDF5Images {t_ours * 1e3:.3f} ms/image, {t_theirs / t_ours:.1f}x (same pixels)")


if __name__ == "__main__":
    main()
