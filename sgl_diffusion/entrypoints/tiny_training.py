"""Train the tiny DiffusionGemma on generated tasks, on the CPU, in minutes: a checkpoint that converges.

    python -m sgl_diffusion.entrypoints.tiny_checkpoint OUT_DIR --trained

Random weights never converge (their entropy never falls), so every canvas runs all its steps. This trains the
"trained" preset with the model's own objective, through transformers' own modules:

- a sequence is ``<bos>prompt`` + answer + ``<eos>``, the answer padded with ``<pad>`` to whole canvases; the
  encoder runs once over the clean sequence (causal, writes the KV cache);
- each canvas of the answer is corrupted at its own rate t (U(0, 1) ** noise_power): every position is replaced, with
  probability t, by a token drawn uniformly from the whole vocabulary (uniform-state diffusion: no mask token);
- the decoder denoises every canvas of the batch at once, each reading only the KV before its own start (and, on
  sliding layers, only the last window - 1 of it), as at inference; the loss is the cross-entropy of the clean
  tokens at every position;
- self-conditioning as transformers implements it: a first, gradient-free decoder pass gives logits; for half of
  the canvases (``self_conditioning_mask``) the second pass is conditioned on them, divided by a temperature drawn
  from the sampler's own range [t_min, t_max].

Deterministic for a recipe: the data, noise and initialisation come from the recipe's seed, and torch runs with the
recipe's number of threads (reduction order depends on it; one thread, because a second OpenMP thread on a busy
core stalls both). Another CPU (another SIMD width, another BLAS code path) may still round differently, so weights
are only reproducible on the same kind of machine.

The default recipe's weights ship in ``trained_tiny/`` (6.8 MB, float32): tests and benches use them through
``trained_checkpoint()`` instead of training for ten minutes on every clean checkout, and every machine tests the
same weights. A test checks that they are the current recipe's (``TrainRecipe().digest()``, which also hashes the
configs and the tokenizer that ``tiny_checkpoint`` builds): after changing the recipe, the preset, the tiny configs,
the tokenizer or the tasks (bump ``RECIPE_VERSION`` / ``tiny_tasks.TASKS_VERSION`` with any change to what the
training code or the tasks produce), retrain and ship with
``python -m sgl_diffusion.entrypoints.tiny_checkpoint DIR --trained --ship``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import platform
import random
import shutil
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sgl_diffusion.entrypoints import tiny_tasks

RECIPE_VERSION = 1  # bump when the training code changes what a recipe produces (then retrain and ship, below)
# The default recipe's checkpoint, trained once and shipped (6.8 MB): CI and benches use it instead of training.
SHIPPED = pathlib.Path(__file__).with_name("trained_tiny")
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "training.json")


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    seed: int = 0
    steps: int = 800
    batch_size: int = 32  # examples per step (each brings all its canvases)
    lr: float = 4e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1  # cosine decay to lr * this
    weight_decay: float = 0.01
    self_conditioning_prob: float = 0.5
    noise_power: float = 0.5  # corruption rate t = U(0, 1) ** power: below 1 favours heavy noise (the first steps)
    threads: int = 1  # torch intra-op threads while training: part of what the weights depend on

    def digest(self) -> str:
        """Content hash of everything the weights depend on (the recipe; the model and generation configs, preset
        included; the tokenizer; the tasks; this code), transformers' version aside."""
        blob = json.dumps({"recipe": dataclasses.asdict(self), **_checkpoint_inputs(),
                           "tasks": tiny_tasks.TASKS_VERSION,
                           "version": RECIPE_VERSION}, sort_keys=True)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _checkpoint_inputs() -> dict:
    """What tiny_checkpoint builds the trained model from: its config (canvas length, vocabulary size, layer types),
    the generation config (t_min/t_max set the self-conditioning temperatures) and the tokenizer (vocab, merges,
    specials: they turn the tasks into ids)."""
    from sgl_diffusion.entrypoints import tiny_checkpoint as tc

    def settings(config) -> dict:
        fields = json.loads(config.to_json_string())
        fields.pop("transformers_version", None)
        return fields

    tokenizer = tc.build_tiny_tokenizer().backend_tokenizer.to_str()
    return {"config": settings(tc.tiny_config("trained")), "generation": settings(tc.tiny_generation_config()),
            "tokenizer": hashlib.sha256(tokenizer.encode()).hexdigest()}


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny_model(recipe: TrainRecipe = TrainRecipe(), log: Callable[[str], None] = print):
    """The trained float32 model (transformers' DiffusionGemmaForBlockDiffusion, eval mode) and its loss curve."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from sgl_diffusion.entrypoints import tiny_checkpoint as tc

    with _threads(recipe.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = DiffusionGemmaForBlockDiffusion(tc.tiny_config("trained")).float().train()
        model.generation_config = tc.tiny_generation_config()
        batches = _Batches(tc.build_tiny_tokenizer(), model.config, random.Random(recipe.seed))
        gen = torch.Generator().manual_seed(recipe.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
        losses, start = [], time.monotonic()
        for step in range(recipe.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(recipe, step)
            loss = _loss(model, *batches.next(recipe.batch_size), gen, recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(round(loss.item(), 4))
            if step % 25 == 0 or step == recipe.steps - 1:
                log(f"step {step}/{recipe.steps} loss {losses[-1]:.4f} ({time.monotonic() - start:.0f} s)")
    return model.eval(), losses


def build_trained_checkpoint(out_dir, recipe: TrainRecipe = TrainRecipe(), log: Callable[[str], None] = print):
    """Train, then write the checkpoint's files (as build_tiny_checkpoint does) plus training.json."""
    from sgl_diffusion.entrypoints import tiny_checkpoint as tc

    out = pathlib.Path(out_dir)
    start = time.monotonic()
    model, losses = train_tiny_model(recipe, log)
    model.save_pretrained(out)
    tc.build_tiny_processor().save_pretrained(out)
    info = {"recipe": dataclasses.asdict(recipe), "digest": recipe.digest(),
            "train_seconds": round(time.monotonic() - start, 1),
            "final_loss": losses[-1], "losses": losses, "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}  # fmt: skip
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return out


def trained_checkpoint(cache_dir=None, recipe: TrainRecipe = TrainRecipe(), log: Callable[[str], None] = print):
    """The trained checkpoint for ``recipe``, assembled once into ``cache_dir/trained-<digest>`` and reused after.

    The default recipe's weights ship with the package (``SHIPPED``): they are copied, and the tokenizer and
    processor files built, in a second. Any other recipe (or shipped weights of another digest) is trained here.
    ``cache_dir`` defaults to ``SGL_DIFFUSION_CACHE_DIR`` or ``~/.cache/sgl-diffusion``. Concurrent callers wait for
    the one that builds it (a lock file); a half-written directory is never picked up, because it is written under
    a temporary name and renamed when complete.
    """
    import fcntl

    from sgl_diffusion.env import CacheEnv

    root = pathlib.Path(cache_dir or CacheEnv.from_environ().cache_dir
                        or pathlib.Path.home() / ".cache" / "sgl-diffusion")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"trained-{recipe.digest()}"
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "training.json").exists():
            tmp = root / f"{final.name}.tmp-{os.getpid()}"
            if shipped_digest() == recipe.digest():
                copy_shipped(tmp)
            else:
                log(f"training the tiny checkpoint into {final} (once; later runs reuse it)")
                build_trained_checkpoint(tmp, recipe, log)
            os.replace(tmp, final)
    return final


