"""The README's demo command: it runs, reports its generations in correct English, and
says whether it reached its target."""

from __future__ import annotations

import re

from evotorch_eggroll import demo


def test_demo_reports_generations_and_target(capsys):
    assert demo.main(["--generations", "1", "--popsize", "4", "--episode-length", "5"]) == 0
    out = capsys.readouterr().out
    done = [line for line in out.splitlines() if line.startswith("Done after")]
    assert len(done) == 1
    assert re.match(r"Done after 1 generation in ", done[0])  # not "1 generations"
    assert re.search(r"target [0-9.]+ (reached|not reached)", done[0])
