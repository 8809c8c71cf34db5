"""What commands show while they run: stages, per-frame bars, one overall bar for batches, results on stdout that
bars never cut, nothing left on screen, nothing at all when stderr is not a terminal or with --quiet."""

from __future__ import annotations

import fcntl
import io

import torch
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

from vaecli.pipeline.progress import Progress
from vaecli.pipeline.prepare import DecodeOptions, EncodeOptions
from vaecli.pipeline.runner import decode_file, encode_file


class Recorder(Progress):
    """A Progress that records stages and every bar update instead of drawing."""

    def __init__(self):
        super().__init__(bars=False, notes=True)
        self.stages, self.bars = [], []

    def stage(self, text):
        self.stages.append(text)

    def frames(self, total, desc):
        bar = Bar(total, desc)
        self.bars.append(bar)
        return bar


class Bar:
    def __init__(self, total, desc):
        self.total, self.desc, self.updates = total, desc, []

    def update(self, n=1):
        self.updates.append(n)

    def close(self):
        pass


def test_decode_updates_per_frame_and_names_its_stages(corpus, tmp_path):
    from vaecli.model.checkpoint import load_codec

    model = load_codec(corpus.model, device=torch.device("cpu"), dtype=torch.float32)
    rec = Recorder()
    decode_file(model, corpus.latents, tmp_path / "o.mp4", DecodeOptions(), rec)
    assert rec.stages[:2] == [f"decode {corpus.latents.name}: reading latents", f"decode {corpus.latents.name}: planning"]
    (bar,) = rec.bars
    assert bar.desc == f"decode {corpus.latents.name} (one clip)"
    assert bar.updates == [1] * bar.total and bar.total >= 2  # one update per frame


def test_encode_names_its_stages_and_counts_every_frame(corpus, tmp_path):
    from vaecli.model.checkpoint import load_codec

    model = load_codec(corpus.model, device=torch.device("cpu"), dtype=torch.float32)
    rec = Recorder()
    result = encode_file(model, str(corpus.video), tmp_path / "o.latents.safetensors", EncodeOptions(batch=2), rec)
    assert rec.stages[:2] == [f"encode {corpus.video.name}: opening", f"encode {corpus.video.name}: planning"]
    (bar,) = rec.bars
    assert "(2 at a time)" in bar.desc and sum(bar.updates) == result["frames"] and max(bar.updates) <= 2


def test_bars_are_off_without_a_terminal_and_notes_follow_quiet(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    quiet, loud = Progress.terminal(True), Progress.terminal(False)
    assert not quiet.bars and not loud.bars and loud.notes and not quiet.notes  # StringIO is not a terminal
    loud.stage("loading")
    bar = loud.frames(10, "x")
    bar.update(5)
    bar.close()
    quiet.note("hidden")
    loud.note("shown")
    assert err.getvalue() == "shown\n"


def test_results_are_whole_lines_between_bars(monkeypatch):
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    progress = Progress(bars=True, notes=True)
    progress.start_files(2, "encode")
    progress.stage("loading model vaecli-small")
    bar = progress.frames(4, "encode a.mp4")
    bar.update(2)
    progress.result("a.latents.safetensors")
    progress.file_finished("done")
    progress.file_finished("failed")
    progress.close()
    assert out.getvalue() == "a.latents.safetensors\n"
    text = err.getvalue()
    assert "loading model vaecli-small..." in text and "encode a.mp4" in text and "encode files" in text
    assert "failed=1" in text or "failed=0" in text


def run_on_terminal(args, env=None):
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); returns (stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a fresh pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "vaecli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, env={**os.environ, **(env or {})})
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")


def screen(raw: str) -> list[str]:
    """What stays on screen: each line as carriage returns and erase-line codes leave it."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        line = re.sub(r"\x1b\[A", "", line)
        shown = line.split("\r")[-1] if "\r" in line else line
        lines.append(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", shown).strip())
    return [ln for ln in lines if ln]


def test_a_batch_on_a_terminal(corpus, tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(corpus.video_bytes)
    b.write_bytes(corpus.video_bytes)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    (tmp_path / "out").mkdir()
    code, stdout, raw = run_on_terminal(["encode", a, bad, b, "-m", corpus.model, "--out-dir", tmp_path / "out"])
    assert code == 1
    assert stdout.splitlines() == [str(tmp_path / "out" / "a.latents.safetensors"),
                                   str(tmp_path / "out" / "b.latents.safetensors")]  # whole lines, no bar in them
    assert f"loading model {corpus.model.name}" in raw and "encode a.mp4: planning" in raw
    assert "encode files" in raw and "done=1" in raw and "failed=1" in raw
    left = screen(raw)
    assert left[-1].startswith("encode: 2 done, 0 skipped, 1 failed in")  # the summary stays, the bars are gone
    assert any(line.startswith("error: ") and "bad.mp4" in line for line in left)
    quiet_code, quiet_out, quiet_raw = run_on_terminal(["encode", a, "-m", corpus.model, "-o",
                                                        tmp_path / "q.latents.safetensors", "-q"])
    assert quiet_code == 0 and quiet_raw == "" and quiet_out.strip().endswith("q.latents.safetensors")
