"""Shared pytest set-up. Tests use tiny shapes, which run fastest on one thread (and far faster
than two spinning threads when other processes share the 2 cores); subprocesses set their own."""

import atexit
import os
import shutil
import tempfile

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
from _train_utils import make_corpus, reference_curve  # noqa: E402


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
