"""The fuzz suite in the normal run: seeded bad inputs through the CLI's entry point (see tests/fuzzcases.py).

Every case must end with exit 0 and a valid output, or exit 1/2 and one `error:` line; no traceback, no hang,
nothing left behind, never a non-finite output. `scripts/fuzz.py --n 5000` runs the same generators longer.
"""

import fuzzcases
import fuzzrun

CASES = 260  # about 40 per family; scripts/fuzz.py --n 5000 for a long run


def test_fuzz_cases_keep_every_promise(tmp_path, corpus):
    outcomes = list(fuzzrun.run_many(CASES, seed=20261124, root=tmp_path, corpus=corpus, time_limit=30))
    failures = [f"{o.case.family} {o.case.name!r} {o.case.args}: {o.problem}" for o in outcomes if o.problem]
    assert not failures, "\n".join(failures[:10])
    result = fuzzrun.summary(outcomes)
    assert result["cases"] == CASES
    for family, counts in result["families"].items():  # every family ran, and both successes and refusals happen
        assert counts["cases"] >= 25, (family, counts)
    assert sum(f["exit0"] for f in result["families"].values()) >= CASES // 10
    assert sum(f["exit1"] + f["exit2"] for f in result["families"].values()) >= CASES // 3


def test_the_checker_can_fail(tmp_path, corpus):
    """A case that leaves a stray file, and one that prints a traceback-like line, are reported."""
    folder = tmp_path / "c"
    folder.mkdir()
    case = fuzzcases.Case("test", "stray", folder, ["info", str(corpus.latents)], [], "text")
    before = fuzzrun._snapshot(folder)
    (folder / ".x.vaecli-1-abc.partial").write_text("")
    assert "left behind" in fuzzrun._left_behind(case, before, True)
    bad = fuzzcases.Case("test", "bad option", folder, ["decode", "--crf", "inf", "x"], [], "any")
    outcome = fuzzrun.run_case(bad)
    assert outcome.exit_code == 2 and outcome.problem is None and outcome.stderr.startswith("error: ")


def test_a_batch_with_failures_keeps_its_record_and_done_outputs(tmp_path, corpus):
    """A manifest naming a real clip and a missing one: exit 1, the clip's latents and the batch record kept (the
    record says which failed); the checker accepts that, and still reports a record that claims a missing
    output."""
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "list.txt").write_text(f"{corpus.video}\n%=C\n")
    name = corpus.video.name.replace(".mp4", ".latents.safetensors")
    case = fuzzcases.Case("text", "half-failing manifest", folder,
                          ["encode", "--manifest", str(folder / "list.txt"), "-m", str(corpus.model),
                           "--out-dir", str(folder), "-q"], [name], "any")
    outcome = fuzzrun.run_case(case)
    assert outcome.exit_code == 1 and outcome.problem is None, (outcome.problem, outcome.stderr)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["list.txt", name, "vaecli-batch.jsonl"])
    (folder / name).unlink()
    assert "missing" in fuzzrun._left_behind(case, {"list.txt"}, False)