def copy_shipped(out_dir) -> pathlib.Path:
    """The shipped checkpoint written to ``out_dir`` (its weights, and the tokenizer and processor files built)."""
    from sgl_diffusion.entrypoints import tiny_checkpoint as tc

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copyfile(SHIPPED / name, out / name)
    tc.build_tiny_processor().save_pretrained(out)
    return out


def shipped_digest() -> str | None:
    """The recipe digest of the shipped weights (None when there are none)."""
    path = SHIPPED / "training.json"
    return json.loads(path.read_text())["digest"] if path.exists() else None


def ship(checkpoint_dir) -> None:
    """Replace the shipped weights by a checkpoint built with ``build_trained_checkpoint`` (the default recipe)."""
    SHIPPED.mkdir(exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copyfile(pathlib.Path(checkpoint_dir) / name, SHIPPED / name)


# ---- one training step -----------------------------------------------------------------------------------------


class _Batches:
    """Right-padded sequences (prompt + answer canvases) and the (example, canvas start) of every canvas."""

    def __init__(self, tokenizer, config, rng: random.Random):
        self.tokenizer, self.rng = tokenizer, rng
        text = config.text_config
        self.canvas, self.window = config.canvas_length, text.sliding_window
        self.bos, self.eos, self.pad = text.bos_token_id, 1, text.pad_token_id  # <eos>: the first EOS id

    def next(self, n: int):
        examples = [tiny_tasks.make_example(self.rng) for _ in range(n)]
        prompts = self.tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
        answers = self.tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
        seqs, starts, rows = [], [], []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            prompt, answer = [self.bos, *prompt], [*answer, self.eos]
            canvases = -(-len(answer) // self.canvas)
            answer += [self.pad] * (canvases * self.canvas - len(answer))
            rows += [i] * canvases
            starts += [len(prompt) + k * self.canvas for k in range(canvases)]
            seqs.append(prompt + answer)
        # NOTE: the encoder only needs what some canvas reads: everything before the last canvas start
        length = max(starts)
        ids = torch.tensor([(s + [self.pad] * (length + self.canvas - len(s)))[: length + self.canvas] for s in seqs])
        return ids, torch.tensor(rows), torch.tensor(starts), self.canvas, self.window


class _Context(NamedTuple):
    """What the decoder reads for each canvas row: the encoder's KV, the masks over it, the canvas positions."""

    cache: object  # DynamicCache, batch = canvas rows
    masks: dict[str, torch.Tensor]  # layer type -> [rows, 1, C, cached + C] bool
    positions: torch.Tensor  # [rows, C]

    def select(self, rows: torch.Tensor) -> _Context:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in self.cache.layers])
        return _Context(cache, {k: m[rows] for k, m in self.masks.items()}, self.positions[rows])


