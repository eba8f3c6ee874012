"""generate.py and evaluate_lm.py run no code from a checkpoint folder unless the user says so.

A downloaded checkpoint folder is untrusted input. Every Python file of an exported Hyena-RTF folder
gets a payload that would create a marker file. The CLIs load Hyena-RTF from this repository's
code (transformers prefers a registered class to a folder's own, even with trust_remote_code), so
the marker never appears, with or without --trust-remote-code; plain transformers with
trust_remote_code=True shows that the payload is live. A folder of another custom architecture is
refused in one line that names the flag, and its code runs only once the flag is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import REPO, load_script, tiny_model, train_tiny_tokenizer

from export.folder import save_hf_checkpoint
from hf.loading import RemoteCodeRefused

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def booby_trapped(tmp_path_factory):
    """(checkpoint folder whose .py files write `marker` when imported, marker path, text file)."""
    tmp = tmp_path_factory.mktemp("remote_code")
    ckpt = save_hf_checkpoint(tiny_model(vocab=320, l_max=64), train_tiny_tokenizer(tmp / "tok.json"), tmp / "ckpt")
    marker = tmp / "payload_ran"
    for code in ckpt.glob("*.py"):
        code.write_text(code.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    text = tmp / "doc.txt"
    text.write_text("the cat sat on the mat and the dog ran to the big house. " * 4)
    return ckpt, marker, text


def cli(script: str, *args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=home,
    )


@pytest.mark.slow  # an end-to-end command: run once, under the newest transformers
def test_a_checkpoint_folders_code_never_runs_from_the_clis(booby_trapped, tmp_path):
    ckpt, marker, text = booby_trapped
    runs = [
        ("generate.py", ckpt, "--prompt", "the cat", "--max-new-tokens", 3, "--temperature", 0),
        ("generate.py", ckpt, "--prompt", "the cat", "--max-new-tokens", 3, "--trust-remote-code"),
        ("evaluate_lm.py", ckpt, "--data", text, "--context-length", 16),
    ]
    for script, *args in runs:
        proc = cli(script, *args, home=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not marker.exists(), f"the checkpoint's own code ran: {script} {args}"
    live = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from transformers import AutoConfig; "
            "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)",
            str(ckpt),
        ],
        env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert live.returncode == 0, live.stderr[-2000:]
    assert marker.exists()  # the payload is live: the CLIs really did not execute it
    marker.unlink()


def test_another_custom_architecture_is_refused_naming_the_flag(booby_trapped, tmp_path):
    _, marker, _ = booby_trapped
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps(
            {
                "model_type": "someone_elses",
                "auto_map": {"AutoConfig": "conf.OtherConfig", "AutoModelForCausalLM": "modeling.OtherLM"},
            }
        )
    )
    (other / "conf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    gen, evaluate = load_script("generate.py"), load_script("evaluate_lm.py")
    hint = "if you trust that code, add --trust-remote-code"
    with pytest.raises(gen.UsageError, match=hint):
        gen.load(str(other), "cpu", "float32")
    with pytest.raises(RemoteCodeRefused, match=hint):
        evaluate.load_config(other)
    assert not marker.exists()
