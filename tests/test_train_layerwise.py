"""train-predictors one layer at a time: equal to the whole-model trainer, spilled to disk,
killed and resumed (a real process), and refused up front when memory or disk is short."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from opt_fixtures import CORPUS, train_tokenizer
from safetensors import safe_open

from dejavu.runtime.checkpoint import load_model, save_model
from dejavu.runtime.model import OPTModel
from dejavu.runtime.opt_config import OPTConfig
from dejavu.runtime.predictors import PredictorSet, layer_hash, load_frequencies
from dejavu.runtime.tokenizer import load_tokenizer
from dejavu.tools.collect_labels import calibration_windows, iter_texts
from dejavu.tools.layer_reader import LayerReader
from dejavu.tools.train_layerwise import (
    BEHIND_PHASES,
    GIB,
    PHASES,
    ResourceError,
    plan_resources,
    train_layerwise,
)
from dejavu.tools.train_predictors import TrainConfig, svd_weights, train_predictors

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "opt-gutenberg-31m"
CLI = [sys.executable, "-c", "from dejavu.tools.cli import app; app()"]
CFG = OPTConfig(vocab_size=400, hidden_size=32, num_hidden_layers=4, ffn_dim=72,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
TRAIN = TrainConfig(tokens=1500, window=24, mlp_rank=8, head_rank=4, epochs=4,
                    mlp_recall=0.9, mlp_select="threshold")
TIMING = {"train_s", "read_s", "forward_s", "fit_s", "tables_s", "mlp_fit_s", "head_fit_s",
          "calibrate_s", "frequencies_s", "save_s", "layer_s", "load_s", "init_s",
          "fit_wait_s", "copy_s"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("layerwise")
    torch.manual_seed(0)
    model = OPTModel(CFG)
    model.init_weights(std=0.15)
    save_model(model, path / "model")
    train_tokenizer(path / "model")
    text = path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(CORPUS[i:] + CORPUS[:i]) * 3}) + "\n"
                            for i in range(5)) * 6)
    return path / "model", text


def reference(model_dir: Path, text: Path, cfg: TrainConfig):
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    window = cfg.window or model.config.max_position_embeddings
    windows, docs = calibration_windows(iter_texts(str(text)), tok.encode, window=window,
                                        tokens=cfg.tokens, per_doc=cfg.per_doc)
    return train_predictors(model, windows, docs, cfg, device=torch.device("cpu"),
                            log=lambda *_: None)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def assert_same(out: Path, model_dir: Path, ref, *, atol: float = 0.0) -> None:
    """The layerwise outputs in ``out`` equal the whole-model trainer's ``ref``."""
    preds, report, freq = ref
    model = load_model(model_dir)
    mine = PredictorSet.load(out, model)
    assert mine.fingerprint.model_hash == preds.fingerprint.model_hash
    for i in preds.layer_ids:
        for kind in ("mlp", "heads"):
            a, b = getattr(preds, kind)[i].state_dict(), getattr(mine, kind)[i].state_dict()
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol)
        if atol == 0.0:
            assert mine.points[i] == preds.points[i]
        else:
            assert mine.points[i].mlp_k == pytest.approx(preds.points[i].mlp_k, rel=0.02)
    got = load_frequencies(out, model)
    for i in preds.layer_ids:
        torch.testing.assert_close(got.mlp[i], freq.mlp[i], rtol=0, atol=atol)
        torch.testing.assert_close(got.heads[i], freq.heads[i], rtol=0, atol=atol)
    layers = json.loads((out / "report.json").read_text())["layers"]
    for a, b in zip(report["layers"], layers, strict=True):
        a, b = ({k: v for k, v in r.items() if k not in TIMING} for r in (a, b))
        if atol == 0.0:
            assert a == b
        else:
            assert a["mlp_recall"] == pytest.approx(b["mlp_recall"], abs=0.01)


@pytest.mark.parametrize(("read_ahead", "fit_behind"), [(True, False), (False, False),
                                                      (True, True)])
