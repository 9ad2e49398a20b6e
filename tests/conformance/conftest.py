import families  # noqa: F401  (merges family_*.py into the formula and target tables)
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread, and on a shared machine a second thread mostly
    waits for a core (measured here: 0.1 s of CPU per case on one thread, 2-4 s on two under
    load). The slow tier's real models keep torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
