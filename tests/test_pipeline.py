"""The pipeline as real processes on the CPU: a scheduler and 1-3 workers over ZeroMQ give
the in-process engine's tokens, one request or eight at once, and stream them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_fixtures import GREEDY, PROMPTS, add_predictors, cluster, make_tiny_model

from dejavu.runtime.checkpoint import load_model
from dejavu.runtime.sampling import SamplingParams
from dejavu.scheduler.engine import Engine
from dejavu.scheduler.zmq_client import PipelineConnection

SAMPLED = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=1234,
                         ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny, greedy):
    engine = Engine(load_model(tiny), max_batch=8, max_len=128)
    sampled = [engine.generate(p, SAMPLED).tokens for p in PROMPTS[:3]]
    return greedy, sampled


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_pipeline_tokens_equal_the_in_process_engine(tiny, reference, workers):
    greedy, sampled = reference
    with cluster(tiny, workers) as c, PipelineConnection(c.address) as conn:
        health = conn.health()
        spans = [w.layers for w in health.workers]
        assert len(spans) == workers and spans[0][0] == 0 and spans[-1][1] == 4
        # One at a time, then all eight at once (continuous batching over micro-batches).
        one_by_one = [conn.run([p], GREEDY)[0] for p in PROMPTS]
        together = conn.run(PROMPTS, GREEDY)
        randomly = conn.run(PROMPTS[:3], SAMPLED)
        assert [c.tokens for c in one_by_one] == greedy
        assert [c.tokens for c in together] == greedy
        assert all(c.finish_reason == "length" and c.error is None for c in together)
        assert [c.tokens for c in randomly] == sampled
        after = conn.health()
        assert after.tokens_out == 8 * 12 * 2 + 3 * 10
        assert len(after.stage_s) == workers and len(after.hop_s) == workers - 1
        assert len(after.queue_s) == workers  # one per stage: worker 0's input is RunStep
        # One step more than stages in flight (the default): all of them were used at once.
        cores = 1 if workers == 1 else workers + 1
        assert after.micro_batches == cores and after.in_flight_peak == cores
        if workers == 2:
            from types import SimpleNamespace

            from dejavu.scheduler.chat import format_stats

            text = format_stats(after, {"tokens": 1, "seconds": 1.0},
                                SimpleNamespace(turns=[], dropped=0, max_len=128))
            assert f"micro-batches: {cores} (most in flight so far {after.in_flight_peak})" \
                in text and "input wait for a busy stage (ms): " in text
            check_streaming_abort_and_bad_requests(conn, greedy)


def test_a_hop_sent_to_a_busy_worker_counts_its_wait_as_queue_not_transfer():
    """The worker was still running earlier steps for 2 s of a hop: that is the
    pipeline's queue; the transfer is what remains (a pipeline's "hop" of 3.8 ms on one
    H100 was mostly this)."""
    from dejavu.workers.worker import split_hop

    assert split_hop(10.0, 12.0, 12.001) == pytest.approx((0.001, 2.0))
    assert split_hop(10.0, 9.0, 10.5) == pytest.approx((0.5, 0.0))  # free: all transfer
    assert split_hop(10.0, 0.0, 10.0002) == pytest.approx((0.0002, 0.0))  # first step
    # Clocks that disagree (another host) never give negative times or more than the hop.
    assert split_hop(10.0, 13.0, 12.0) == pytest.approx((0.0, 2.0))
    assert split_hop(10.0, 9.0, 9.5) == (0.0, 0.0)


def check_streaming_abort_and_bad_requests(conn, greedy):
    # Streaming: tokens arrive one event at a time, the last one says why it ended.
    events = list(conn.stream(PROMPTS[2], GREEDY))
    assert [e.token for e in events] == greedy[2]
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    # Closing a stream early aborts the request; the cluster serves the next one.
    stream = conn.stream(PROMPTS[0], SamplingParams(max_new_tokens=100, ignore_eos=True))
    next(stream)
    stream.close()
    assert conn.run([PROMPTS[1]], GREEDY)[0].tokens == greedy[1]
    # Bad requests fail alone, with the field named, before any worker sees them.
    bad = conn.run([[], [500], [1] * 120], SamplingParams(max_new_tokens=20))
    assert "empty" in bad[0].error
    assert "500" in bad[1].error and "vocabulary" in bad[1].error
    assert "128 positions" in bad[2].error
    assert conn.health().running == 0


def test_sparse_pipeline_carries_predictor_inputs_and_equals_the_sparse_engine(tmp_path):
    """3 workers: both stage boundaries carry the next stage's predictor input."""
    from dejavu.runtime.predictors import PredictorSet
    from dejavu.runtime.selection import PredictorSelector, SelectionConfig

    model_dir = make_tiny_model(tmp_path / "sparse")
    path = add_predictors(model_dir)
    model = load_model(model_dir)
    selector = PredictorSelector(PredictorSet.load(path, model),
                                 SelectionConfig(mlp_density=0.3, head_density=0.5))
    sparse = Engine(model, max_batch=8, max_len=128, selector=selector)
    # Top-k selection is discontinuous: a last-bit difference can flip a near-tie and the
    # tokens after it. Compute the reference with the workers' thread count (config's
    # threads=1), whatever earlier tests left this process with.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = [sparse.generate(p, GREEDY).tokens for p in PROMPTS]
    finally:
        torch.set_num_threads(threads)
    dense = Engine(load_model(model_dir), max_batch=8, max_len=128)
    assert want != [dense.generate(p, GREEDY).tokens for p in PROMPTS]  # not a no-op
    with cluster(model_dir, 3, sparse=True, mlp_density=0.3, head_density=0.5) as c, \
            PipelineConnection(c.address) as conn:
        # One request at a time: a batch computes the union of its rows' selections, so
        # sparse tokens depend on what is batched together (dense ones do not).
        assert [conn.run([p], GREEDY)[0].tokens for p in PROMPTS] == want
        densities = conn.health().densities
    assert len(densities) == 3
    # Computed fractions per stage: at least the operating point (a prompt chunk computes the
    # union of its tokens' selections), and less than dense.
    assert all(0.3 <= m < 1 and 0.5 <= h < 1 for m, h in densities), densities


