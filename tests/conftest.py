"""Shared fixtures. One local Ray instance serves the whole test session (ray.init costs
~2.5 s here); tests that need Ray take the `ray_session` fixture."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Ray workers inherit this environment: they import wsis_ray from this checkout (also when
# it is not pip-installed) and classes defined in test modules (pickled by reference).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), str(ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

# Keep Ray quiet and local; more logical CPUs than cores so Train workers and Ray Data
# actors can coexist (2 workers x 1 CPU + a Data stage on 2 CPUs hangs otherwise).
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    from wsis_ray.train import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=6, log_to_driver=False, object_store_memory=512 * 1024 * 1024)
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
