"""The canvas event loop (scheduler_hook.run_event_loop) on a stand-in scheduler and engine."""

from sgl_diffusion.runtime import scheduler_hook


class FakeScheduler:
    """Paused for the first ``paused_turns`` turns of the loop; exits after ``turns``."""

    def __init__(self, paused_turns: int, turns: int):
        self.paused_turns, self.turns, self.calls = paused_turns, turns, []
        self.gracefully_exit, self._engine_paused, self.turn = False, False, 0

    def ingest_requests(self):
        self.turn += 1
        self._engine_paused = self.turn <= self.paused_turns
        self.gracefully_exit = self.turn >= self.turns

    def __getattr__(self, name):  # maybe_sleep_on_idle, on_idle, maybe_send_health_check_signal
        return lambda *args: self.calls.append((self.turn, name))


class FakeEngine:
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __getattr__(self, name):  # admit, admit_compiled_grammars, step, publish_load
        return lambda *args: self.scheduler.calls.append((self.scheduler.turn, name)) or name == "has_work"


def test_a_paused_engine_sleeps_until_the_next_message_and_admits_nothing(monkeypatch):
    """While /pause_generation holds the engine, each turn publishes the load and sleeps on sglang's sockets (woken by
    the next message, /continue_generation among them) instead of spinning a core; nothing is admitted or run."""
    monkeypatch.setattr(scheduler_hook, "DiffusionEngine", FakeEngine)
    scheduler = FakeScheduler(paused_turns=3, turns=4)
    scheduler_hook.run_event_loop(scheduler)
    paused = [name for turn, name in scheduler.calls if turn <= 3]
    assert paused == ["publish_load", "maybe_sleep_on_idle"] * 3
    assert [name for turn, name in scheduler.calls if turn == 4][:3] == ["admit_compiled_grammars", "admit", "has_work"]
