"""The Train launcher's local Ray (`train.start_local_ray`, used by the jobs, the seeds CLI,
the benchmarks and this suite's `ray_session`)."""
import os


def test_workers_of_a_local_ray_reach_its_state_api(ray_session):
    """Ray Train's PlacementGroupCleaner asks the State API, from a worker process, whether
    the Train controller actor is alive, and frees the run's placement group when the answer
    is not "alive". Here a worker asks the same question about a live actor: it must reach
    this Ray's own State API and hear "ALIVE" (without a dashboard the query fails; with
    another Ray on the machine it could reach that one, where the actor does not exist)."""
    ray = ray_session
    from ray.util.state import get_actor

    @ray.remote(num_cpus=0)
    class Controller:  # stands in for the Train controller
        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

    @ray.remote(num_cpus=0)
    def ask(actor_id: str) -> tuple[str | None, str | None]:
        state = get_actor(actor_id, timeout=30)
        return os.environ.get("RAY_API_SERVER_ADDRESS"), state.state if state else None

    controller = Controller.remote()
    actor_id = ray.get(controller.actor_id.remote())
    api, state = ray.get(ask.remote(actor_id))
    assert api == os.environ["RAY_API_SERVER_ADDRESS"]  # inherited from the driver's ray.init
    assert state == "ALIVE"
    ray.kill(controller)
