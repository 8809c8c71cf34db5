"""Run vaecli's fuzz cases (tests/fuzzcases.py) for a long time and report what broke.

    python scripts/fuzz.py --n 5000 --seed 1            # prints a JSON summary; failing cases are kept
    python scripts/fuzz.py --n 200 --seed 7 --verbose   # one line per case

Every case runs in-process through the CLI's entry point with a per-case time limit and must end with exit 0
and a valid output, or exit 1/2 and one `error:` line, leaving nothing behind (see tests/fuzzcases.py and tests/fuzzrun.py).
Exit code: 0 when every case kept those promises, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzzrun  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=fuzzrun.TIME_LIMIT, help="seconds per case")
    parser.add_argument("--dir", type=Path, default=None, help="where case folders go (default: a temp folder)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="vaecli-fuzz-"))
    started = time.perf_counter()
    outcomes = []
    for outcome in fuzzrun.run_many(args.n, args.seed, root, time_limit=args.time_limit):
        outcomes.append(outcome)
        if args.verbose or outcome.problem:
            status = "ok" if outcome.problem is None else f"FAIL {outcome.problem}"
            print(f"{len(outcomes):5d} {outcome.case.family:10s} exit {outcome.exit_code} {outcome.seconds:6.2f}s "
                  f"{outcome.case.name[:60]!r} {status}", file=sys.stderr)
            if outcome.problem:
                print(f"      args: {outcome.case.args}", file=sys.stderr)
    result = fuzzrun.summary(outcomes)
    result.update(seed=args.seed, wall_seconds=round(time.perf_counter() - started, 1), kept=str(root))
    print(json.dumps(result, indent=2))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
