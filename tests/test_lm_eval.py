"""lm-evaluation-harness (`local-completions`) against a live server, offline: a local
jsonl multiple-choice task and a local rolling-loglikelihood (perplexity) task. Its
log-likelihoods must equal the model's own (one plain forward pass) within 1e-3 in float32,
and its bits per byte must equal `dejavu-run eval`'s scorer on the same documents."""

from __future__ import annotations

import json
import math

import pytest
from serve_fixtures import SENTENCES, make_checkpoint, reference_logprobs, start

lm_eval = pytest.importorskip("lm_eval")

MC_DOCS = [
    # lm-eval puts its target delimiter (a space) between context and choice.
    {"context": "the cat sat on the", "choices": ["mat", "dog", "park"], "label": 0},
    {"context": "a dog ran in the", "choices": ["park", "jury", "ball"], "label": 0},
    {"context": "numbers like 3.14 and", "choices": ["42", "text", "cat"], "label": 0},
    {"context": "emoji take four", "choices": ["bytes", "kanji", "dogs"], "label": 1},
]
ROLLING_DOCS = [s for s in SENTENCES if "\n" not in s][:4]


def write_tasks(root, data_dir) -> None:
    mc = data_dir / "mc.jsonl"
    mc.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    ppl = data_dir / "ppl.jsonl"
    ppl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ROLLING_DOCS))
    (root / "dejavu_tiny_mc.yaml").write_text(f"""
task: dejavu_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    (root / "dejavu_tiny_gen.yaml").write_text(f"""
task: dejavu_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["zz"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (root / "dejavu_tiny_ppl.yaml").write_text(f"""
task: dejavu_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ppl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
""")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Run both tasks once through lm-eval against the server."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lmeval")
    model_dir = make_checkpoint(tmp / "tiny")
    (tmp / "tasks").mkdir()
    write_tasks(tmp / "tasks", tmp)
    mp = pytest.MonkeyPatch()
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(name, "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp / "hf-cache"))
    try:
        with start(model_dir) as s:
            args = (f"model=tiny-opt,base_url={s.url}/v1/completions,"
                    f"tokenizer_backend=huggingface,tokenizer={model_dir},"
                    "tokenized_requests=True,num_concurrent=1,max_retries=1,"
                    "max_length=96,batch_size=1")
            results = simple_evaluate(
                model="local-completions", model_args=args,
                tasks=["dejavu_tiny_mc", "dejavu_tiny_ppl", "dejavu_tiny_gen"],
                task_manager=TaskManager(include_path=str(tmp / "tasks"), include_defaults=False),
                log_samples=True, apply_chat_template=False)
    finally:
        mp.undo()
    return model_dir, s.tokenizer, results


def test_lm_eval_loglikelihoods_equal_the_model_within_1e3(evaluated):
    model_dir, tok, results = evaluated
    samples = results["samples"]["dejavu_tiny_mc"]
    assert len(samples) == len(MC_DOCS)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        want = []
        for context, continuation in sample["arguments"]:
            assert continuation.strip() in doc["choices"]
            # lm-eval encodes context + continuation together (no BOS) and splits it.
            whole = tok.encode(context + continuation, add_bos=False)
            ctxlen = len(tok.encode(context, add_bos=False))
            want.append(sum(reference_logprobs(model_dir, whole)[ctxlen - 1:]))
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-3)
        correct += int(max(range(len(want)), key=want.__getitem__) == doc["label"])
    assert results["results"]["dejavu_tiny_mc"]["acc,none"] == pytest.approx(
        correct / len(MC_DOCS))


def test_lm_eval_bits_per_byte_equals_the_eval_scorer(evaluated):
    import torch

    from dejavu.runtime.checkpoint import load_model
    from dejavu.tools.eval_text import dense_logits_fn, score_documents

    model_dir, tok, results = evaluated
    model = load_model(model_dir, dtype=torch.float32)
    score = score_documents(dense_logits_fn(model), lambda t: tok.encode(t, add_bos=False),
                            ROLLING_DOCS, bos_id=tok.bos_id, window=64, stride=32)
    ours = score.nll / math.log(2) / score.bytes
    theirs = results["results"]["dejavu_tiny_ppl"]["bits_per_byte,none"]
    assert theirs == pytest.approx(ours, abs=1e-4)


def test_lm_eval_generations_are_the_engines_greedy_continuations(evaluated):
    from dejavu.runtime.checkpoint import load_model
    from dejavu.runtime.sampling import SamplingParams
    from dejavu.scheduler.engine import Engine

    model_dir, tok, results = evaluated
    engine = Engine(load_model(model_dir), tok, max_batch=1)
    samples = results["samples"]["dejavu_tiny_gen"]
    assert len(samples) == len(MC_DOCS)
    for sample in samples:
        context = sample["arguments"][0][0]
        want = engine.generate(tok.encode(context, add_bos=False),
                               SamplingParams(max_new_tokens=6, stop=("zz",)))
        assert want.tokens and sample["resps"][0][0] == want.text
