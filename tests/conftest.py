"""Shared test setup: the project's flat modules are importable, and tests run small and single-process."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contended ones.
    Modules that start training loops use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """The tiny random teacher pipeline (tests/toyteacher.py), written once per session."""
    from toyteacher import make_teacher
    return make_teacher(str(tmp_path_factory.mktemp("teacher")))


@pytest.fixture(scope="session")
def pipe(teacher):
    from pipeline import load_pipeline
    return load_pipeline(teacher)
