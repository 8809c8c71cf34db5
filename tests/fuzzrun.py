"""Running the fuzz cases of `tests/fuzzcases.py` and judging each run: in-process through the CLI's entry point
(Typer's CliRunner on `vaecli.cli.app`) under a per-case time limit; a run must end with exit 0 and a valid
output, or exit 1/2 and one `error:` line per failing input, and leave nothing behind but its inputs and, on
success, its outputs (a failed batch may keep its record and the outputs it says are done).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fuzzcases import TIME_LIMIT, Case, Corpus, make_case
from vaecli.pipeline.record import RECORD_NAME


@dataclass
class Outcome:
    case: Case
    exit_code: int | None
    problem: str | None  # None: the run kept every promise
    seconds: float
    stderr: str = ""


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def run_case(case: Case, time_limit: float = TIME_LIMIT) -> Outcome:
    from typer.testing import CliRunner

    from vaecli.cli import app

    before = _snapshot(case.folder)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        result = CliRunner().invoke(app, case.args)
    except Timeout:
        return Outcome(case, None, f"hang (over {time_limit:.0f} s)", time.perf_counter() - started)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - started
    err = result.stderr
    problem = None
    if isinstance(result.exception, Timeout):
        problem = f"hang (over {time_limit:.0f} s)"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        problem = f"traceback: {type(result.exception).__name__}: {result.exception}\n{tb[-1500:]}"
    elif "Traceback" in err:
        problem = "traceback on stderr"
    elif result.exit_code not in (0, 1, 2):
        problem = f"exit code {result.exit_code}"
    elif result.exit_code:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if not lines or not all(ln.startswith("error: ") for ln in lines):
            problem = f"stderr is not one error: line: {err[:300]!r}"
    else:
        problem = _check_output(case, result.stdout)
    if problem is None:
        problem = _left_behind(case, before, result.exit_code == 0)
    return Outcome(case, result.exit_code, problem, seconds, err)


def _done_outputs(path: Path) -> list[str] | str:
    """The outputs a batch record says were done (a problem line when the record is torn or says done without
    an output file)."""
    done = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return f"torn batch record line {line[:80]!r}"
        if entry.get("status") == "done":
            if not Path(entry.get("output", "")).exists():
                return f"batch record says done, but {entry.get('output')!r} is missing"
            done.append(entry["output"])
    return done


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _left_behind(case: Case, before: set[str], succeeded: bool) -> str | None:
    after = _snapshot(case.folder)
    new = sorted(after - before)
    allowed = set(case.outputs) if succeeded else set()
    if not succeeded and RECORD_NAME in new:  # a batch with failures keeps its record and the outputs it says done
        done = _done_outputs(case.folder / RECORD_NAME)
        if isinstance(done, str):
            return done
        allowed |= {RECORD_NAME} | {Path(o).name for o in done if Path(o).parent == case.folder}
    patterns = [re.compile(re.sub(r"%0?\d*d", lambda _: r"\d+", re.escape(a))) for a in allowed if "%" in a]
    stray = [n for n in new if n.split("/")[0] not in allowed
             and not any(p.fullmatch(n.split("/")[-1]) for p in patterns)]
    changed = [n for n in before if not (case.folder / n).exists() and not os.path.islink(case.folder / n)]
    if stray:
        return f"left behind: {stray[:5]}"
    if changed:  # e.g. existing_dir/notes.txt: data loss
        return f"removed inputs: {changed[:5]}"
    return None


def _check_output(case: Case, stdout: str) -> str | None:
    if case.check == "text":
        return None if stdout.strip() else "exit 0 with nothing on stdout"
    made = [case.folder / n for n in case.outputs if (case.folder / n).exists()]
    if case.check != "any" and not made:
        return f"exit 0 but no output among {case.outputs}"
    for path in made:
        if path.name.endswith(".safetensors") and case.check == "latents":
            from vaecli.pipeline.latents_io import open_latents

            lf = open_latents(path)
            z = lf.read(0, lf.frames).float()
            if not bool(torch.isfinite(z).all()):
                return f"exit 0 wrote non-finite latents to {path.name}"
        elif path.suffix in (".mp4", ".webm", ".gif"):
            from vaecli.pipeline.video_io import FrameSource

            if path.stat().st_size == 0 or next(FrameSource(path).frames(), None) is None:
                return f"exit 0 wrote an unreadable {path.name}"
    return None


def run_many(n: int, seed: int, root: Path, corpus: Corpus | None = None, time_limit: float = TIME_LIMIT,
             keep: bool = False):
    """Generate and run n cases; yields Outcomes. Case folders are removed unless `keep` (or the case failed)."""
    corpus = corpus or Corpus(root / "corpus")
    rng = random.Random(seed)
    cwd = os.getcwd()
    for i in range(n):
        case_rng = random.Random(rng.getrandbits(64))
        case = make_case(i, case_rng, corpus, root)
        os.chdir(case.folder)  # "." and ".." name the case's own folder and the root, never the project
        try:
            outcome = run_case(case, time_limit)
        finally:
            os.chdir(cwd)
        if outcome.problem is None and not keep:
            shutil.rmtree(case.folder, ignore_errors=True)
        yield outcome


def summary(outcomes: list[Outcome]) -> dict:
    by_problem: dict[str, int] = {}
    for o in outcomes:
        if o.problem:
            key = o.problem.split(":")[0]
            by_problem[key] = by_problem.get(key, 0) + 1
    families: dict[str, dict[str, int]] = {}
    for o in outcomes:
        f = families.setdefault(o.case.family, {"cases": 0, "exit0": 0, "exit1": 0, "exit2": 0, "failed": 0})
        f["cases"] += 1
        f["failed"] += o.problem is not None
        if o.exit_code in (0, 1, 2):
            f[f"exit{o.exit_code}"] += 1
    return {"cases": len(outcomes), "failed": sum(o.problem is not None for o in outcomes), "problems": by_problem,
            "families": families, "seconds": round(sum(o.seconds for o in outcomes), 1),
            "slowest": round(max((o.seconds for o in outcomes), default=0), 2),
            "mean": round(sum(o.seconds for o in outcomes) / max(1, len(outcomes)), 3),
            "nan_outputs": sum(1 for o in outcomes if o.problem and "non-finite" in o.problem)}
