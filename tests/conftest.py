import pytest

from svis_ray.data.demo import make_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo dataset (8 train + 2 val videos of 10 frames, 96x128), made once per run."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, videos=8, val_videos=2, frames=10, seed=0)
    return root


@pytest.fixture
def one_torch_thread():
    """torch at one intra-op thread for the test, as in Ray's workers and actors (Ray sets
    OMP_NUM_THREADS=1): mask logits near 0 flip a few pixels with another summation order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test run: logical CPUs above the 2 real cores (Train workers
    hold whole CPUs and Ray Data must still schedule decode tasks), 2 fake GPUs for teacher
    scheduling, a small object store, token auth off, the dashboard on (Train V2's placement
    group cleaner queries the State API)."""
    import os

    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=8, num_gpus=2, object_store_memory=400 * 1024**2,
             include_dashboard=True, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def minvis_pth(tmp_path_factory):
    """Seeded weights laid out as the official MinVIS YTVIS19 R50 checkpoint (a 176 MB .pth,
    made once): seed 1, as tools/make_golden.py gave the reference implementation."""
    from svis_ray.model.seeded import MINVIS_PTH_KEYS, key_list, seeded_state_dict, write_minvis_pth

    path = tmp_path_factory.mktemp("minvis") / "model_final.pth"
    return write_minvis_pth(path, seeded_state_dict(key_list(MINVIS_PTH_KEYS), seed=1))
