"""`edgemoe eval` perplexity on the trained fixture against transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from refs import transformers_perplexity


def test_eval_matches_transformers_perplexity(fixture_dir, tmp_path):
    text = fixture_dir / "heldout.txt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgemoe",
            "eval",
            str(fixture_dir),
            "--text",
            str(text),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # off the repo root, where `edgemoe` is the bare folder
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ref_ppl, ref_tokens = transformers_perplexity(fixture_dir, text)
    assert got["tokens"] == ref_tokens == 7076
    assert abs(got["perplexity"] / ref_ppl - 1) < 0.005
    # The fixture's README publishes 21.93 for this method.
    assert np.isclose(got["perplexity"], 21.93, atol=0.01)
