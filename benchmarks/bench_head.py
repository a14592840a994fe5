"""LM-head benchmark: plain vs logits-SAM, dense vs chunked (same as `logitsam bench`).

    python benchmarks/bench_head.py [--device cuda] [--repeats 5] [--output result.json]
"""

import argparse

from logitsam.bench import BenchConfig, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in BenchConfig().__dict__.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-path memory subprocesses")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = vars(parser.parse_args())
    memory, output = not args.pop("no_memory"), args.pop("output")
    main(BenchConfig(**args), memory=memory, output=output)
