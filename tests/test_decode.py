"""The decode engine (decode.py) against transformers' `generate` on the tiny model, in float32 on the CPU."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.reference import RepetitionGuard
from qwen2vl_cli.runner import LoopFinder
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from tests.helpers import Quiet, answer, answers


SAMPLES = Path(__file__).parent.parent / "samples"


@pytest.fixture(scope="module")
def sessions(tiny_model):
    """The same model loaded twice: one per engine."""
    return {engine: LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32", engine=engine), Quiet())
            for engine in ("static", "hf")}


def prepared(session, media_dir, names, gen):
    return [session.prepare((str(media_dir / n),), MediaOptions(), gen) for n in names]


def both(sessions, media_dir, names, gen, **kwargs):
    out = {}
    for engine, session in sessions.items():
        batch = prepared(session, media_dir, names, gen)
        out[engine] = answers(session.runner, batch, gen, **kwargs)
    return out


@pytest.mark.parametrize(
    "names",
    [["square.png"], ["anim.gif"], ["clip.mp4"], ["photo.png", "square.png", "clip.mp4", "anim.gif"]],
    ids=["image", "gif", "video", "left-padded batch"],
)
def test_greedy_tokens_equal_transformers_generate(sessions, media_dir, names):
    gen = GenerationOptions(max_new_tokens=40)
    out = both(sessions, media_dir, names, gen)
    assert [g.tokens for g in out["static"]] == [g.tokens for g in out["hf"]]
    assert [g.finish_reason for g in out["static"]] == [g.finish_reason for g in out["hf"]]
    assert [g.prompt_tokens for g in out["static"]] == [g.prompt_tokens for g in out["hf"]]


def test_several_media_in_one_prompt_and_the_repetition_penalty(sessions, media_dir):
    gen = GenerationOptions(max_new_tokens=30, repetition_penalty=1.3, min_new_tokens=20)
    results = {}
    for engine, session in sessions.items():
        media = [session.prepare((str(media_dir / n),), MediaOptions(), gen) for n in ("square.png", "clip.mp4")]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare."}]}]
        runner = session.runner
        inputs = runner.inputs(runner.prompt_text(messages), [m for p in media for m in p.loaded])
        results[engine] = answer(runner, inputs, gen)
    assert results["static"].tokens == results["hf"].tokens and results["static"].generated_tokens >= 20


def test_sampling_with_a_seed_repeats(sessions, media_dir):
    gen = GenerationOptions(max_new_tokens=24, temperature=0.9, top_p=0.8, top_k=50, seed=7)
    first = both({"static": sessions["static"]}, media_dir, ["square.png", "photo.png"], gen)["static"]
    again = both({"static": sessions["static"]}, media_dir, ["square.png", "photo.png"], gen)["static"]
    other = both({"static": sessions["static"]}, media_dir, ["square.png", "photo.png"], replace(gen, seed=8))["static"]
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert [g.tokens for g in first] != [g.tokens for g in other]


def test_an_end_inside_a_chunk_is_trimmed_exactly(sessions):
    """The sample GIF's answer ends on its own after 37 tokens, mid-chunk: nothing after it is kept."""
    gen = GenerationOptions(max_new_tokens=60)
    out = both(sessions, SAMPLES, ["bounce.gif"], gen)
    static, hf = out["static"][0], out["hf"][0]
    assert static.finish_reason == "stop" and static.generated_tokens % 8 != 0
    assert static.tokens == hf.tokens and static.text == hf.text


def test_streamed_text_is_the_answer(sessions, media_dir):
    runner = sessions["static"].runner
    gen = GenerationOptions(max_new_tokens=50)
    [p] = prepared(sessions["static"], media_dir, ["photo.jpg"], gen)
    chunks: list[str] = []
    result = answer(runner, runner.inputs(p.text, list(p.loaded)), gen, on_text=chunks.append)
    assert len(chunks) > 1 and "".join(chunks) == result.text