def _encode(model, ids, rows, starts, canvas: int, window: int) -> _Context:
    """Encode the clean sequences once (causal); each canvas row then sees only the KV before its own start (on
    sliding layers, the last window - 1 of it), as at inference."""
    from transformers.cache_utils import DynamicCache

    length, n = ids.shape[1] - canvas, rows.numel()
    # NOTE: a plain DynamicCache (no config) keeps every layer's whole KV; the masks below apply the window.
    cache = DynamicCache()
    model.model.encoder(input_ids=ids[:, :length], past_key_values=cache, use_cache=True)
    per_canvas = DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in cache.layers])
    keys = torch.arange(length + canvas)  # [cached positions ; the canvas]
    own = keys[None] >= length
    full = own | (keys[None] < starts[:, None])
    sliding = own | ((keys[None] < starts[:, None]) & (keys[None] >= starts[:, None] - (window - 1)))
    masks = {"full_attention": full[:, None, None].expand(n, 1, canvas, -1),
             "sliding_attention": sliding[:, None, None].expand(n, 1, canvas, -1)}  # fmt: skip
    return _Context(per_canvas, masks, starts[:, None] + torch.arange(canvas))


def _denoise(model, context: _Context, noisy, sc_logits=None, sc_mask=None) -> torch.Tensor:
    """Decoder logits [rows, C, V] of the canvases ``noisy`` [rows, C]."""
    return model(decoder_input_ids=noisy, past_key_values=context.cache, decoder_attention_mask=context.masks,
                 decoder_position_ids=context.positions, self_conditioning_logits=sc_logits,
                 self_conditioning_mask=sc_mask).logits  # fmt: skip


def _loss(model, ids, rows, starts, canvas, window, gen, recipe):
    vocab = model.config.text_config.vocab_size
    n = rows.numel()
    context = _encode(model, ids, rows, starts, canvas, window)
    clean = ids[rows[:, None], context.positions]  # [n, C]
    rate = torch.rand(n, 1, generator=gen) ** recipe.noise_power
    noise = torch.randint(0, vocab, (n, canvas), generator=gen)
    noisy = torch.where(torch.rand(n, canvas, generator=gen) < rate, noise, clean)
    t_min, t_max = model.generation_config.t_min, model.generation_config.t_max
    temperature = t_min + (t_max - t_min) * torch.rand(n, 1, 1, generator=gen)
    use_sc = torch.rand(n, generator=gen) < recipe.self_conditioning_prob
    first = torch.zeros(n, canvas, vocab)  # rows without self-conditioning are masked out: never computed
    sc_rows = use_sc.nonzero()[:, 0]
    if sc_rows.numel():
        with torch.no_grad():
            first[sc_rows] = _denoise(model, context.select(sc_rows), noisy[sc_rows])
    logits = _denoise(model, context, noisy, first / temperature, use_sc)
    return F.cross_entropy(logits.reshape(-1, vocab), clean.reshape(-1))


def _lr(recipe: TrainRecipe, step: int) -> float:
    warm = min(1.0, (step + 1) / recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * step / max(recipe.steps - 1, 1)))
    return recipe.lr * warm * (recipe.final_lr_fraction + (1 - recipe.final_lr_fraction) * cosine)
