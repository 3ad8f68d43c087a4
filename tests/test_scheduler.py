"""The scheduler state machine, stepped with synthetic results: no model, no tensors."""

from __future__ import annotations

import pytest

from dejavu.runtime.sampling import SamplingParams
from dejavu.runtime.step import StepResult, TokenResult
from dejavu.scheduler.core import RequestError, Scheduler, SchedulerConfig


def make(max_slots=2, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(max_slots=max_slots, max_len=128, vocab_size=100, eos_id=2,
                                     prefill_chunk=4, **kw))


def answer(sched: Scheduler, step, token_for) -> list:
    results = [TokenResult(r.request_id, token_for(r) if r.sample else None) for r in step.rows]
    return sched.update(StepResult(step.step_id, results))


class CharDetok:
    """Token t decodes to chr(ord('a') + t % 26): enough to exercise stop strings."""

    def push(self, token_id: int) -> str:
        return chr(ord("a") + token_id % 26)


def test_prefill_is_chunked_then_decode_rows_feed_the_last_token():
    s = make()
    s.add("a", list(range(3, 13)), SamplingParams(max_new_tokens=3, ignore_eos=True))
    starts = []
    while s.has_work():
        step = s.schedule()
        row = step.rows[0]
        starts.append((row.start, len(row.tokens), row.sample))
        answer(s, step, lambda r: 50 + r.start)
    # 10 prompt tokens in chunks of 4, 4, 2 (only the last samples), then 2 decode steps.
    assert starts == [(0, 4, False), (4, 4, False), (8, 2, True), (10, 1, True), (11, 1, True)]
    assert s.requests["a"].output == [58, 60, 61]


def test_slots_are_reused_only_after_release_and_waiting_requests_queue():
    s = make(max_slots=1)
    s.add("a", [5, 6], SamplingParams(max_new_tokens=1))
    s.add("b", [7, 8], SamplingParams(max_new_tokens=1))
    step = s.schedule()
    assert [r.request_id for r in step.rows] == ["a"]
    assert s.schedule() is None  # b waits for a's slot
    events = answer(s, step, lambda r: 9)
    assert events[0].finished and events[0].finish_reason == "length"
    step = s.schedule()
    assert [r.request_id for r in step.rows] == ["b"]
    assert step.rows[0].slot == 0 and step.release == ["a"]


def test_eos_stops_unless_ignored():
    s = make()
    s.add("a", [5], SamplingParams(max_new_tokens=10))
    s.add("b", [5], SamplingParams(max_new_tokens=3, ignore_eos=True))
    finished = {}
    while s.has_work():
        step = s.schedule()
        for e in answer(s, step, lambda r: 2):
            if e.finished:
                finished[e.request_id] = (e.finish_reason, len(s.requests[e.request_id].output))
    assert finished == {"a": ("stop", 1), "b": ("length", 3)}


def test_stop_string_truncates_and_is_never_streamed():
    s = Scheduler(SchedulerConfig(max_slots=1, max_len=64, vocab_size=100, eos_id=None),
                  detokenizer_factory=CharDetok)
    s.add("a", [1], SamplingParams(max_new_tokens=20, stop=("cde",)))
    streamed, tokens = "", iter([0, 1, 2, 3, 4, 5, 6])  # "abcdefg"
    while s.has_work():
        step = s.schedule()
        for e in answer(s, step, lambda r: next(tokens)):
            streamed += e.text
            last = e
    assert streamed == "ab" and last.finish_reason == "stop"


def test_abort_in_flight_frees_the_slot_only_when_the_step_returns():
    s = make(max_slots=1)
    s.add("a", [5, 6], SamplingParams(max_new_tokens=5))
    step = s.schedule()
    event = s.abort("a")
    assert event.finished and event.finish_reason == "abort"
    s.add("b", [5], SamplingParams(max_new_tokens=1))
    assert s.schedule() is None  # a's step still writes slot 0
    assert answer(s, step, lambda r: 9) == []
    assert s.schedule().rows[0].request_id == "b"


def test_failed_step_fails_its_requests_and_others_go_on():
    s = make(max_slots=2)
    s.add("a", [5], SamplingParams(max_new_tokens=2, ignore_eos=True))
    first = s.schedule()
    s.add("b", [6], SamplingParams(max_new_tokens=2, ignore_eos=True))
    second = s.schedule()
    events = s.fail_step(first.step_id, "worker 1 died")
    assert [(e.request_id, e.finish_reason, e.error) for e in events] == [
        ("a", "error", "worker 1 died")]
    answer(s, second, lambda r: 7)
    step = s.schedule()
    assert [r.request_id for r in step.rows] == ["b"]


