"""sglang's frontend language (``import sglang as sgl``) against a real server: gen, chat, fork, stream, batch, images.

The DSL has no way to send ``diffusion`` parameters (its SglSamplingParams is a fixed set), so every canvas
would run the checkpoint's default of 48 denoise steps, which takes seconds on 2 loaded cores. These tests run on
the session's ``configured_server``, started with ``--preferred-sampling-params '{"diffusion":
{"max_denoising_steps": 2}}'``, which is how a user sets the sampler for DSL programs.
"""

import threading

import pytest
import requests

import sglang as sgl
import sgl_diffusion.frontend  # noqa: F401  (registers the diffusiongemma template)

pytestmark = pytest.mark.slow

DEFAULT_STEPS = 2
CANVAS = 32

@pytest.fixture(scope="module")
def dsl_server(configured_server):
    """Started with ``--preferred-sampling-params '{"diffusion": {"max_denoising_steps": 2}}'`` (tests/server/
    conftest.py), which sets the sampler for DSL programs, which cannot send one (README "Frontend DSL"): every
    canvas here takes DEFAULT_STEPS steps unless a request says otherwise."""
    return configured_server


@pytest.fixture(scope="module")
def backend(dsl_server):
    # sglang's own default markup, what a served path the frontend cannot tell as DiffusionGemma gets (this test
    # checkpoint is local, so its path would pick the Gemma 4 markup)
    return sgl.RuntimeEndpoint(dsl_server.url, chat_template_name="default")


@pytest.fixture(scope="module")
def gemma_backend(dsl_server):
    return sgl.RuntimeEndpoint(dsl_server.url, chat_template_name="diffusiongemma")


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    img = Image.new("RGB", (48, 32))
    img.putdata([((5 * x) % 256, (7 * y) % 256, (x * y) % 256) for y in range(32) for x in range(48)])
    img.save(path)
    return str(path)


def run_with_timeout(program, timeout=120, **kwargs):
    """Run a program in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    result = {}

    def target():
        try:
            result["state"] = program.run(**kwargs)
            result["state"].sync()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            result["exception"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"DSL program still running after {timeout}s"
    if "exception" in result:
        raise result["exception"]
    return result["state"]


@sgl.function
def story(s, max_tokens=5, temperature=None):
    s += "Once upon a time"
    s += sgl.gen("a", max_tokens=max_tokens, ignore_eos=True, temperature=temperature)


def test_gen_max_tokens(backend):
    """gen(max_tokens=5) inside one canvas returns exactly 5 tokens, denoised with the server's preferred steps (the
    checkpoint's default is 48)."""
    state = run_with_timeout(story, backend=backend)
    assert state.error() is None
    meta = state.get_meta_info("a")
    assert meta["completion_tokens"] == 5 and meta["finish_reason"]["type"] == "length"
    assert meta["diffusion_steps"][0] == DEFAULT_STEPS
    assert state.text() == "Once upon a time" + state["a"]


@sgl.function
def two_turns(s):
    s += sgl.system("You are terse.")
    s += sgl.user("Hi")
    s += sgl.assistant(sgl.gen("a1", max_tokens=6, ignore_eos=True))
    s += sgl.user("More")
    s += sgl.assistant(sgl.gen("a2", max_tokens=6, ignore_eos=True))


@pytest.mark.parametrize("template", ["frontend default", "gemma4 markup"])
def test_multi_turn_chat(backend, gemma_backend, template):
    """system/user/assistant turns: both answers are generated and the second turn reuses the first's prompt KV."""
    state = run_with_timeout(two_turns, backend=backend if template == "frontend default" else gemma_backend)
    assert state.error() is None
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant"]
    # the DSL strips the whitespace before a turn's content in messages() (lstrip; random answers end in any char)
    assert state.messages()[2]["content"] == state["a1"].lstrip() and state.messages()[4]["content"] == state["a2"].lstrip()
    first, second = state.get_meta_info("a1"), state.get_meta_info("a2")
    for meta in (first, second):
        # unseeded random answers: the stop string ("<turn|>", one token here) may end one, even as its 6th token
        assert (meta["completion_tokens"], meta["finish_reason"]["type"]) == (6, "length") or (
            meta["completion_tokens"] <= 6 and meta["finish_reason"]["type"] == "stop"), meta
    assert second["cached_tokens"] >= first["prompt_tokens"]


@sgl.function
def forked(s):
    s += "Story:"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f" branch {i}:" + sgl.gen("b", max_tokens=5, ignore_eos=True)
    forks.join()
    s += "A:" + forks[0]["b"] + " B:" + forks[1]["b"]
    s["first"], s["second"] = forks[0]["b"], forks[1]["b"]
    s["branch_meta"] = [f.get_meta_info("b") for f in forks]


def test_fork(backend):
    """fork(2) generates in both branches, each its own request, and joins them."""
    state = run_with_timeout(forked, backend=backend)
    assert state.error() is None
    # NOTE: not first != second: 5 random tokens of the tiny vocabulary may decode alike (e.g. all U+FFFD). Nor
    # cached_tokens: the DSL sends no prefix request here, and what one branch reuses of the other's prompt depends
    # on which the scheduler admits first.
    metas = state["branch_meta"]
    assert len(metas) == 2 and metas[0]["id"] != metas[1]["id"]
    for meta in metas:
        assert (meta["completion_tokens"], meta["finish_reason"]["type"]) == (5, "length"), meta
    assert state.text() == f"Story:A:{state['first']} B:{state['second']}"


