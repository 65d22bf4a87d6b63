"""Benchmarks: each prints a table. Not tests: numbers depend on the machine.

    python workflows/bench.py encode      # encode images/s (1 vs 2 Ray workers), reader samples/s, status time
    python workflows/bench.py train       # teacher images/s: NHWC vs NCHW, bare vs the training loop; GPU bf16 MFU
    python workflows/bench.py sample      # Heun sampler overhead, evaluate images/s (1 vs 2 workers), phema memory
    python workflows/bench.py pairs       # pairs/s (1 vs 2 Ray workers) against the forward-pass bound
    python workflows/bench.py distill     # one distill step against the sum of its passes, each timed alone
    python workflows/bench.py distill --method dmd2   # the same for DMD2, and its peak memory against DMD's
    python workflows/bench.py evaluate    # probe and Inception features images/s; evaluate's share of the demo
    python workflows/bench.py integrity   # the reader's samples/s with and without checksum verification
    python workflows/bench.py gpu         # the first GPU run: gpu tests, XS/S bf16 images/s and MFU, sampler
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pipeline/, stages/ from a checkout without install

# workflows/bench/, beside this file: Python puts this file's folder on sys.path, Ray on its workers' too
from bench import distill, encode, evaluate, gpu, integrity, pairs, sample, train  # noqa: E402

BENCHMARKS = {"encode": encode, "train": train, "sample": sample, "pairs": pairs, "distill": distill, "gpu": gpu,
              "integrity": integrity, "evaluate": evaluate}  # in the order of --help


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name, module in BENCHMARKS.items():
        module.add_arguments(sub.add_parser(name))
    args = p.parse_args()
    BENCHMARKS[args.what].run(args)


if __name__ == "__main__":
    main()
