"""What a command shows while it runs: stages, progress bars and notes on stderr, results on stdout.

A `Progress` is made once per command and passed down. Bars and stage lines appear only when stderr is a terminal
and the command is not `--quiet`; they never stay on screen once finished (`leave=False`). Notes (precision
fallbacks, out-of-memory re-plans) are printed unless `--quiet`, and results on stdout always: both go through
`tqdm.write`, which lifts the bars out of the way, so lines are never cut by a bar being redrawn.
"""

from __future__ import annotations

import sys
import threading

from tqdm import tqdm


class Progress:
    """bars: show stage lines and bars (stderr is a terminal, not --quiet); notes: print notes (not --quiet).

    Layout: an overall bar for a batch of files (position 0, done/skipped/failed), and under it one line for the
    file at work: its stage (loading the model, planning, decoding...) with the elapsed time, then its frame bar.
    """

    def __init__(self, bars: bool = False, notes: bool = False):
        self.bars = bars
        self.notes = notes
        self._files: tqdm | None = None
        self._line: tqdm | None = None
        self._ticker: _Ticker | None = None
        self._counts = {"done": 0, "skipped": 0, "failed": 0}

    @classmethod
    def terminal(cls, quiet: bool) -> "Progress":
        """The command line's: bars on a terminal, notes unless quiet."""
        return cls(bars=not quiet and sys.stderr.isatty(), notes=not quiet)

    # ----------------------------------------------------------------------------------- the line at work

    def stage(self, text: str) -> None:
        """Say what happens now on the work line (`clip.mp4: planning`), with the elapsed time."""
        if not self.bars:
            return
        self._close_line()
        self._line = tqdm(total=0, desc=text, bar_format="{desc}... {elapsed}", file=sys.stderr, leave=False,
                          position=self._depth(), dynamic_ncols=True)

    def frames(self, total: int | None, desc: str) -> tqdm:
        """A per-frame bar on the work line (replaces the stage); a disabled bar when bars are off.

        Minutes can pass between two frames (a streamed decode computes every layer of the clip before the first
        frame comes out), so the bar is redrawn every second meanwhile (the elapsed time ticks) and its ETA is
        the average rate so far (smoothing 0), not the rate of the last burst of frames."""
        self._close_line()
        self._line = tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, leave=False, disable=not self.bars,
                          position=self._depth(), dynamic_ncols=True, mininterval=0.1, smoothing=0)
        if self.bars:
            self._ticker = _Ticker(self._line)
        return self._line

    # ----------------------------------------------------------------------------------- batches of files

    def start_files(self, total: int, verb: str) -> None:
        """The overall bar of a batch (two inputs or more)."""
        if self.bars and total > 1:
            self._files = tqdm(total=total, desc=f"{verb} files", unit="file", file=sys.stderr, leave=False,
                               position=0, dynamic_ncols=True)

    def file_finished(self, outcome: str) -> None:
        """outcome: "done", "skipped" or "failed"."""
        self._close_line()
        self._counts[outcome] += 1
        if self._files is not None:
            self._files.set_postfix(self._counts, refresh=False)
            self._files.update(1)
            self._files.refresh()  # a file is seconds of work: always redrawn

    def close(self) -> None:
        self._close_line()
        if self._files is not None:
            self._files.close()
            self._files = None

    # ----------------------------------------------------------------------------------- lines

    def note(self, text: str) -> None:
        """A message on stderr (a fallback, a re-plan), unless quiet."""
        if self.notes:
            tqdm.write(text, file=sys.stderr)

    def error(self, text: str) -> None:
        """An error line on stderr, even when quiet."""
        tqdm.write(text, file=sys.stderr)

    def result(self, text: str) -> None:
        """A result line on stdout (the bars are lifted while it is written). Without bars the line goes out in
        one write: workers under torchrun share one stdout, and lines up to 4 KiB written whole never interleave."""
        if self.bars:
            tqdm.write(text, file=sys.stdout)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def _depth(self) -> int:
        return 1 if self._files is not None else 0

    def _close_line(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        if self._line is not None:
            self._line.close()
            self._line = None


class _Ticker:
    """Redraws a bar every `interval` seconds from a daemon thread until stopped (or the bar is closed)."""

    def __init__(self, bar: tqdm, interval: float = 1.0):
        self.bar, self.interval = bar, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vaecli-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.bar.disable:  # closed
                return
            self.bar.refresh()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)