def test_a_cancelled_row_stops_within_a_chunk_and_the_others_go_on(sessions, media_dir):
    runner = sessions["static"].runner
    gen = GenerationOptions(max_new_tokens=64, min_new_tokens=64)
    batch = prepared(sessions["static"], media_dir, ["square.png", "photo.png"], gen)
    cancels = [threading.Event(), threading.Event()]
    cancels[0].set()
    out = answers(runner, batch, gen, cancels=cancels)
    assert out[0].generated_tokens <= 8 and out[1].generated_tokens == 64  # stopped at the first read, the other went on
    assert out[1].tokens == both({"static": sessions["static"]}, media_dir, ["square.png", "photo.png"], gen)["static"][1].tokens


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_a_prefill_whose_clients_all_left_stops_between_layers(sessions, media_dir, engine):
    """A client that leaves during a long prompt's prefill: the next layer is not run. (One row's
    client going away while another's stays changes nothing: test above.)"""
    from qwen2vl_cli.errors import Cancelled

    runner = sessions[engine].runner
    gen = GenerationOptions(max_new_tokens=8)
    [p] = prepared(sessions[engine], media_dir, ["square.png"], gen)
    layers = runner.model.model.language_model.layers
    cancel, reached = threading.Event(), []
    hooks = [layers[0].register_forward_hook(lambda *args: cancel.set()),  # the client leaves during the first layer
             layers[1].register_forward_hook(lambda *args: reached.append(1))]
    try:
        with pytest.raises(Cancelled):
            answers(runner, [p], gen, cancels=[cancel])
    finally:
        for hook in hooks:
            hook.remove()
    assert cancel.is_set() and reached == []
    assert answers(runner, [p], gen, cancels=[threading.Event()])[0].generated_tokens > 0  # the hooks are gone


@pytest.mark.parametrize("tokens", [[5] * 60, [1, 2, 3] * 30, list(range(40)) + [7, 8] * 30, list(range(100))])
def test_loop_finder_stops_where_the_per_step_guard_does(tokens):
    """The guard as transformers runs it (once per token) and as the engine runs it (once a chunk) agree."""
    prompt = [0, 0, 0]
    guard = RepetitionGuard(len(prompt))
    per_step = None
    for length in range(1, len(tokens) + 1):
        ids = torch.tensor([prompt + tokens[:length]])
        if bool(guard(ids, None)[0]):
            per_step = length
            break
    finder = LoopFinder()
    chunked = None
    for end in range(8, len(tokens) + 8, 8):
        if (chunked := finder(0, tokens[:end])) is not None:
            break
    assert chunked == per_step


def test_engine_rules():
    from qwen2vl_cli.devices import choose_engine
    from qwen2vl_cli.errors import UsageError

    assert choose_engine("auto", "sdpa") == "static" and choose_engine("auto", "eager") == "static"
    assert choose_engine("auto", "sdpa", "cuda") == "graph" and choose_engine("auto", "sdpa", "mps") == "static"
    assert choose_engine("auto", "flash_attention_2") == "hf" and choose_engine("hf", "sdpa") == "hf"
    with pytest.raises(UsageError, match="--engine hf"):
        choose_engine("static", "flash_attention_2")
    assert choose_engine("graph", "sdpa", "cuda") == "graph"
    with pytest.raises(UsageError, match="needs --device cuda"):
        choose_engine("graph", "sdpa", "cpu")
    assert choose_engine("compiled", "sdpa", "cpu") == "compiled" and choose_engine("compiled", "sdpa", "cuda") == "compiled"
    with pytest.raises(UsageError, match="runs on cuda or cpu"):
        choose_engine("compiled", "sdpa", "mps")


