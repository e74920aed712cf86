"""Shared test setup: every test starts from the same seed, on the CPU, in float32, on one
thread."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny and gain nothing from intra-op threads, while on a shared 2-core
    machine OpenMP's busy-waiting makes them 10-50x slower whenever another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def lfw_faces(tmp_path_factory):
    """A folder of 100 real photographs: the faces of scikit-image's LFW subset (25 x 25, grey), as
    PNG files."""
    pytest.importorskip("skimage")
    from tinyldm.data.example_folders import faces_folder

    return faces_folder(tmp_path_factory.mktemp("lfw_faces"))