def test_layerwise_equals_whole_model_trainer(tiny, tmp_path, read_ahead, fit_behind):
    model_dir, text = tiny
    ref = reference(model_dir, text, TRAIN)
    train_layerwise(str(model_dir), str(text), str(tmp_path / "p"), TRAIN,
                    log=lambda *_: None, read_ahead=read_ahead, fit_behind=fit_behind)
    assert_same(tmp_path / "p", model_dir, ref)
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["layerwise"]["read_ahead"] == read_ahead
    assert report["layerwise"]["fit_behind"] == fit_behind
    assert not report["layerwise"]["spill"] and not (tmp_path / "p" / "partial").exists()
    assert report["data"] == str(text)  # the calibration file, not the collected tensors
    # The report has every calibrated recall point per layer, and the markdown shows them.
    assert set(report["layers"][0]["points"]) >= {"0.9", "0.95", "0.99"}
    assert "recall 0.95" in (tmp_path / "p" / "report.md").read_text()


@pytest.mark.parametrize("ahead", [True, False])
def test_reader_gives_what_load_model_and_the_initialisers_give(tiny, ahead):
    """Each layer the reader hands over (read ahead on its thread, or when taken) holds
    exactly ``load_model``'s tensors for that span, its ``layer_hash`` and the closed-form
    MLP start computed here, on this thread."""
    model_dir, _ = tiny
    reader = LayerReader(model_dir, TRAIN, dtype=torch.float32, device=torch.device("cpu"),
                         layers=CFG.num_hidden_layers, ahead=ahead)
    try:
        for layer in range(CFG.num_hidden_layers):
            got = reader.take(layer)
            assert (layer + 1 in reader.pending) == (ahead and layer + 1 < CFG.num_hidden_layers)
            want = load_model(model_dir, layers=range(layer, layer + 1))
            mine, theirs = got.span.state_dict(), want.state_dict()
            assert mine.keys() == theirs.keys()
            for name, t in theirs.items():
                assert torch.equal(mine[name], t), name
            assert got.lhash == layer_hash(want.layers()[0])
            start = svd_weights(want.layers()[0], TRAIN.mlp_rank)
            assert got.mlp_start.keys() == start.keys()
            for name, t in start.items():
                assert torch.equal(got.mlp_start[name], t), name
            assert set(got.seconds) == {"load_s", "init_s"}
    finally:
        reader.close()


def test_each_layer_reports_its_phases_summing_to_its_wall_time(tiny, tmp_path):
    """The log line and report row of every layer split its wall time into phases that add
    up to it: the time between two layers' log lines is the later layer's ``layer_s``."""
    model_dir, text = tiny
    stamps = []
    train_layerwise(str(model_dir), str(text), str(tmp_path / "p"), TRAIN,
                    log=lambda line: stamps.append((time.perf_counter(), line)))
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    rows = report["layers"]
    lines = [(t, ln) for t, ln in stamps if ln.startswith("layer ")]
    assert len(lines) == len(rows) == CFG.num_hidden_layers
    for row in rows:
        assert set(PHASES) | {"load_s", "init_s", "fit_s", "layer_s"} <= set(row)
        assert row["layer_s"] == pytest.approx(sum(row[k] for k in PHASES))
        assert row["fit_s"] == pytest.approx(sum(row[k] for k in (
            "tables_s", "mlp_fit_s", "head_fit_s", "calibrate_s", "frequencies_s")))
        assert all(row[k] >= 0 for k in PHASES)
    for (t0, _), (t1, line), row in zip(lines, lines[1:], rows[1:], strict=False):
        assert abs((t1 - t0) - row["layer_s"]) < 0.05 + 0.1 * (t1 - t0), (t1 - t0, row)
        assert "head fit" in line and "calibrate" in line and "reader: load" in line
    lw = report["layerwise"]
    assert lw["layer_s"] == pytest.approx(sum(r["layer_s"] for r in rows))
    assert lw["layer_s"] <= lw["wall_s"]