def test_row_error_fails_only_that_request():
    s = make(max_slots=2)
    s.add("a", [5], SamplingParams(max_new_tokens=2, ignore_eos=True))
    s.add("b", [6], SamplingParams(max_new_tokens=2, ignore_eos=True))
    step = s.schedule()
    assert len(step.rows) == 2
    events = s.update(StepResult(step.step_id, [TokenResult("b", 7)], errors={"a": "boom"}))
    by_id = {e.request_id: e for e in events}
    assert by_id["a"].finish_reason == "error" and "boom" in by_id["a"].error
    assert by_id["b"].token == 7 and not by_id["b"].finished


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([5, 100], SamplingParams(), "outside the vocabulary"),
        ([5, -1], SamplingParams(), "outside the vocabulary"),
        ([5] * 120, SamplingParams(max_new_tokens=9), "exceeds the model.s 128 positions"),
        ([5], SamplingParams(stop=("x",)), "stop strings need a tokenizer"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_queued(prompt, params, message):
    s = make()
    with pytest.raises(RequestError, match=message):
        s.add("a", prompt, params)
    assert not s.has_work() and s.schedule() is None


def test_queue_bound_and_duplicate_ids():
    s = make(max_slots=1, max_waiting=2)
    s.add("a", [5], SamplingParams())
    with pytest.raises(RequestError, match="already in use"):
        s.add("a", [5], SamplingParams())
    s.add("b", [5], SamplingParams())
    with pytest.raises(RequestError, match="queue full"):
        s.add("c", [5], SamplingParams())


def test_several_steps_in_flight_never_share_a_request():
    s = make(max_slots=4)
    for i in range(4):
        s.add(f"r{i}", [5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True))
    in_flight = []
    seen = set()
    while (step := s.schedule()) is not None:
        ids = {r.request_id for r in step.rows}
        assert not ids & seen
        seen |= ids
        in_flight.append(step)
    assert seen == {"r0", "r1", "r2", "r3"}
    for step in in_flight:
        answer(s, step, lambda r: 9)
    assert {len(r.output) for r in s.requests.values()} == {1}


def test_unseeded_requests_get_a_fixed_seed():
    s = make()
    s.add("a", [5], SamplingParams(temperature=1.0))
    assert s.requests["a"].params.seed is not None


def test_zero_new_tokens_scores_the_prompt_and_samples_nothing():
    s = make()
    s.add("a", [5, 6, 7, 8, 9, 10], SamplingParams(max_new_tokens=0, prompt_logprobs=True))
    events = []
    while s.has_work():
        step = s.schedule()
        assert not any(r.sample for r in step.rows)
        results = [TokenResult(r.request_id, prompt_logprobs=[-1.0] * (len(r.tokens) - 1 + (
            r.score_next is not None))) for r in step.rows]
        events += s.update(StepResult(step.step_id, results))
    assert s.requests["a"].output == []
    assert sum(len(e.prompt_logprobs or []) for e in events) == 5
    assert events[-1].finished and events[-1].finish_reason == "length"


def test_abort_and_forget_while_waiting_leave_the_queue_whole():
    # One slot: "b" and "c" wait behind "a". A client gives up on "b" (abort, then forget, as
    # the front ends do when a connection drops): admission must go on with "c".
    s = make(max_slots=1)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for rid in "abc":
        s.add(rid, [5, 6], params)
    step = s.schedule()
    assert [r.request_id for r in step.rows] == ["a"]
    assert s.abort("b").finish_reason == "abort"
    s.forget("b")
    assert "b" not in s.requests and list(s.waiting) == ["c"]
    while s.has_work():
        answer(s, step, lambda r: 7)
        step = s.schedule()
        while step is None and s.has_work():
            step = s.schedule()
    assert s.requests["c"].output == [7, 7]
    assert s.requests["a"].output == [7, 7]


# --- micro-batches sized from measured times -------------------------------------------------


def test_micro_batch_groups_cover_the_round_trip_over_the_slowest_stage():
    from dejavu.scheduler.batches import micro_batch_groups

    assert micro_batch_groups([1.0, 1.0], [0.5], most=8) == 3  # (2 + 0.5) / 1 -> 3
    assert micro_batch_groups([1.0, 1.0], [0.0], most=8) == 2  # equal stages, free hops
    assert micro_batch_groups([3.0, 1.0, 1.0], [0.2, 0.2], most=8) == 2  # ceil(5.4 / 3)
    assert micro_batch_groups([1.0] * 4, [1.0] * 3, most=4) == 4  # bounded by the cores
    assert micro_batch_groups([2.0], [], most=4) == 1  # one stage: one step at a time
    assert micro_batch_groups([], [], most=3) == 3  # nothing measured yet: every core
    # The scheduler's own round trip (the way back, its work) when longer than the stages'
    # and hops: two equal stages with free hops still want a third step in flight.
    assert micro_batch_groups([1.0, 1.0], [0.0], most=8, round_trip_s=2.5) == 3
    assert micro_batch_groups([1.0, 1.0], [0.5], most=8, round_trip_s=1.0) == 3  # the sum
    with pytest.raises(ValueError, match="finite"):
        micro_batch_groups([1.0, float("nan")], [0.1], most=2)


def test_two_stages_on_one_gpu_get_a_third_step_in_flight():
    # The H100 run of 2026-12-06 (opt-1.3b, 8 streams, 2 workers on one GPU): stages 1.22
    # and 2.69 ms, hop 1.60 ms. ceil(5.51 / 2.69) = 3 steps keep the slow stage busy; with
    # one core per worker the scheduler could keep only 2.
    from dejavu.scheduler.batches import micro_batch_groups
    from dejavu.scheduler.config import default_micro_batches

    cores = default_micro_batches(workers=2, slots=8)
    assert cores == 3
    assert micro_batch_groups([1.22e-3, 2.69e-3], [1.60e-3], most=cores) == 3
    assert micro_batch_groups([2.0e-3, 2.0e-3], [0.0], most=cores) == 2  # free hops
    assert default_micro_batches(workers=1, slots=8) == 1  # one stage: one step at a time
    assert default_micro_batches(workers=4, slots=3) == 3  # never more cores than slots


def test_workers_sharing_one_gpu_get_one_micro_batch():
    """Their steps cannot run at once, and each micro-batch reads every weight again for
    fewer rows: one H100, opt-1.3b, 8 streams, two workers on it against one worker: 0.975
    with one micro-batch, 0.52 with two, 0.38 with three
    (bench/results/2026-12-06-h100-80gb-hbm3-paired-microbatches.md)."""
    from dejavu.scheduler.config import default_micro_batches

    assert default_micro_batches(2, 8, ["cuda:0", "cuda:0"]) == 1
    assert default_micro_batches(3, 8, ["cuda", "cuda:0", "cuda:0"]) == 1  # "cuda" is GPU 0
    assert default_micro_batches(2, 8, ["cuda:0", "cuda:1"]) == 3
    assert default_micro_batches(4, 8, ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]) == 3
    assert default_micro_batches(2, 8, ["cpu", "cpu"]) == 3  # processes on their own cores
    assert default_micro_batches(2, 8, ["auto", "auto"]) == 3  # remote: not known here
    assert default_micro_batches(2, 8) == 3


