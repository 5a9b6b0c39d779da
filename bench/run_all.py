"""`make bench`: run every benchmark script; each writes bench/results/<name>_<device>.{json,md}."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "bench.shared_ops_bench",
    "bench.roigan_bench",
    "bench.rrn_bench",
    "bench.registration_bench",
    "bench.wsi_bench",
]


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"== {module}", flush=True)
        if subprocess.run([sys.executable, "-m", module, *sys.argv[1:]], check=False).returncode != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
