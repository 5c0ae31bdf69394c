import pytest


@pytest.fixture(scope="module")
def interpreted():
    """A child process under the Triton interpreter, one per test module (see interpreter.py)."""
    from tests.attention.interpreter import InterpretedWorker

    worker = InterpretedWorker()
    yield worker
    worker.close()