def test_stream_text_iter(backend, dsl_server, tiny_checkpoint_dir):
    """stream=True: text_iter() yields the committed text canvas by canvas and adds up to the final text."""
    from transformers import AutoTokenizer

    # temperature 0 is greedy with seed 0: the same output as this /generate call
    ids = requests.post(f"{dsl_server.url}/generate", timeout=120, json={
        "text": "Once upon a time", "sampling_params": {"max_new_tokens": 3 * CANVAS, "temperature": 0, "ignore_eos": True},
    }).json()["output_ids"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    # at most one chunk per canvas (not at least: sglang hands a stream only the newest of its unread chunks)

    def one_run(var):
        state = story.run(max_tokens=3 * CANVAS, temperature=0, stream=True, backend=backend)
        chunks = list(state.text_iter(var)) if var else list(state.text_iter())
        assert state.error() is None
        return chunks, (state["a"] if var else state.text())

    chunks, text = one_run("a")
    assert "".join(chunks) == text == full and 1 <= len(chunks) <= 3
    chunks, text = one_run(None)
    assert "".join(chunks) == text and chunks[0] == "Once upon a time" and 1 <= len(chunks) - 1 <= 3


def test_run_batch(backend):
    """run_batch runs several programs concurrently; each gets its own complete answer."""
    states = story.run_batch([{"max_tokens": n} for n in (4, 9, 40)], backend=backend, num_threads=3)
    assert [s.error() for s in states] == [None] * 3
    assert [s.get_meta_info("a")["completion_tokens"] for s in states] == [4, 9, 40]


@sgl.function
def describe(s, path):
    s += sgl.user((sgl.image(path) if path else "") + "what is this?")
    s += sgl.assistant(sgl.gen("d", max_tokens=6, ignore_eos=True))


def test_image_prompt_with_gemma4_placeholder(gemma_backend, png):
    """sgl.image with the <|image|> placeholder reaches the vision path: the prompt grows by the image's soft tokens."""
    with_image = run_with_timeout(describe, path=png, backend=gemma_backend)
    text_only = run_with_timeout(describe, path=None, backend=gemma_backend)
    assert with_image.error() is None and text_only.error() is None
    grown = with_image.get_meta_info("d")["prompt_tokens"] - text_only.get_meta_info("d")["prompt_tokens"]
    assert grown == 62  # <|image|> becomes <|image> + 60 soft tokens (48x32 px, 4 px patches pooled 2x2) + <image|>


@pytest.mark.parametrize("template", ["default", "gemma-4-it"])
def test_image_prompt_with_stock_template_is_refused(dsl_server, png, template):
    """sglang's own frontend templates write '<image>', which Gemma 4 does not read: the image is refused with a
    message naming the placeholder, never dropped silently."""
    backend = sgl.RuntimeEndpoint(dsl_server.url, chat_template_name=template)
    with pytest.warns(UserWarning, match="Error in stream_executor"):
        state = run_with_timeout(describe, path=png, backend=backend)
    assert isinstance(state.error(), RuntimeError) and "<|image|>" in str(state.error())
    assert dsl_server.healthy()


@pytest.mark.parametrize("path", ["google/diffusiongemma-26B-A4B-it", "/models/DiffusionGemma-26B-A4B-it"])
def test_frontend_chat_template_for_the_real_checkpoint(path):
    """With sgl_diffusion.frontend imported, the DSL picks Gemma 4 chat markup (model role, <|image|> placeholder) for
    the real checkpoint's path; other Gemma paths keep sglang's own choice."""
    from sglang.lang.chat_template import get_chat_template_by_model_path

    template = get_chat_template_by_model_path(path)
    assert template.role_prefix_and_suffix["assistant"][0].startswith("<|turn>model\n")
    assert template.image_token == "<|image|>"
    assert get_chat_template_by_model_path("google/gemma-4-31B-it").name == "gemma-4-it"


def test_frontend_chat_template_for_a_local_checkpoint_of_any_name(tiny_checkpoint_dir, tmp_path):
    """A DiffusionGemma checkpoint directory on the program's machine gets the Gemma 4 markup whatever its name (the
    tests' own, say); a directory of another model, or a missing one, does not."""
    from sglang.lang.chat_template import get_chat_template_by_model_path

    assert "diffusion" not in str(tiny_checkpoint_dir).lower()
    assert get_chat_template_by_model_path(str(tiny_checkpoint_dir)).name == "diffusiongemma"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert get_chat_template_by_model_path(str(tmp_path)).name != "diffusiongemma"
    assert get_chat_template_by_model_path(str(tmp_path / "missing")).name != "diffusiongemma"


@sgl.function
def gen_with(s, kwargs):
    s += "Q:"
    s += sgl.gen("a", max_tokens=4, **kwargs)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"top_p": 0.5}, "top_p"),
        ({"top_k": 5}, "top_k"),
        ({"min_tokens": 2}, "min_new_tokens"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"stop_regex": "x"}, "stop_regex"),
    ],
)
def test_refused_dsl_parameters(backend, kwargs, word):
    """DSL parameters the canvas sampler cannot honour end the program with the server's 400 naming them (select,
    regex, gen_int and logprobs work: tests/server/test_structured.py)."""
    with pytest.warns(UserWarning, match="Error in stream_executor"):
        state = run_with_timeout(gen_with, timeout=60, kwargs=kwargs, backend=backend)
    assert isinstance(state.error(), RuntimeError) and word in str(state.error())


def test_accepted_dsl_sampling_parameters(backend):
    """temperature, top_k=1, stop and the DSL's default top_p/top_k/min_p/penalties values are accepted."""
    state = run_with_timeout(gen_with, kwargs={"temperature": 0.5, "top_k": 1, "stop": ["\n"], "top_p": 1.0,
                                               "min_p": 0.0, "presence_penalty": 0.0}, backend=backend)
    assert state.error() is None and state.get_meta_info("a")["completion_tokens"] <= 4
