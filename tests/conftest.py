"""Shared pytest set-up. Tests use tiny shapes, which run fastest on one thread (and far faster
than two spinning threads when other processes share the 2 cores); subprocesses set their own."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The project's folders are its packages, imported from the repository root (pyproject's pytest
# `pythonpath`); the scripts and `python -m` commands the tests start, in any folder, get the root on
# their import path the same way a user's shell would give it.
ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])

# The whole suite runs offline, and the code that trust_remote_code loads goes to a throwaway folder,
# never the user's cache. Set here, before any test module imports transformers (huggingface_hub
# reads both at import); subprocesses (pytest-xdist workers included) inherit them, and the process
# that made the folder removes it when it exits.
os.environ["HF_HUB_OFFLINE"] = "1"
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hyena_rtf_hf_modules_")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from support.train_utils import make_corpus, reference_curve  # noqa: E402

# Two tiers, one folder each. tests/unit/: what `pytest` with no arguments runs (well under a minute
# on 2 cores), for the person changing one module: the mathematics against its float64 references,
# the model's layers and caches, data formats, configs and decisions. tests/integration/, and any
# unit-folder test marked `integration` (seconds of work): whole commands, trainings, exports in
# fresh processes, distributed runs, the Hugging Face contract end to end. Name a folder or a file,
# or pass -m, to run them; scripts/test.sh (CI) runs every tier.
INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    """Mark the integration tier; with no arguments at all (no files, no -m), run only the unit tier.

    Order: files holding end-to-end tests (marked slow) first, then the rest of the integration tier,
    then the unit tier, each file's tests in their own order. pytest-xdist hands out whole files in
    this order (scripts/test.sh: --dist loadfile --no-loadscope-reorder), so a run ends on many
    short files instead of one worker finishing a minute-long file while the other waits (xdist's
    own order, by number of tests per file, put the few-test multi-process files last)."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in slow_files, INTEGRATION not in item.path.parents))
    bare = config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.markexpr
    if bare:
        drop = [item for item in items if item.get_closest_marker("integration")]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = [item for item in items if not item.get_closest_marker("integration")]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The tiny prepared corpus of the training tests, built once per test process (no test writes
    into it)."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """The uninterrupted one-process training curve on `corpus`, which the distributed runs match."""
    return reference_curve(corpus, tmp_path_factory.mktemp("single"))
