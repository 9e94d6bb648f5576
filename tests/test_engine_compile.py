"""torch_compile=True: the decode forward compiled as one graph around the paged custom op.

One compiled engine per family is built and reused (CPU compiles take tens of seconds):
its greedy tokens equal the eager engine's and transformers' generate(); the decode
forward has no graph break; batch sizes 1..8 (and shared prefixes, which run cascade
decode) compile the designed number of graphs and no more; the model keeps working with
plain transformers afterwards. Float64 models, so that eager, sdpa, inductor's fused
kernels and the paged kernels pick the same tokens.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch._dynamo.utils import ReinplaceCounters, counters

from _models import generate_one_by_one, tiny, tiny_family
from pagedkv.engine import Engine, SamplingParams
from pagedkv.integrations import attention, attention_op
from pagedkv.integrations.compiled import MAX_DECODE_GRAPHS, CompiledDecode

NEW = 6
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("single_thread")


def prompts_of(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def one_by_one(model, prompts):
    """transformers' generate() with its default cache, one prompt at a time."""
    return generate_one_by_one(model, prompts, NEW)


def tokens(engine, prompts):
    return [o.token_ids for o in engine.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def llama():
    """A float64 tiny llama, its compiled engine (warmed up: every decode graph compiled),
    and the graph-break count Dynamo saw while compiling it."""
    model = tiny("llama").double()
    breaks = sum(counters["graph_break"].values())
    missed = ReinplaceCounters.get_total_missed()
    engine = Engine(model, num_blocks=96, block_size=8, max_num_seqs=8, torch_compile=True)
    warm = engine.warmup()
    seen = dict(breaks=sum(counters["graph_break"].values()) - breaks,
                missed_inplace=ReinplaceCounters.get_total_missed() - missed)  # fmt: skip
    return model, engine, warm, seen


def test_warmup_compiles_every_decode_graph_without_a_break(llama):
    """warmup() compiles the three decode graphs (one sequence; several; several with a
    cascade plan); Dynamo breaks no graph (each is the whole forward), and inductor runs
    the op on the pool in place (a missed re-inplacing would clone the pool every step)."""
    _, engine, warm, seen = llama
    assert seen == dict(breaks=0, missed_inplace=0), dict(counters["graph_break"])
    assert warm.compiles == engine.runner.compiled.graphs == MAX_DECODE_GRAPHS


def test_compiled_tokens_equal_eager_and_generate(llama):
    model, engine, _, _ = llama
    prompts = prompts_of((5, 19, 11, 3))
    eager = Engine(model, num_blocks=96, block_size=8, max_num_seqs=8)
    ref = tokens(eager, prompts)
    assert tokens(engine, prompts) == ref == one_by_one(model, prompts)
    assert engine.runner.compiled is not None, "torch.compile fell back to eager"


def test_batch_sizes_1_to_8_and_shared_prefixes_compile_nothing_more(llama, monkeypatch):
    """After warm-up, decode batches of every size 1..8, of varying table widths, with
    and without shared prefixes (cascade plans), reuse the compiled graphs: no recompile,
    no break, and every token equals the eager engine's."""
    model, engine, _, _ = llama
    cascades = []  # (the engine computing, tracing)
    calls = collections.Counter()  # (the engine computing, "op" | "eager", is_decode)
    who = ["eager"]

    def counting(fn, record):
        def wrapped(*args, **kwargs):
            record(args)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(attention_op.ops, "cascade_decode", counting(
        attention_op.ops.cascade_decode,
        lambda a: cascades.append((who[0], torch.compiler.is_compiling()))))  # fmt: skip
    # the custom op's body calls attention_op.attend; the eager path its own import of it
    for mod, path in ((attention_op, "op"), (attention, "eager")):
        monkeypatch.setattr(mod, "attend", counting(
            mod.attend, lambda a, path=path: calls.update([(who[0], path, a[13])])))  # fmt: skip
    graphs = engine.runner.compiled.graphs
    frames = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    eager = Engine(model, num_blocks=96, block_size=8, max_num_seqs=8)
    shared = prompts_of((16,), seed=9)[0]  # two whole blocks: cascade groups form
    for n in range(1, 9):
        lengths = tuple(3 + 5 * i for i in range(n))  # tables of 1 to 6 blocks
        for prefix in ((), shared):
            prompts = prompts_of(lengths, seed=n, prefix=prefix)
            who[0] = "compiled"
            out = tokens(engine, prompts)
            who[0] = "eager"
            assert out == tokens(eager, prompts), (n, len(prefix))
    assert engine.runner.compiled is not None
    # cascade decode ran in the compiled engine, inside the op (not traced)
    assert ("compiled", False) in cascades and not any(t for _, t in cascades)
    # every decode forward of the compiled engine ran the compiled graph (through the op);
    # its prefill ran eagerly; the eager engine never reached the op
    assert calls["compiled", "op", True] > 0 and calls["compiled", "eager", True] == 0
    assert calls["compiled", "eager", False] > 0 and calls["compiled", "op", False] == 0
    assert not calls["eager", "op", True] and calls["eager", "eager", True] > 0
    assert engine.runner.compiled.graphs == graphs == MAX_DECODE_GRAPHS
    assert counters["stats"]["unique_graphs"] == frames
    assert sum(counters["graph_break"].values()) == breaks


def test_cuda_graph_forwards_of_every_bucket_reuse_the_warmup_graphs(llama):
    """What DecodeGraphs captures (here run, not captured: no CUDA): the decode forward
    over its static buffers, for every batch x table-width bucket, plain and cascade.
    Those inputs are views of other buffers (offsets, strides) and must not make the
    compiled forward recompile: each capture runs one of the warm-up's graphs."""
    from pagedkv.engine.cuda_graphs import DecodeGraphs

    _, engine, _, _ = llama
    runner = engine.runner
    graphs = DecodeGraphs(runner, max_batch=8)
    before = runner.compiled.graphs
    runs = 0
    with torch.inference_mode():
        for b in graphs.buckets:
            for wb in graphs.widths:
                for cascade in (False, True) if b > 1 else (False,):
                    if cascade:
                        graphs.plans[b, wb] = graphs._plan(b, wb)
                        graphs.plans[b, wb].grouping.refill(())
                    graphs.static.zero_()
                    graphs.static[2 * b : 3 * b].fill_(-1)  # padding slots, as _capture
                    graphs.static[4 * b : 5 * b].fill_(-1)
                    assert graphs._forward(b, wb, cascade).shape == (b, 256)
                    runs += 1
    assert runs == 4 * 4 * 2 - 4 and runner.compiled is not None
    assert runner.compiled.graphs == before == MAX_DECODE_GRAPHS


def test_model_keeps_working_with_plain_transformers(llama):
    """The compiled engine changed nothing of the model: generate() (its own attention,
    its own cache, no compile) still gives the tokens of a fresh copy of the model."""
    model, engine, _, _ = llama
    prompts = prompts_of((7, 12), seed=4)
    tokens(engine, prompts)
    assert model.config._attn_implementation != "pagedkv"
    assert "forward" not in vars(model)  # the class's forward, not a compiled wrapper
    assert one_by_one(model, prompts) == one_by_one(tiny("llama").double(), prompts)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def fail(self, gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(CompiledDecode, "_backend", fail)
    model = tiny("llama").double()
    engine = Engine(model, num_blocks=64, block_size=8, torch_compile=True)
    prompts = prompts_of((4, 9))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = tokens(engine, prompts)
    msgs = [str(w.message) for w in seen if "torch.compile disabled" in str(w.message)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0]
    assert engine.runner.compiled is None
    assert out == one_by_one(model, prompts)


def test_batch_invariant_mode_runs_eagerly(llama):
    """Batch invariance is a dispatch mode around the eager forward: with it on, the
    compiled engine compiles nothing and gives the eager invariant engine's tokens."""
    model, _, _, _ = llama
    prompts = prompts_of((5, 11, 3), seed=6)
    kw = dict(num_blocks=64, block_size=8, batch_invariant=True)
    engine = Engine(model, torch_compile=True, **kw)
    assert tokens(engine, prompts) == tokens(Engine(model, **kw), prompts)
    assert engine.runner.compiled is not None and engine.runner.compiled.graphs == 0


@pytest.mark.slow
def test_gemma2_softcaps_and_windows_compile_to_the_same_tokens():
    """A second family: Gemma 2 (attention and final logit softcaps, alternating
    sliding windows, its own query scaling) compiled equals eager and generate()."""
    model = tiny_family("gemma2")
    breaks = sum(counters["graph_break"].values())
    engine = Engine(model, num_blocks=96, block_size=8, max_num_seqs=8, torch_compile=True)
    prompts = prompts_of((5, 17, 11), seed=2) + prompts_of((1,), seed=3)
    ref = tokens(Engine(model, num_blocks=96, block_size=8, max_num_seqs=8), prompts)
    assert tokens(engine, prompts) == ref == one_by_one(model, prompts)
    assert engine.runner.compiled is not None
    assert sum(counters["graph_break"].values()) == breaks
    # batches of 4, 3, 2 (graph 2) and the last sequence alone (graph 1); no cascade:
    # the prompts share no prefix
    assert engine.runner.compiled.graphs <= 2


@pytest.mark.gpu
def test_cuda_compiled_forward_inside_cuda_graphs_keeps_the_tokens():
    """torch_compile=True with CUDA graphs: warm-up compiles, then captures graphs that
    run the compiled forward; the tokens equal the eager engine's (also with graphs)."""
    model = tiny("llama").cuda()
    prompts = prompts_of((5, 19, 11, 3, 30, 8), prefix=prompts_of((16,), seed=9)[0])
    prompts += prompts_of((6, 13), seed=5)
    eager = Engine(model, num_blocks=128, block_size=8, max_num_seqs=16, cuda_graphs=True)
    ref = tokens(eager, prompts)
    engine = Engine(model, num_blocks=128, block_size=8, max_num_seqs=16, cuda_graphs=True,
                    torch_compile=True)  # fmt: skip
    warm = engine.warmup()
    assert warm.graphs > 0 and warm.compiles <= MAX_DECODE_GRAPHS
    assert tokens(engine, prompts) == ref
    runner = engine.runner
    assert runner.compiled is not None, "torch.compile fell back to eager"
    assert runner.graphs is not None and not runner.graphs.disabled
    assert runner.compiled.graphs == warm.compiles  # nothing compiled after warm-up


def test_a_capture_failing_in_the_compiled_forward_is_retried_eagerly():
    """DecodeGraphs: a capture that failed inside the compiled forward (which turned
    itself off) is captured once more on the eager forward; any other failure raises."""
    from types import SimpleNamespace

    from pagedkv.engine.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs.__new__(DecodeGraphs)  # no CUDA here: only the retry logic
    calls = []

    def capture(key):
        calls.append(graphs.runner.compiled)
        if graphs.runner.compiled is not None:
            graphs.runner.compiled = None  # as ModelRunner.forward does when it fails
            raise RuntimeError("operation not permitted when stream is capturing")

    graphs.runner = SimpleNamespace(compiled="compiled forward")
    graphs._capture = capture
    graphs._capture_key((1, 8, False, None))
    assert calls == ["compiled forward", None]
    graphs._capture = lambda key: (_ for _ in ()).throw(ValueError("eager capture failed"))
    with pytest.raises(ValueError, match="eager capture failed"):
        graphs._capture_key((1, 8, False, None))
