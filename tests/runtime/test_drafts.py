import dataclasses
from types import SimpleNamespace

from sgl_diffusion.runtime.drafts import DRAFT_KEY, DraftOutputStreamer, make_draft


def _streamer_fields():
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    return [f.name for f in dataclasses.fields(SchedulerOutputStreamer)]


def test_replacing_keeps_every_field_and_opts_in():
    """The draft streamer is sglang's streamer with the same sockets and settings, opted into per-chunk info."""
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    values = {name: object() for name in _streamer_fields()} | {"rust_server": None}
    old = SchedulerOutputStreamer(**values)
    new = DraftOutputStreamer.replacing(old)
    assert isinstance(new, SchedulerOutputStreamer)
    assert all(getattr(new, name) is values[name] for name in values)
    assert new.has_additional_customized_info and not old.has_additional_customized_info
    assert not new.should_build_additional_customized_info()
    new.drafts["a"] = {"canvas": 0}
    assert new.should_build_additional_customized_info()
    reqs = [SimpleNamespace(rid="b"), SimpleNamespace(rid="a")]
    assert new.build_additional_customized_info(reqs) == {DRAFT_KEY: [None, {"canvas": 0}]}
    assert new.drafts == {}  # each draft is sent once


class _Tokenizer:
    def decode(self, ids, skip_special_tokens):
        return ("S" if skip_special_tokens else "K") + ",".join(map(str, ids))


def _req(max_new_tokens, produced, skip=True):
    return SimpleNamespace(sampling_params=SimpleNamespace(max_new_tokens=max_new_tokens, skip_special_tokens=skip),
                           output_ids=[0] * produced)


def test_draft_is_cut_to_what_the_request_may_still_produce():
    draft = make_draft(_req(40, 32), list(range(10, 42)), 1, 3, _Tokenizer())
    assert draft == {"canvas": 1, "step": 3, "token_ids": list(range(10, 18)), "text": "S" + ",".join(map(str, range(10, 18)))}
    assert make_draft(_req(100, 0, skip=False), [1, 2], 0, 1, _Tokenizer())["text"] == "K1,2"
    assert make_draft(_req(100, 0), [1, 2], 0, 1, None)["text"] is None  # --skip-tokenizer-init: ids only