def _describe(qvl, tiny_model, media_dir, engine: str, env: dict | None = None) -> tuple[dict, str]:
    """One CLI run in a fresh process (a compiled step is made once per process)."""
    import json
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "qwen2vl_cli", "describe", str(media_dir / "photo.png"), str(media_dir / "anim.gif"),
                        "--model", str(tiny_model), "--max-new-tokens", "40", "--dtype", "float32", "--engine", engine, "--json"],
                       capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_the_compiled_step_gives_the_eager_steps_tokens(qvl, tiny_model, media_dir, tmp_path):
    """Inductor's step (float32, CPU) gives the eager step's greedy tokens; compiling is timed apart
    from the first token and cached on disk under the user's cache directory (a second run compiles
    from the cache), though importing transformers' model class has named inductor's own default."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = {"XDG_CACHE_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": default_cache_dir()}
    static, _ = _describe(qvl, tiny_model, media_dir, "static")
    compiled, stderr = _describe(qvl, tiny_model, media_dir, "compiled", cache)
    assert compiled["engine"] == "compiled" and compiled["text"] == static["text"], stderr
    assert compiled["generated_tokens"] == static["generated_tokens"] and compiled["compile_s"] > 0 and static["compile_s"] is None
    assert compiled["ttft_s"] < compiled["compile_s"]
    assert any((tmp_path / "qvl" / "inductor").rglob("*.py")), "nothing was cached where qvl keeps it"
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(tmp_path / "qvl" / "inductor")  # (set in the run's own process only)


def test_a_batch_runs_in_its_bucket_with_filler_rows(tiny_model, media_dir, tmp_path):
    """Three requests run as a batch of four for the compiled step (one step serves batches of 3
    and 4); the filler row changes nothing: the same records as the static loop's batch of three."""
    import json
    import os
    import subprocess
    import sys

    from qwen2vl_cli.steps import batch_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 32, 33, 40)] == [1, 2, 4, 8, 8, 16, 32, 48, 48]
    from qwen2vl_cli.prefill import pad_rows

    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]])
    padded = pad_rows({"input_ids": ids, "attention_mask": (ids != 0).long(), "mm_token_type_ids": torch.zeros_like(ids),
                        "pixel_values": torch.ones(2, 3)}, 4, pad_id=0)
    assert padded["input_ids"].shape == (4, 3) and torch.equal(padded["input_ids"][:3], ids)
    assert padded["attention_mask"][3].tolist() == [0, 0, 1]  # attends to one position: no NaN, no media
    assert padded["mm_token_type_ids"].shape == (4, 3) and padded["pixel_values"].shape == (2, 3)
    records = {}
    for engine in ("static", "compiled"):
        r = subprocess.run([sys.executable, "-m", "qwen2vl_cli", "describe", "--each", *(str(media_dir / n) for n in ("photo.png", "clip.mp4", "square.png")),
                            "--model", str(tiny_model), "--max-new-tokens", "24", "--dtype", "float32", "--engine", engine, "--batch-size", "3"],
                           capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}, timeout=600)
        assert r.returncode == 0, r.stderr
        records[engine] = [json.loads(line) for line in r.stdout.splitlines()]
    assert [r["engine"] for r in records["compiled"]] == ["compiled"] * 3
    assert [r["text"] for r in records["compiled"]] == [r["text"] for r in records["static"]]


def _teacher_forced_logits(session, inputs, tokens: list[int], kind: str) -> torch.Tensor:
    """The step's logits for `tokens` fed one after another (the same tokens whatever the step
    picks), from the same prefill: steps compare position by position."""
    from qwen2vl_cli import prefill, steps

    model, attn = session.runner.model, session.runner.attn
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows_n, width = ids.shape
    length = steps.cache_bucket(width + len(tokens) + 1)
    cache = steps.static_cache(model, length)
    with torch.inference_mode():
        _, deltas = prefill.prefill(model, dict(inputs), cache)
        rows = steps.Rows(
            attend=torch.cat([mask.bool(), torch.zeros((rows_n, length - width), dtype=torch.bool, device=ids.device)], dim=1),
            text_position=mask.long().sum(dim=1), rope_deltas=deltas, seen=None,
            ended=torch.zeros(rows_n, dtype=torch.bool, device=ids.device), step=torch.zeros((), dtype=torch.long, device=ids.device),
            out=torch.zeros((rows_n, len(tokens)), dtype=torch.long, device=ids.device), cache_argument=steps.cache_argument(model),
        )
        first = torch.full((rows_n,), tokens[0], dtype=torch.long, device=ids.device)
        one = steps.compiled_step() if kind == "compiled" else steps.decode_one_token
        step = steps.GraphedStep(model, rows, first, cache, attn) if kind == "graph" else (lambda t: one(model, rows, t, cache, attn))
        return torch.stack([step(torch.full((rows_n,), t, dtype=torch.long, device=ids.device)).clone() for t in tokens])