def test_fitting_behind_splits_each_layer_between_two_threads(tiny, tmp_path):
    """Fitting behind, each layer's row holds the caller's phases (read, forward, the wait
    for the layer before's fit, the tables' copy), which add up to its ``layer_s``, and the
    fit's, which ran on the fit's thread while the next layer was read and run: so the
    layers' fits together take longer than the time the caller waited for them."""
    model_dir, text = tiny
    seen = []
    train_layerwise(str(model_dir), str(text), str(tmp_path / "p"), TRAIN, log=seen.append,
                    fit_behind=True)
    assert "fitted behind the next one's forward pass" in seen[0]
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    rows = report["layers"]
    assert [r["layer"] for r in rows] == list(range(CFG.num_hidden_layers))
    for row in rows:
        assert row["layer_s"] == pytest.approx(sum(row[k] for k in BEHIND_PHASES))
        assert row["fit_s"] == pytest.approx(sum(row[k] for k in (
            "tables_s", "mlp_fit_s", "head_fit_s", "calibrate_s", "frequencies_s")))
        assert all(row[k] >= 0 for k in BEHIND_PHASES + ("save_s",))
    lines = [ln for ln in seen if ln.startswith("layer ")]
    assert len(lines) == len(rows) and all("fitted behind the next layer in" in ln
                                           for ln in lines)
    lw = report["layerwise"]
    assert lw["fit_behind"] and lw["layer_s"] <= lw["wall_s"]
    assert lw["fit_wait_s"] < sum(r["fit_s"] for r in rows[:-1])


