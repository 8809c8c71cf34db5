"""Batch orchestration without the CLI (`vaecli.pipeline.batch`): inputs, names, collisions, failures going on,
exit codes, skip and resume, the record, the summary."""

from __future__ import annotations

import json

import pytest
import torch

from vaecli.errors import InputError, UsageError
from vaecli.pipeline.batch import decoded_name, latents_name, read_inputs, run_batch
from vaecli.pipeline.progress import Progress
from vaecli.pipeline.record import RECORD_NAME


class FakeModel:
    name, hash, family, dtype = "fake", "0123456789abcdef", "svd", torch.float32


class FakeWorker:
    """Writes a small output per input; fails with an InputError for names containing 'bad' and with a
    UsageError for names containing 'usage'."""

    workers = None

    def __init__(self):
        self.calls = []

    def model(self):
        return FakeModel()

    def __call__(self, item, target):
        self.calls.append((item, str(target)))
        if "usage" in item:
            raise UsageError("no fps; pass --fps")
        if "bad" in item:
            raise InputError(f"{item}: broken")
        open(target, "w").write("x")
        return {"input": item, "output": str(target), "frames": 3, "model": "fake", "model_hash": FakeModel.hash,
                "dtype": "fp32"}


def run(items, tmp_path, capsys, **kw):
    kw.setdefault("out", None)
    kw.setdefault("out_dir", tmp_path)
    worker = FakeWorker()
    code = run_batch([str(i) for i in items], kw["out"], kw["out_dir"], latents_name, worker,
                     skip_existing=kw.get("skip_existing", False), as_json=True,
                     progress=Progress(bars=False, notes=True), verb="encode")
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err, worker


def test_failures_are_reported_and_the_rest_goes_on(tmp_path, capsys):
    code, lines, err, worker = run(["a.mp4", "bad.mp4", "c.mp4"], tmp_path, capsys)
    assert code == 1 and [ln.get("error") is None for ln in lines] == [True, False, True]
    assert "error: bad.mp4: broken" in err and "encode: 2 done, 0 skipped, 1 failed" in err
    assert (tmp_path / "a.latents.safetensors").read_text() == "x" and len(worker.calls) == 3
    record = [json.loads(line) for line in (tmp_path / RECORD_NAME).read_text().splitlines()]
    assert [r["status"] for r in record] == ["done", "failed", "done"] and record[0]["model_hash"] == FakeModel.hash
    code, *_ = run(["usage.mp4", "a2.mp4"], tmp_path, capsys)
    assert code == 2  # a usage failure makes the exit code 2


def test_skip_existing_resumes_and_collisions_are_refused(tmp_path, capsys):
    assert run(["a.mp4", "b.mp4"], tmp_path, capsys)[0] == 0
    code, lines, err, worker = run(["a.mp4", "b.mp4", "c.mp4"], tmp_path, capsys, skip_existing=True)
    assert code == 0 and [ln.get("skipped", False) for ln in lines] == [True, True, False]
    assert worker.calls == [("c.mp4", str(tmp_path / "c.latents.safetensors"))]
    with pytest.raises(UsageError, match="would both write"):
        run(["x/a.mp4", "y/a.mp4"], tmp_path, capsys)
    with pytest.raises(UsageError, match="-o takes one input"):
        run(["a.mp4", "b.mp4"], tmp_path, capsys, out=tmp_path / "o.latents.safetensors", out_dir=None)
    with pytest.raises(UsageError, match="is not a folder"):
        run(["a.mp4"], tmp_path, capsys, out_dir=tmp_path / "missing")


def test_inputs_from_a_manifest_and_output_names(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("# clips\none.mp4\n  two.mp4   # the second\n\n/abs/three.mp4\n", encoding="utf-8")
    assert read_inputs(["zero.mp4"], manifest) == ["zero.mp4", str(tmp_path / "one.mp4"),
                                                   str(tmp_path / "two.mp4"), "/abs/three.mp4"]
    with pytest.raises(UsageError, match="no inputs"):
        read_inputs([], None)
    assert latents_name(tmp_path / "clip.mp4") == "clip.latents.safetensors"
    from pathlib import Path

    assert decoded_name("png")(Path("c.latents.safetensors")) == "c.decoded/"
    assert decoded_name(None)(Path("c.latent")) == "c.decoded.mp4"