@pytest.mark.parametrize("device,kind", [("cpu", "compiled")] + [("cuda", k) for k in ("graph", "compiled") if torch.cuda.is_available()])
def test_compiled_and_graphed_steps_give_the_eager_steps_logits(tiny_model, media_dir, tmp_path, monkeypatch, device, kind):
    """Teacher forcing: from one prefill, the same tokens through the eager step and through the
    compiled (or graphed) one give the same logits at every position: float32 on the CPU, bf16 on
    a GPU (within bf16's rounding)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    dtype = "float32" if device == "cpu" else "bfloat16"
    session = LocalBackend(RuntimeOptions(str(tiny_model), device=device, dtype=dtype, engine="static"), Quiet())
    gen = GenerationOptions(max_new_tokens=8)
    batch = prepared(session, media_dir, ["photo.png", "anim.gif", "square.png"], gen)
    inputs = session.runner.inputs([p.text for p in batch], [m for p in batch for m in p.loaded]).to(device)
    tokens = session.runner.processor.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"][:12]
    eager = _teacher_forced_logits(session, inputs, tokens, "eager")
    other = _teacher_forced_logits(session, inputs, tokens, kind)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    assert (other - eager).abs().max().item() <= tolerance * eager.abs().max().item()
    assert torch.equal(other.argmax(-1), eager.argmax(-1)) or dtype != "float32"


def test_where_inductor_cannot_compile_the_eager_step_runs(qvl, tiny_model, media_dir, tmp_path):
    """No C++ compiler for the CPU (a machine without build tools): the same answer from the eager step."""
    static, _ = _describe(qvl, tiny_model, media_dir, "static")
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "CXX": str(tmp_path / "no-compiler")}
    fallback, stderr = _describe(qvl, tiny_model, media_dir, "compiled", env)
    assert fallback["engine"] == "static" and fallback["text"] == static["text"], stderr
    assert "--engine compiled: the decode step could not be made here" in stderr


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_the_graphed_step_gives_the_eager_steps_tokens_on_cuda(tiny_model, media_dir):
    gen = GenerationOptions(max_new_tokens=48)
    out = {}
    for engine in ("static", "graph"):
        session = LocalBackend(RuntimeOptions(str(tiny_model), device="cuda", dtype="float32", attn="sdpa", engine=engine), Quiet())
        batch = prepared(session, media_dir, ["square.png", "photo.png", "clip.mp4"], gen)
        out[engine] = answers(session.runner, batch, gen)
    assert all(g.engine == "graph" for g in out["graph"]), "the step was not captured"
    assert [g.tokens for g in out["graph"]] == [g.tokens for g in out["static"]]


def test_a_transformers_the_loop_cannot_drive_falls_back_to_generate(qvl, tiny_model, media_dir, monkeypatch):
    from qwen2vl_cli import steps

    assert steps.unsupported(sessions_model(tiny_model)) is None  # the installed transformers is driven by the loop
    monkeypatch.setattr(steps, "unsupported", lambda model: "this transformers release takes the KV cache under a name qvl does not know")
    args = ("describe", media_dir / "square.png", "--model", tiny_model, "--max-new-tokens", "4", "--dtype", "float32")
    r = qvl(*args, "--json")
    assert r.exit_code == 0 and '"engine": "hf"' in r.stdout
    r = qvl(*args, "--engine", "static")
    assert r.exit_code == 1 and r.stderr.endswith("qvl: error: --engine static: this transformers release takes the KV cache under "
                                                  "a name qvl does not know; use --engine hf\n")


def sessions_model(tiny_model):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)


def _continuous(session, first, arrivals, gen, capacity, cancelled=()):
    """`first` runs as a batch of `capacity` rows; each arrival joins at the first read with a
    free slot and room (in order). Returns every row's generation by row number, and how many rows
    had ended when each arrival joined."""
    from qwen2vl_cli.rows import Row, Running

    runner = session.runner
    waiting = list(arrivals)
    done: dict[int, object] = {}
    joined_while: list[int] = []
    running = Running(runner, [Row(p.text, list(p.loaded), gen) for p in first], capacity)
    while running.live:
        for row, g in running.advance():
            done[row] = g
        while waiting and running.open():
            row = Row(waiting[0].text, list(waiting[0].loaded), gen, threading.Event())
            if not running.fits(row):
                break
            if len(joined_while) in cancelled:  # its client is gone by the time it joins
                row.cancel.set()
            joined_while.append(len(done))
            waiting.pop(0)
            try:
                running.join(row)
            except Exception as e:  # noqa: BLE001 - that row's failure, kept under its number
                done[len(running.rows) - 1] = e
    assert not waiting, "an arrival never joined"
    return done, joined_while


@pytest.mark.parametrize("gen", [GenerationOptions(max_new_tokens=40), GenerationOptions(max_new_tokens=30, repetition_penalty=1.3, min_new_tokens=12)],
                         ids=["greedy", "penalty and minimum"])
@pytest.mark.parametrize("first,arrivals", [(["square.png"], ["photo.png"]), (["clip.mp4"], ["photo.png", "square.png", "anim.gif"])],
                         ids=["wider than the batch", "into freed slots"])
def test_requests_that_join_a_running_batch_get_their_answers_alone(sessions, media_dir, gen, first, arrivals):
    """Continuous batching: rows that join mid-decode get exactly the tokens they get alone, and so
    do the rows they join: a prompt wider than the running batch's (the shared write position moves
    on past it), and more arrivals than free slots (they take the slots finished rows leave)."""
    session = sessions["static"]
    names = first + arrivals
    alone = [answers(session.runner, [p], gen)[0] for p in prepared(session, media_dir, names, gen)]
    batch = prepared(session, media_dir, names, gen)
    done, joined_while = _continuous(session, batch[: len(first)], batch[len(first) :], gen, capacity=2)
    rows = range(len(names))
    assert sorted(done) == list(rows)
    assert [done[row].tokens for row in rows] == [a.tokens for a in alone]
    assert [done[row].prompt_tokens for row in rows] == [a.prompt_tokens for a in alone]
    assert joined_while[0] == 0  # the first arrival joined while the first row ran
    if first == ["square.png"]:
        assert alone[1].prompt_tokens > alone[0].prompt_tokens  # the photo's prompt is wider than the square's
    else:
        assert joined_while[-1] > 0  # the last arrival waited for a slot to free
    assert all(done[row].ttft_s is not None and done[row].ttft_s > 0 for row in rows)


def _drive(batch, arrivals=(), cancel_at_first_read=()) -> dict:
    """A decode.Batch driven by hand: the rows in `cancel_at_first_read` cancelled after the first
    read; each arrival (one prompt's inputs, max_new_tokens) joins at the first read where it fits.
    Returns every row's outcome by row number."""
    from qwen2vl_cli import decode

    waiting, outcomes, reads = list(arrivals), {}, 0
    while batch.live:
        update = batch.advance()
        reads += 1
        outcomes.update(update.ended)
        if reads == 1:
            for row in cancel_at_first_read:
                batch.cancel(row)
        while waiting and batch.fits(int(waiting[0][0]["input_ids"].shape[1]), waiting[0][1]):
            inputs, most = waiting.pop(0)
            batch.join(decode.Joining(dict(inputs), threading.Event(), most))
    assert not waiting, "an arrival never joined"
    return outcomes


def test_a_batch_its_caller_drives_cancels_a_row_and_gives_its_slot_to_the_next(sessions, media_dir):
    """decode.Batch by hand: a row cancelled after the first read stops at the next one; its slot
    takes a request that was waiting (no other slot was free); every row gets the tokens it gets alone."""
    from qwen2vl_cli import decode

    runner = sessions["static"].runner
    gen = GenerationOptions(max_new_tokens=24, min_new_tokens=24)
    three = prepared(sessions["static"], media_dir, ["photo.png", "square.png", "anim.gif"], gen)
    rows = [runner.inputs(p.text, list(p.loaded)) for p in three]

    def batch(inputs):
        return decode.Batch(runner.model, dict(inputs), 24, runner.sampling(gen), runner.eos_ids(), runner.pad_id(), runner.attn, capacity=2)

    alone = [_drive(batch(inputs))[0].tokens for inputs in rows]
    two = runner.inputs([p.text for p in three[:2]], [m for p in three[:2] for m in p.loaded])
    done = _drive(batch(two), arrivals=[(rows[2], 24)], cancel_at_first_read=[0])
    assert sorted(done) == [0, 1, 2]
    assert done[0].cancelled_at == 8 and done[0].tokens[:8] == alone[0][:8]  # stopped at the next read, a chunk on
    assert done[1].tokens == alone[1] and done[1].cancelled_at is None
    assert done[2].tokens == alone[2]  # joined in the cancelled row's slot


def test_a_joining_row_that_fails_or_is_cancelled_leaves_the_others_alone(sessions, media_dir, monkeypatch):
    """One arrival's prefill runs out of memory: that request alone gets the error (it is wider than
    the batch, so its failure must not move the batch's write position); another's client is gone:
    its prefill stops at the first layer; the batch's own row and a later arrival get their answers alone."""
    from qwen2vl_cli import decode
    from qwen2vl_cli.errors import Cancelled

    session = sessions["static"]
    gen = GenerationOptions(max_new_tokens=40, min_new_tokens=40)
    names = ["photo.png", "square.png", "clip.mp4", "anim.gif"]
    alone = [answers(session.runner, [p], gen)[0] for p in prepared(session, media_dir, names, gen)]
    join = decode.into_slot
    clip_width = alone[2].prompt_tokens
    assert clip_width > alone[0].prompt_tokens

    def failing(model, rows, cache, slot, inputs, *rest):
        if inputs["input_ids"].shape[1] == clip_width:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return join(model, rows, cache, slot, inputs, *rest)

    monkeypatch.setattr(decode, "into_slot", failing)
    batch = prepared(session, media_dir, names, gen)
    done, _ = _continuous(session, batch[:1], batch[1:], gen, capacity=2, cancelled={0})
    assert isinstance(done[1], Cancelled)
    assert isinstance(done[2], torch.OutOfMemoryError)
    assert done[0].tokens == alone[0].tokens and done[3].tokens == alone[3].tokens


def test_the_compiled_step_is_made_once_for_requests_of_one_shape(tiny_model, media_dir, tmp_path, monkeypatch):
    """Two requests with different prompts in one cache bucket run the same compiled step: nothing
    about a request (its cache, its rows) makes the compiler start again."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    session = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32", engine="compiled"), Quiet())
    gen = GenerationOptions(max_new_tokens=12)
    made = []
    for name in ("photo.png", "square.png", "anim.gif"):
        [p] = prepared(session, media_dir, [name], gen)
        [g] = answers(session.runner, [p], gen)
        assert g.engine == "compiled"
        made.append(counters["stats"]["unique_graphs"])
    assert made[0] >= 1 and made[1] == made[2] == made[0], made


def test_the_steps_run_on_every_thread_and_on_one_and_leave_the_count_as_it_was(sessions, media_dir):
    """On a CPU the steps between two reads are timed on the process's threads and on one (the
    faster is kept); the prefill keeps every thread, and afterwards the count is as it was."""
    many = torch.get_num_threads()
    if many < 2:
        pytest.skip("this process has one thread")
    session = sessions["static"]
    gen = GenerationOptions(max_new_tokens=40, min_new_tokens=40)
    [p] = prepared(session, media_dir, ["square.png"], gen)
    seen: list[tuple[int, int]] = []  # (tokens in the layer's input, threads)
    layer = session.runner.model.model.language_model.layers[0]

    def heard(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden.shape[1], torch.get_num_threads()))

    hook = layer.register_forward_pre_hook(heard, with_kwargs=True)
    try:
        [out] = answers(session.runner, [p], gen)
    finally:
        hook.remove()
    assert out.generated_tokens == 40 and torch.get_num_threads() == many
    assert seen[0] == (out.prompt_tokens, many)  # the prefill
    assert {threads for width, threads in seen[1:]} == {1, many}  # the steps: both tried


def test_a_replay_is_checked_against_the_direct_step():
    """The check a captured step passes before it is used: bf16 rounding passes; other logits,
    another shape or a NaN do not."""
    from qwen2vl_cli.steps import agrees

    direct = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 8
    assert agrees(direct, direct.clone()) and agrees(direct, direct.to(torch.bfloat16).float())
    assert not agrees(direct, direct.roll(1, dims=1)) and not agrees(direct, direct[:2])
    broken = direct.clone()
    broken[1, 7] = float("nan")
    assert not agrees(direct, broken)


def test_a_wide_request_joins_only_where_the_rows_already_running_keep_their_room(sessions, media_dir):
    """A prompt wider than the write position moves every row's next write past it. A request that
    would leave a running row too little cache for the rest of its answer does not join (it waits
    for the next batch), and two requests handed over at one read are counted together: each would
    fit alone, not both. The running row ends as it would alone."""
    session = sessions["static"]
    runner = session.runner
    [square, clip, photo] = prepared(session, media_dir, ["square.png", "clip.mp4", "photo.png"], GenerationOptions())
    clip_width, photo_width = (int(runner.inputs(p.text, list(p.loaded))["input_ids"].shape[1]) for p in (clip, photo))

    def offered(most: int, offers: list[tuple[int, int]]) -> list[bool]:
        """What the batch's `fits` says of each offer at the first read of a batch running the square for `most` tokens."""
        from qwen2vl_cli.rows import Row, Running

        gen = GenerationOptions(max_new_tokens=most, min_new_tokens=most)
        running = Running(runner, [Row(square.text, list(square.loaded), gen)], capacity=4)
        said: list[bool] = []
        while running.live:
            ended = running.advance()
            if not said:
                said.extend(running.batch.fits(width, max_new) for width, max_new in offers)
        assert ended[0][1].tokens == answers(runner, [square], gen)[0].tokens
        return said

    square_width = answers(runner, [square], GenerationOptions(max_new_tokens=1))[0].prompt_tokens
    # Running 100 tokens (cache 2 x (prompt + 100)): the clip's prompt would push the square's last 99 past the cache.
    assert clip_width + 10 <= 2 * (square_width + 100) < clip_width + 99
    assert offered(100, [(clip_width, 10)]) == [False]
    # Running 141: the clip (short answer) fits alone and the photo (long answer) fits alone, not both.
    length = 2 * (square_width + 141)
    assert clip_width + 140 <= length and photo_width + 200 <= length < clip_width + 200
    assert offered(141, [(photo_width, 200), (clip_width, 10)]) == [True, False]


def test_the_thread_probe_tries_a_few_steps_not_whole_reads():
    """The steps' thread count is tried for STEPS steps of a read, the rest of the read on the
    count chosen so far (a whole read on one thread made an int8 answer a fifth slower)."""
    import torch

    from qwen2vl_cli.steps import StepThreads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = StepThreads(cpu=True)
        seen = []
        for _ in range(3):
            with threads.steps() as timed:
                seen.append([])
                for _ in range(6):
                    seen[-1].append(torch.get_num_threads())
                    timed.stepped()
        assert seen == [[2] * 6, [1, 1, 2, 2, 2, 2], [2] * 6]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