def test_cores_of_uneven_sizes_own_every_slot_once():
    from dejavu.runtime.step import StepResult, TokenResult
    from dejavu.scheduler.batches import MicroBatches
    from dejavu.scheduler.core import SchedulerConfig

    mb = MicroBatches(SchedulerConfig(max_slots=8, max_len=64, vocab_size=50, eos_id=2), 3)
    assert mb.sizes == [3, 3, 2] and mb.offsets == [0, 3, 6]
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for i in range(9):
        mb.add(f"r{i}", [5, 6], params)
    steps = mb.schedule()
    assert len(steps) == 3 and mb.peak == 3
    slots = [r.slot for step in steps for r in step.rows]
    assert sorted(slots) == list(range(8))  # eight streams at once, none lost to rounding
    assert mb.queued() == 1
    for step in steps:
        mb.update(StepResult(step.step_id, [TokenResult(r.request_id, token=7)
                                            for r in step.rows]))


def test_in_flight_limit_holds_and_every_core_still_gets_turns():
    from dejavu.runtime.step import StepResult, TokenResult
    from dejavu.scheduler.batches import MicroBatches
    from dejavu.scheduler.core import SchedulerConfig

    mb = MicroBatches(SchedulerConfig(max_slots=4, max_len=64, vocab_size=50, eos_id=2), 4)
    mb.set_in_flight(2)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    for i in range(4):
        mb.add(f"r{i}", [5, 6], params)
    served = set()
    for _ in range(12):
        steps = mb.schedule()
        assert len(steps) <= 2 and mb.in_flight() <= 2
        for step in steps:
            served.update(r.request_id for r in step.rows)
            mb.update(StepResult(step.step_id, [TokenResult(r.request_id, token=7)
                                                for r in step.rows]))
    assert served == {"r0", "r1", "r2", "r3"}  # no core starved under the limit


def test_recent_times_are_medians_a_first_compile_does_not_move():
    """A worker's first step took seconds (a kernel compiled there): the reported stage time
    is back at the steady value as soon as most of the window is steady (an average of
    weight 0.9 would still carry 12% of the outlier after 20 steps); a change in the number
    of stages starts over."""
    from dejavu.scheduler.batches import RecentTimes

    recent = RecentTimes(window=5)
    assert recent.medians == []
    assert recent.add([7.5, 0.3]) == [7.5, 0.3]
    for _ in range(2):
        got = recent.add([0.29, 0.30])
    assert got == [0.29, 0.3]  # 3 samples: the outlier is not the median
    for _ in range(10):
        got = recent.add([0.31, 0.28])
    assert got == [0.31, 0.28]  # the window keeps the last 5 only
    assert recent.add([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]  # three stages now: start over
