"""The trained tiny checkpoint's recipe: tasks, the training objective's masks, determinism, shipping and caching.

The trained weights themselves are judged in tests/models/test_trained.py and tests/server/test_trained.py.
"""

import json
import random

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from sgl_diffusion.entrypoints import tiny_checkpoint as tc
from sgl_diffusion.entrypoints import tiny_tasks, tiny_training

SMALL = tiny_training.TrainRecipe(steps=2, batch_size=4, warmup_steps=1)


@pytest.fixture(scope="module")
def tokenizer():
    return tc.build_tiny_tokenizer()


def test_answers_follow_each_task():
    """copy, reverse (per word), sort (per group) and add (each sum filled in), on hand-made payloads."""
    words = "cab fed"
    assert tiny_tasks.solve("copy", words) == "cab fed"
    assert tiny_tasks.solve("reverse", words) == "bac def"
    assert tiny_tasks.solve("sort", "381 907") == "138 079"
    assert tiny_tasks.solve("add", "7+8=?? 3+4=??") == "7+8=15 3+4=07"


def test_every_example_is_spelled_character_by_character_and_aligned(tokenizer):
    """Payload and answer have the same length and one token per character (no tokenizer merge shifts an answer
    against its payload), and the layout characters (spaces, '+', '=') sit at the same places in both."""
    rng = random.Random(0)
    for _ in range(400):
        ex = tiny_tasks.make_example(rng)
        payload = ex.prompt.split(": ", 1)[1][:-1]
        assert len(payload) == len(ex.answer) == 55
        assert len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) == len(ex.prompt)
        assert len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) == len(ex.answer)
        assert [i for i, c in enumerate(payload) if c in " +="] == [i for i, c in enumerate(ex.answer) if c in " +="]


def test_score_reads_the_first_line_without_special_tokens(tokenizer):
    ex = tiny_tasks.Example("copy", "copy: abc\n", "abc")
    assert tiny_tasks.score_ids(tokenizer, ex, tokenizer("abc", add_special_tokens=False)["input_ids"] + [1, 0])
    assert not tiny_tasks.score_ids(tokenizer, ex, tokenizer("abd", add_special_tokens=False)["input_ids"])


