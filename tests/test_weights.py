"""Teacher weights across restarts (issue 24.5) and the process-group backend (issue 24.1):
the WeightStore keeps only the current worker-group attempt's weights, survives its own death,
and rank 0's publisher never blocks the step; the trainer leaves the backend to Ray."""
import time

import pytest
import torch

from svis_ray.config import load_config
from svis_ray.demo_job import DEBUG_CONFIG


def test_trainer_on_a_cpu_driver_asks_nccl_for_gpu_workers(monkeypatch, tmp_path):
    """The driver (a CPU-only head node) never picks gloo from its own CUDA: Ray decides from the
    workers' resources. Nothing starts: only the trainer is built."""
    from svis_ray.train import build_trainer, worker_resources

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(DEBUG_CONFIG, [f"output.dir={tmp_path / 'run'}", "train.use_gpu=true",
                                     "train.node_resource=student_node"])
    trainer = build_trainer(cfg, ["a", "b", "c"], None, None)
    assert trainer.backend_config.backend == "nccl"
    assert trainer.scaling_config.use_gpu
    assert worker_resources(cfg) == {"CPU": 1.0, "GPU": 1, "student_node": 1}
    cpu = build_trainer(load_config(DEBUG_CONFIG, [f"output.dir={tmp_path / 'cpu'}"]), ["a"], None, None)
    assert cpu.backend_config.backend == "gloo"  # CPU workers: Ray's choice again


@pytest.fixture(scope="module")
def store_cls(ray_local):
    from svis_ray.teacher import WeightStore

    return WeightStore


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value)}


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_store_serves_only_the_current_attempt(store_cls):
    import ray

    store = store_cls.remote()
    ray.get(store.reset.remote(1))
    ray.get(store.put.remote(1, 10, _state(10.0)))
    # the worker group restarts from a checkpoint at step 4: the lost trajectory's step-10 weights go
    ray.get(store.reset.remote(2))
    assert ray.get(store.get.remote(2, -1)) == (-1, [])
    assert ray.get(store.put.remote(1, 12, _state(12.0))) == (2, -1)  # a dead group's late put: ignored
    assert ray.get(store.put.remote(2, 4, _state(4.0))) == (2, 4)  # older step, newer attempt: taken
    version, ref = ray.get(store.get.remote(2, -1))
    assert version == 4 and ray.get(ref[0])["w"][0].item() == 4.0
    assert ray.get(store.get.remote(1, -1)) == (-1, [])  # a teacher of the lost attempt gets nothing
    assert ray.get(store.get.remote(2, 4)) == (4, [])  # nothing newer than what it has
    ray.kill(store)


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize("steps_run", [True, False], ids=["steps-poll", "no-step-watchdog"])
def test_restarted_store_gets_the_weights_again(store_cls, steps_run):
    """Ray restarts a dead store empty; rank 0 puts the weights back: noticed by the per-step
    probe, or -- when the store died before the teachers got any weights, so no batch comes and
    no step runs -- by the publisher's watchdog alone."""
    import ray
    from ray.util.state import get_actor

    from svis_ray.train import WeightPublisher

    store = store_cls.remote()
    ray.get(store.reset.remote(7))
    ema = torch.nn.Linear(2, 2)
    pub = WeightPublisher(store, 7, check_s=0.2 if not steps_run else 2.0)
    pub.publish(ema, 3)
    ray.get(pub.inflight)
    ray.kill(store, no_restart=False)  # Ray restarts it (max_restarts), empty

    def restarted() -> bool:  # the kill is asynchronous: the old instance may still answer at first
        a = get_actor(store._actor_id.hex())
        return a is not None and a.state == "ALIVE" and a.num_restarts >= 1

    deadline = time.time() + 120  # a restart starts a worker process: slow on a loaded box
    while time.time() < deadline:
        if steps_run:
            pub.poll(ema, 3)  # what rank 0 does every step
        try:
            if restarted() and ray.get(store.held.remote()) == (7, 3):
                break
        except ray.exceptions.RayError:
            pass
        time.sleep(0.05)
    assert ray.get(store.held.remote()) == (7, 3)
    version, ref = ray.get(store.get.remote(7, -1))
    assert version == 3 and torch.equal(ray.get(ref[0])["weight"], ema.weight.detach())
    pub.close()
    ray.kill(store)


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_publish_does_not_block_and_keeps_one_in_flight(ray_local):
    import ray

    from svis_ray.train import WeightPublisher

    @ray.remote(num_cpus=0)
    class SlowStore:  # a store whose puts take 1 s, recording what arrives
        def __init__(self):
            self.steps = []

        def put(self, attempt, step, state):
            time.sleep(1.0)
            self.steps.append(step)
            return attempt, step

        def held(self):
            return 1, (self.steps[-1] if self.steps else -1)

        def received(self):
            return self.steps

    store = SlowStore.remote()
    ray.get(store.held.remote())  # started
    ema = torch.nn.Linear(2, 2)
    pub = WeightPublisher(store, 1)
    t0 = time.perf_counter()
    pub.publish(ema, 1)
    pub.publish(ema, 2)  # due while step 1's put is in flight: waits, nothing sent
    assert time.perf_counter() - t0 < 0.5
    ray.get(pub.inflight)
    assert ray.get(store.received.remote()) == [1]
    pub.poll(ema, 3)  # the next step: the due publish goes out with the current weights
    ray.get(pub.inflight)
    assert ray.get(store.received.remote()) == [1, 3]
    pub.close()
    ray.kill(store)
