"""The CI slice of the benign corpus (scripts/precision.py, issue 19): a fixed choice of InterCode's NL2Bash
tasks, two of CPython's network tests and a coding agent's loopback and text-editing steps, run for real in
agent cgroups under `agentprobe watch` with the default rules. No episode may be frozen and no attack rule
(tunnel, reverse shell, miner, escape) may fire; exposure rules (a listener on all interfaces, a raw socket)
are allowed: the day starts a development server on 0.0.0.0 and pings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import precision  # noqa: E402

# tools: dnsmasq and the corpus come from scripts/install.sh --test, which VM roots lack (scripts/vm-test)
pytestmark = [pytest.mark.kernel, pytest.mark.tools]

CORPORA = ("nl2bash", "cpython", "day")


@pytest.fixture(scope="module")
def slice_result():
    for need in (precision.CACHE / precision.ICALFA_WHEEL, precision.CACHE / precision.PROJECT_SDIST,
                 Path(precision.PYTHON), Path("/usr/lib/python3.11/test/test_httpservers.py")):
        if not need.exists():
            pytest.fail(f"{need} missing: run scripts/install.sh --test", pytrace=False)
    return precision.run(ci=True)


def test_slice_ran(slice_result):
    c = slice_result["corpora"]
    assert c["nl2bash"]["tasks"] == len(precision.CI_NL2BASH)
    assert c["nl2bash"]["timeouts"] == 0
    assert all(m["result"] == "SUCCESS" for m in c["cpython"]["modules"].values()), c["cpython"]
    assert c["day"]["steps"] >= 20
    parts = slice_result["parts"]
    assert all(parts[name]["execs"] > 0 for name in CORPORA), parts
    assert parts["day"]["connects"] > 0
    assert slice_result["lost_total"] == 0


@pytest.mark.parametrize("corpus", (*CORPORA, "nl2bash_setup"))
def test_no_freeze(slice_result, corpus):
    part = slice_result["parts"][corpus]  # (the setup of NL2Bash's file trees is a part of its own)
    assert part["freezes_total"] == 0, json.dumps(
        {"freezes": part["freezes"], "thawed": slice_result["thawed"],
         "argv": [f["argv"] for f in slice_result["findings"] if precision.corpus_of(f["episode"]) == corpus]},
        indent=1)


@pytest.mark.parametrize("corpus", (*CORPORA, "nl2bash_setup"))
def test_no_attack_alert(slice_result, corpus):
    got = [(f["rule"], f["argv"]) for f in slice_result["findings"]
           if f["why"] == "attack alert" and precision.corpus_of(f["episode"]) == corpus]
    assert got == [], json.dumps(got, indent=1)