def test_a_canvas_sees_only_the_kv_before_its_start():
    """The training decoder's masks: a canvas reads the encoder's KV before its own start and nothing after, so
    changing an example's first answer canvas (which the encoder does write, for the second canvas to read) leaves
    the first canvas's logits as they were and moves the second's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiffusionGemmaForBlockDiffusion(tc.tiny_config("trained")).float().eval()
    batches = tiny_training._Batches(tc.build_tiny_tokenizer(), model.config, random.Random(0))
    ids, rows, starts, canvas, window = batches.next(1)
    assert rows.tolist() == [0, 0]  # two canvases
    vocab = model.config.text_config.vocab_size
    noisy = torch.randint(0, vocab, (2, canvas), generator=torch.Generator().manual_seed(1))

    def logits(ids):
        with torch.no_grad():
            return tiny_training._denoise(model, tiny_training._encode(model, ids, rows, starts, canvas, window), noisy)

    changed = ids.clone()
    changed[0, starts[0] : starts[1]] = 4  # the first canvas's clean tokens
    before, after = logits(ids), logits(changed)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])
    earlier = ids.clone()
    earlier[0, 3] = 4  # a prompt token: both canvases read it
    assert not torch.allclose(before[0], logits(earlier)[0])


def test_training_is_deterministic_for_a_seed():
    """Same recipe, same losses and weights; another seed, other weights."""
    a, losses_a = tiny_training.train_tiny_model(SMALL, log=lambda _: None)
    b, losses_b = tiny_training.train_tiny_model(SMALL, log=lambda _: None)
    c, _ = tiny_training.train_tiny_model(tiny_training.TrainRecipe(seed=1, steps=2, batch_size=4), log=lambda _: None)
    assert losses_a == losses_b
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.decoder.embed_tokens.weight, c.model.decoder.embed_tokens.weight)


def test_the_loss_falls():
    """A few dozen steps on a small batch already learn the pads and the layout."""
    _, losses = tiny_training.train_tiny_model(tiny_training.TrainRecipe(steps=25, batch_size=8, warmup_steps=5),
                                               log=lambda _: None)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def test_shipped_weights_are_the_current_recipe():
    """The shipped checkpoint was trained by the default recipe as it is now; change the recipe, the preset or the
    tasks and this fails until the weights are retrained (tiny_checkpoint --trained --ship)."""
    assert tiny_training.shipped_digest() == tiny_training.TrainRecipe().digest()
    info = json.loads((tiny_training.SHIPPED / "training.json").read_text())
    assert info["recipe"] == json.loads(json.dumps(tiny_training.dataclasses.asdict(tiny_training.TrainRecipe())))
    # the configs the shipped weights were trained with are the ones tiny_checkpoint builds now (the digest's)
    for name, built in (("config.json", tc.tiny_config("trained")),
                        ("generation_config.json", tc.tiny_generation_config())):  # fmt: skip
        shipped, now = json.loads((tiny_training.SHIPPED / name).read_text()), json.loads(built.to_json_string())
        for fields in (shipped, now):
            fields.pop("transformers_version", None)
            fields.pop("dtype", None)  # saved after .float()
        assert shipped == now, name


def test_the_digest_names_everything_the_weights_depend_on(monkeypatch):
    base = tiny_training.TrainRecipe().digest()
    assert tiny_training.TrainRecipe(steps=301).digest() != base
    assert tiny_training.TrainRecipe(threads=2).digest() != base
    monkeypatch.setattr(tiny_tasks, "TASKS_VERSION", tiny_tasks.TASKS_VERSION + 1)
    assert tiny_training.TrainRecipe().digest() != base
    monkeypatch.undo()
    assert tiny_training.TrainRecipe().digest() == base
    # what tiny_checkpoint builds the model from, outside the preset: the config's canvas, the sampler's temperatures
    # (self-conditioning's), the tokenizer
    config, generation, tokenizer = tc.tiny_config, tc.tiny_generation_config, tc.build_tiny_tokenizer
    for name, build, change in (("tiny_config", config, lambda c: setattr(c, "canvas_length", 64)),
                                ("tiny_generation_config", generation, lambda g: setattr(g, "t_min", 0.3)),
                                ("build_tiny_tokenizer", tokenizer, lambda t: t.add_tokens(["<new>"]))):  # fmt: skip
        def changed(*args, build=build, change=change):
            built = build(*args)
            change(built)
            return built

        monkeypatch.setattr(tc, name, changed)
        assert tiny_training.TrainRecipe().digest() != base, name
        monkeypatch.undo()


def test_cached_checkpoint_is_built_once(tmp_path, monkeypatch):
    """A recipe that does not ship is trained into the cache once; the next call finds it; files are complete."""
    logs = []
    path = tiny_training.trained_checkpoint(tmp_path, SMALL, log=logs.append)
    assert logs and path.name == f"trained-{SMALL.digest()}"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "training.json"} <= {
        p.name for p in path.iterdir()}
    logs.clear()
    monkeypatch.setattr(tiny_training, "build_trained_checkpoint", lambda *a, **k: pytest.fail("trained again"))
    assert tiny_training.trained_checkpoint(tmp_path, SMALL, log=logs.append) == path and not logs
    assert json.loads((path / "training.json").read_text())["digest"] == SMALL.digest()


def test_shipped_checkpoint_is_assembled_without_training(tmp_path, monkeypatch):
    """The default recipe's checkpoint comes from the shipped weights plus freshly built tokenizer files."""
    monkeypatch.setattr(tiny_training, "build_trained_checkpoint", lambda *a, **k: pytest.fail("trained"))
    path = tiny_training.trained_checkpoint(tmp_path)
    assert (path / "model.safetensors").read_bytes() == (tiny_training.SHIPPED / "model.safetensors").read_bytes()
    assert (path / "tokenizer.json").exists() and (path / "chat_template.jinja").exists()


def test_the_cli_copies_the_shipped_weights_and_trains_only_when_asked(tmp_path, monkeypatch):
    """``tiny_checkpoint OUT --trained`` writes the shipped checkpoint in seconds; ``--retrain`` (or another seed,
    whose weights do not ship) trains."""
    from sgl_diffusion.entrypoints import tiny_checkpoint

    trained = []
    monkeypatch.setattr(tiny_training, "build_trained_checkpoint", lambda out, recipe: trained.append(recipe))
    tiny_checkpoint.main([str(tmp_path / "shipped"), "--trained"])
    assert not trained
    assert (tmp_path / "shipped" / "model.safetensors").read_bytes() == (
        tiny_training.SHIPPED / "model.safetensors").read_bytes()
    assert (tmp_path / "shipped" / "tokenizer.json").exists()
    tiny_checkpoint.main([str(tmp_path / "again"), "--trained", "--retrain"])
    tiny_checkpoint.main([str(tmp_path / "seed"), "--trained", "--seed", "1"])
    assert [r.seed for r in trained] == [0, 1]
