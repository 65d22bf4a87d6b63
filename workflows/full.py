"""The Ray job entry point: the whole DAG, or the stages asked for.

    python workflows/full.py                                   # demo preset into ./artifacts
    python workflows/full.py --config ci --storage /tmp/onestep --dry-run
    ray job submit --working-dir . -- python workflows/full.py --config ci --storage s3://bucket/run

Takes the same arguments as `onestep run`. Under `ray job submit` it attaches to that
cluster (RAY_ADDRESS); otherwise it starts a local Ray instance.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
