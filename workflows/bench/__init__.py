"""The benchmarks of `python workflows/bench.py NAME`, one module each; common.py holds what several share.

Each module has `add_arguments(parser)` (its options) and `run(args)` (times, then prints one table).
"""