def test_the_plan_fits_behind_where_a_copy_of_the_tables_fits():
    opt13 = OPTConfig(vocab_size=50272, hidden_size=5120, num_hidden_layers=40,
                      ffn_dim=20480, num_attention_heads=40, max_position_embeddings=2048,
                      word_embed_proj_dim=5120)

    def plan(gib: float, fit_behind: bool = True):
        return plan_resources(opt13, TrainConfig(), tokens=100_352, window=2048,
                              dtype=torch.float16, on_gpu=True, host_budget=100 * GIB,
                              disk_free=10 * GIB, device_budget=int(gib * GIB),
                              fit_behind=fit_behind)

    # the second copy of a layer's inputs, MLP inputs, bits and norms
    tables = 100_352 * (4 * 5120 + 20480 // 8 + 2 * 40)
    roomy, inline = plan(16), plan(16, fit_behind=False)
    assert roomy.fit_behind and roomy.tables_on_device and not inline.fit_behind
    assert roomy.chunk == inline.chunk == 8
    assert roomy.device_bytes == inline.device_bytes + tables
    assert "fitted behind" in roomy.describe()
    assert "; each layer fitted in line; host" in inline.describe()  # no reason to give
    # 12 GiB (the H100 benchmark's budget): room for the copy with 4 windows per batch
    snug, inline = plan(12), plan(12, fit_behind=False)
    assert snug.fit_behind and snug.chunk == 4 and inline.chunk == 8
    assert snug.device_bytes <= 12 * GIB < inline.device_bytes + tables
    # batches of 2 windows at the least; tables fitted from the host: in line
    batch_bytes = 2048 * (6 * 5120 + 2 * 20480) * 4  # a forward batch's, per window
    least = inline.device_bytes - 6 * batch_bytes + tables
    assert plan(least / GIB).chunk == 2 and plan(least / GIB).fit_behind
    tight = plan((least - 1) / GIB)
    assert not tight.fit_behind and tight.chunk == 8
    assert "in line (a second copy of a layer's tables needs" in tight.describe()
    # the CPU: in host memory
    cpu = dict(tokens=1512, window=24, dtype=torch.float32, on_gpu=False, host_budget=GIB,
               disk_free=GIB)
    assert not plan_resources(CFG, TRAIN, **cpu).fit_behind
    assert plan_resources(CFG, TRAIN, **cpu, fit_behind=True).fit_behind
    # never with spilled activations (a resumed run needs layer l's inputs intact)
    spilled = plan_resources(CFG, TRAIN, **{**cpu, "host_budget": int(spill_budget() * GIB)},
                             fit_behind=True)
    assert spilled.spill and not spilled.fit_behind
    assert "fitted in line (the activations go to disk" in spilled.describe()


def spill_budget() -> float:
    """A host budget (GiB) that holds one layer but not the activations."""
    big = plan_resources(CFG, TRAIN, tokens=1512, window=24, dtype=torch.float32,
                         on_gpu=False, host_budget=GIB, disk_free=GIB)
    assert not big.spill
    return (big.host_bytes - big.activation_bytes - big.label_bytes + 1000) / GIB


def test_spilled_to_disk_is_the_same(tiny, tmp_path):
    model_dir, text = tiny
    seen = []
    train_layerwise(str(model_dir), str(text), str(tmp_path / "p"), TRAIN, log=seen.append,
                    host_memory_gib=spill_budget())
    assert "memmaps in OUT/partial" in seen[0]
    assert json.loads((tmp_path / "p" / "report.json").read_text())["layerwise"]["spill"]
    assert_same(tmp_path / "p", model_dir, reference(model_dir, text, TRAIN))


@pytest.mark.parametrize("spill", [False, True])
def test_killed_inside_a_layer_then_resumed(tiny, tmp_path, spill):
    """A real process killed (SIGKILL) inside layer 2, after its forward pass wrote the
    next layer's activations; the rerun keeps layers 0-1 and ends with the same files."""
    model_dir, text = tiny
    out = tmp_path / "p"
    args = ["train-predictors", "--model", str(model_dir), "--data", str(text), "--out",
            str(out), "--tokens", str(TRAIN.tokens), "--window", "24", "--rank", "8",
            "--head-rank", "4", "--epochs", "4", "--select", "threshold", "--mlp-recall",
            "0.9", "--device", "cpu"]
    if spill:
        args += ["--host-memory-gib", repr(spill_budget())]
    proc = subprocess.Popen(CLI + args + ["--debug-stall-in-layer", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    layer1 = out / "partial" / "layer-00001.safetensors"
    deadline = time.monotonic() + 120
    while not layer1.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # into layer 2's forward pass (it stalls there)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL, output
    assert sorted(p.name for p in (out / "partial").glob("layer-*")) == [
        "layer-00000.safetensors", "layer-00001.safetensors"]
    assert (out / "partial" / "resid-0.bin").exists() == spill
    assert not (out / "predictors.safetensors").exists()
    before = {p: tensors(out / "partial" / p)
              for p in ("layer-00000.safetensors", "layer-00001.safetensors")}

    done = subprocess.run(CLI + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming after layer 1" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["layerwise"]["resumed_at_layer"] == 2
    assert not (out / "partial").exists()
    # Layers 0-1 were kept, not retrained: the final file carries their tensors bit for bit.
    final = tensors(out / "predictors.safetensors")
    for i, saved in enumerate(before.values()):
        for name in ("mlp.down.weight", "heads.up.bias"):
            assert torch.equal(final[f"layers.{i}.{name}"], saved[name])
    assert_same(out, model_dir, reference(model_dir, text, TRAIN))


def test_too_little_memory_or_disk_is_refused_before_any_work(tiny, tmp_path):
    model_dir, text = tiny
    with pytest.raises(ResourceError, match="one layer needs .* of host memory"):
        plan_resources(CFG, TRAIN, tokens=1512, window=24, dtype=torch.float32,
                       on_gpu=False, host_budget=1000, disk_free=GIB)
    with pytest.raises(ResourceError, match="must go to disk, which needs .* free"):
        plan_resources(CFG, TRAIN, tokens=10**6, window=24, dtype=torch.float32,
                       on_gpu=False, host_budget=2**26, disk_free=2**24)
    with pytest.raises(ResourceError, match="on the GPU"):
        plan_resources(CFG, TRAIN, tokens=1512, window=24, dtype=torch.float16,
                       on_gpu=True, host_budget=GIB, disk_free=GIB, device_budget=1000)
    # OPT-13B's shape, 100k tokens, float16 on a 10 GiB GPU budget: one layer fits, the
    # activations stay in host memory.
    opt13 = OPTConfig(vocab_size=50272, hidden_size=5120, num_hidden_layers=40,
                      ffn_dim=20480, num_attention_heads=40, max_position_embeddings=2048,
                      word_embed_proj_dim=5120)
    plan = plan_resources(opt13, TrainConfig(), tokens=100_352, window=2048,
                          dtype=torch.float16, on_gpu=True, host_budget=100 * GIB,
                          disk_free=10 * GIB, device_budget=10 * GIB)
    assert not plan.spill and plan.device_bytes <= 10 * GIB
    # Two layers (the next one read ahead) and the next one's float64 fc1 and Gram matrix.
    assert plan.init_bytes == (20480 * 5120 + 3 * 5120 * 5120) * 8
    assert plan.device_bytes >= 2 * plan.layer_bytes + plan.init_bytes
    assert "two layers" in plan.describe()
    # Through the CLI: a clear error, exit status 2, and nothing written.
    out = tmp_path / "p"
    done = subprocess.run(CLI + ["train-predictors", "--model", str(model_dir), "--data",
                                 str(text), "--out", str(out), "--host-memory-gib", "1e-7"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "of host memory" in done.stderr, done.stderr
    assert not (out / "partial").exists()


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="no shipped model")
def test_shipped_model_layerwise_equals_whole_model(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(CORPUS[i:] + CORPUS[:i]) * 8}) + "\n"
                            for i in range(5)) * 4)
    cfg = TrainConfig(tokens=2048, window=64, per_doc=256, mlp_rank=16, head_rank=8,
                      epochs=1, batch_size=128, mlp_recall=0.9, mlp_select="threshold")
    ref = reference(SHIPPED, text, cfg)
    train_layerwise(str(SHIPPED), str(text), str(tmp_path / "p"), cfg, log=lambda *_: None)
    assert_same(tmp_path / "p", SHIPPED, ref)



class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_layer_phase_bars_only_on_a_terminal():
    from dejavu.tools.train_layerwise import Phases

    tty, pipe = _Stream(True), _Stream(False)
    for stream in (tty, pipe):
        bars = Phases(stream)
        bars.start("layer 2/4 forward", 1000, "tok")
        time.sleep(0.01)
        bars.advance(1000)
    assert pipe.text == ""
    assert "layer 2/4 forward [" in tty.text and "1000/1000" in tty.text
    assert " tok/s " in tty.text and tty.text.endswith("\n")


def test_too_few_tokens_to_split_is_one_line_naming_the_fix(tiny, tmp_path):
    # 2 windows of 24 tokens: no window would calibrate or report (it was a traceback from
    # deep inside the fitting, after the first layer's collection).
    model_dir, text = tiny
    done = subprocess.run(CLI + ["train-predictors", "--model", str(model_dir), "--data",
                                 str(text), "--out", str(tmp_path / "p"), "--tokens", "48",
                                 "--window", "24"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert error == ["error: --tokens: the calibration data gave 2 window(s) of 24 tokens "
                     "from 1 document(s); the train / calibrate / report split needs 10 "
                     "windows or 10 documents: pass --tokens 240 or more, or a smaller "
                     "--window"], done.stderr


def test_buffers_fall_back_to_pageable_memory_when_pinning_is_refused(monkeypatch):
    """Pinned tables speed a GPU's copies; where page-locked memory is refused (a limit, no
    CUDA driver) the run goes on with pageable tables instead of failing."""
    from dejavu.tools.train_layerwise import Buffers

    real_empty = torch.empty

    def refuse_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cudaHostAlloc: out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refuse_pinning)
    cfg = OPTConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, ffn_dim=16,
                    num_attention_heads=2, max_position_embeddings=16)
    bufs = Buffers(10, cfg, torch.float16, None, pin=True)
    assert not bufs.pin
    assert bufs.resid[0].shape == (10, 8) and bufs.bits.shape == (10, 2)
    assert not bufs.resid[1].is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fit_behind_equals_fit_in_line(tiny, tmp_path):
    """On a GPU the fit behind runs on its own thread and stream, beside the next layer's
    forward pass and the reader: its predictors must be the in-line fit's (float32, so up
    to the kernels' rounding), its frequencies exactly."""
    model_dir, text = tiny
    for behind in (False, True):
        train_layerwise(str(model_dir), str(text), str(tmp_path / str(behind)), TRAIN,
                        device="cuda", log=lambda *_: None, fit_behind=behind)
        report = json.loads((tmp_path / str(behind) / "report.json").read_text())
        assert report["layerwise"]["fit_behind"] == behind
    inline, behind = (tensors(tmp_path / str(b) / "predictors.safetensors")
                      for b in (False, True))
    assert inline.keys() == behind.keys()
    for name, t in inline.items():
        torch.testing.assert_close(behind[name], t, rtol=1e-4, atol=1e-5, msg=name)
    freq = [tensors(tmp_path / str(b) / "frequencies.safetensors") for b in (False, True)]
    assert all(torch.equal(freq[1][k], t) for k, t in freq[0].items())


def test_a_fit_behind_that_fails_stops_the_run_with_its_error(tiny, tmp_path, monkeypatch):
    """A fit that raises on the fit's thread ends the run with its own error at the next
    layer, nothing hangs, and the layers finished before it stay for a rerun."""
    import threading

    from dejavu.tools import train_layerwise as lw

    model_dir, text = tiny
    real = lw.train_layer

    def failing(data, layer, *args, **kwargs):
        if layer == 1:
            raise RuntimeError("fit of layer 1 broke")
        return real(data, layer, *args, **kwargs)

    monkeypatch.setattr(lw, "train_layer", failing)
    out = tmp_path / "p"
    with pytest.raises(RuntimeError, match="fit of layer 1 broke"):
        train_layerwise(str(model_dir), str(text), str(out), TRAIN, log=lambda *_: None,
                        fit_behind=True)
    assert not any(t.name.startswith("fit-behind") for t in threading.enumerate())
    assert sorted(p.name for p in (out / "partial").glob("layer-*")) == [
        "layer-00000.safetensors"]


def test_cli_errors_before_any_work_and_ctrl_c_says_how_to_resume(tiny, tmp_path):
    """Found by a first-time user: a missing calibration file printed the plan first; Ctrl-C
    ended the run without a word."""
    model_dir, text = tiny
    base = CLI + ["train-predictors", "--model", str(model_dir), "--window", "24", "--rank",
                  "8", "--head-rank", "4", "--tokens", str(TRAIN.tokens), "--device", "cpu"]
    missing = subprocess.run(base + ["--data", str(tmp_path / "nope.jsonl"), "--out",
                                     str(tmp_path / "p")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "plan:" not in missing.stdout
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"
    out = tmp_path / "q"
    proc = subprocess.Popen(base + ["--data", str(text), "--out", str(out),
                                    "--debug-stall-in-layer", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    layer1 = out / "partial" / "layer-00001.safetensors"
    deadline = time.monotonic() + 120
    while not layer1.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # into layer 2 (it stalls there)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip() == (f"interrupted: 2 finished layer(s) kept in {out / 'partial'}; "
                           "run the same command again to resume")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line():
    done = subprocess.run(CLI + ["train-predictors", "--model", str(SHIPPED), "--data",
                                 "x.jsonl", "--out", "/tmp/unused", "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --device cuda: CUDA is not available on this "
                                   "machine; use cpu")


def test_a_rerun_with_other_settings_names_what_changed(tiny, tmp_path):
    """A first-time user's finding: "left by a run with other settings, model or data;
    starting over" did not say which. The finished layers of a cut run stay when nothing
    changed, and go, with the changes named, when something did."""
    from dejavu.runtime.tokenizer import load_tokenizer
    from dejavu.tools.train_layerwise import Work, run_parts

    model_dir, text = tiny
    tok = load_tokenizer(model_dir)
    windows, docs = calibration_windows(iter_texts(str(text)), tok.encode, window=24,
                                        tokens=TRAIN.tokens, per_doc=TRAIN.per_doc)
    work, seen = tmp_path / "partial", []
    Work(work, run_parts(CFG, TRAIN, torch.float32, windows, docs), seen.append)
    (work / "layer-00000.safetensors").write_bytes(b"kept")
    Work(work, run_parts(CFG, TRAIN, torch.float32, windows, docs), seen.append)
    assert seen == [] and (work / "layer-00000.safetensors").exists()
    other = TrainConfig(**{**TRAIN.__dict__, "epochs": 3, "mlp_rank": 4})
    Work(work, run_parts(CFG, other, torch.float16, windows[:-1], docs[:-1]), seen.append)
    assert seen == [f"{work}: left by a run with dtype float32 -> float16, other calibration "
                    "data, --rank 8 -> 4, --epochs 4 -> 3; starting over"]
    assert not (work / "layer-00000.safetensors").exists()