# --- the shipped model (when its weights are in the checkout) ---------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "opt-gutenberg-31m"
SHIPPED_PROMPTS = ["It was a dark and stormy night", "The old man looked at the sea and",
                   "Chapter one. In the beginning", "She opened the letter, and"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists()
                    and not (SHIPPED / "model.safetensors.index.json").exists(),
                    reason="the shipped model's weights are not in this checkout")
@pytest.mark.parametrize("workers,sparse", [(1, False), (2, False), (3, False), (3, True)])
def test_shipped_model_through_launch_equals_the_in_process_engine(workers, sparse):
    from dejavu.runtime.build import build_stage, resolve
    from dejavu.runtime.predictors import find_predictors
    from dejavu.runtime.settings import make_settings
    from dejavu.runtime.tokenizer import load_tokenizer

    if sparse and find_predictors(SHIPPED) is None:
        pytest.skip("the shipped model has no predictors yet")
    tok = load_tokenizer(SHIPPED)
    prompts = [tok.encode(p) for p in SHIPPED_PROMPTS]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    # The in-process engine as generate builds it, from the same (default) settings.
    settings = resolve(make_settings({"model.path": str(SHIPPED)}), sparse)
    engine = Engine.from_stage(build_stage(settings, slots=8, max_len=256).stage, tok)
    want = [engine.generate(p, params).tokens for p in prompts]
    with cluster(SHIPPED, workers, max_len=256, sparse=sparse) as c, \
            PipelineConnection(c.address) as conn:
        assert [conn.run([p], params)[0].tokens for p in prompts] == want
        if not sparse:  # 8 at once give what each gives alone (dense: no row unions)
            together = conn.run(prompts * 2, params)
            assert [x.tokens for x in together] == want * 2
