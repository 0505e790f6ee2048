"""`params.backend: auto` follows the figures measured on this CPU and kept in the store, and measures when they are not this CPU's."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("demucs")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pipelines.engine import Engine  # noqa: E402
from pipelines.families import backend_choice  # noqa: E402
from pipelines.machine import Machine, cpu_info, this_machine  # noqa: E402
from pipelines.modelstore import ModelStore  # noqa: E402
from tools.random_models import install_random_demucs  # noqa: E402
from tools.reference import demucs_reference  # noqa: E402

SR = 44100
ROOT = Path(__file__).resolve().parents[2]
SEGMENT = 2 * SR  # the small random htdemucs's training segment


@pytest.fixture
def store(tmp_path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs", seed=5)
    return store


def files_of(store: ModelStore) -> dict[str, str]:
    return dict(sorted(store.entry("htdemucs")["files"].items()))


def write_record(store: ModelStore, choice: str, machine: Machine | None = None, **changes) -> Path:
    """A record as a measurement writes it, saying `choice` won (by a wide margin, so no rule could agree by luck)."""
    machine = machine or this_machine()
    seconds = {"torch": 0.01, "onnxruntime": 1.0} if choice == "torch" else {"torch": 1.0, "onnxruntime": 0.01}
    record = backend_choice.BackendRecord(
        model_id="htdemucs",
        files=files_of(store),
        segment_samples=SEGMENT,
        batch=1,
        machine=machine,
        seconds=seconds,
        rounds=3,
        choice=choice,
        loadavg=[0.0, 0.0, 0.0],
        measured_at=1.0,
    )
    record = record.model_copy(update=changes)
    path = backend_choice.path_for(store.root, "htdemucs", this_machine())  # this machine's file, whatever it holds
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.model_dump_json())
    return path


def our_record(store: ModelStore) -> backend_choice.BackendRecord | None:
    return backend_choice.load(backend_choice.path_for(store.root, "htdemucs", this_machine()))


@pytest.mark.parametrize("choice", ["torch", "onnxruntime"])
def test_auto_follows_the_recorded_choice(store, choice, tmp_path):
    path = write_record(store, choice)
    sep = Engine(store).separator("htdemucs")
    assert sep.backend == choice
    assert bool(sep._runners) == (choice == "onnxruntime")  # torch chosen: no ONNX Runtime session is held
    assert sep.backend_record is not None and sep.backend_record.measured_at == 1.0  # the record, not a new timing
    assert our_record(store).measured_at == 1.0 and path.exists()
    if choice == "torch":
        assert "torch chosen" in sep.backend_reason
    # the stems are demucs's whichever backend runs
    mix = (0.1 * np.random.default_rng(1).standard_normal((2, 3 * SR))).astype(np.float32)
    ours = Engine(store).run_model("htdemucs", mix, SR)
    theirs = demucs_reference(store, "htdemucs", mix, tmp_path / "ref")
    assert max(float(np.abs(ours[s] - theirs[s]).max()) for s in ours) <= 1e-4


def test_an_explicit_backend_overrides_the_record(tmp_path):
    for wanted, recorded in (("torch", "onnxruntime"), ("onnxruntime", "torch")):
        store = ModelStore(tmp_path / wanted)
        install_random_demucs(store, "htdemucs", seed=5, params={"backend": wanted})
        write_record(store, recorded)
        sep = Engine(store).separator("htdemucs")
        assert sep.backend == wanted and sep.backend_record is None


@pytest.mark.parametrize(
    "other",
    [
        {"cpu": "Another CPU"},
        {"flags": ("avx2",)},
        {"torch": "0.0.1"},
        {"onnxruntime": "0.0.1"},
        {"threads": 64},
    ],
)
def test_a_record_of_another_machine_is_ignored_and_measured_again(store, other):
    """A record (in this machine's file, so only its content can tell) of another CPU or other libraries: measured anew."""
    stale = this_machine().model_copy(update=other)
    write_record(store, "torch", machine=stale)
    sep = Engine(store).separator("htdemucs")
    fresh = our_record(store)
    assert fresh is not None and fresh.machine == this_machine() and fresh.measured_at > 1.0
    assert set(fresh.seconds) == {"torch", "onnxruntime"} and all(s > 0 for s in fresh.seconds.values())
    assert fresh.choice == backend_choice.choose(fresh.seconds) and sep.backend == fresh.choice
    assert fresh.segment_samples == SEGMENT and fresh.rounds >= 1


def test_a_record_of_other_weights_or_segment_is_ignored(store):
    write_record(store, "torch", files={"htdemucs.th": "0" * 64})
    Engine(store).separator("htdemucs")
    assert our_record(store).measured_at > 1.0
    write_record(store, "torch", segment_samples=SEGMENT + 1)
    Engine(store).separator("htdemucs")
    assert our_record(store).measured_at > 1.0


def test_each_machine_keeps_its_own_record(store):
    """Another CPU's record lives beside this one's and is never used here."""
    other = this_machine().model_copy(update={"cpu": "Another CPU"})
    write_record(store, "torch")
    rec = our_record(store).model_copy(update={"machine": other, "choice": "onnxruntime"})
    backend_choice.save(store.root, rec)
    assert backend_choice.path_for(store.root, "htdemucs", other).exists()
    assert Engine(store).separator("htdemucs").backend == "torch"
    assert {r.machine.cpu for r in backend_choice.records(store.root, "htdemucs")} == {
        this_machine().cpu,
        "Another CPU",
    }


def _load_in_child(root: str, out: str) -> None:
    import torch as t

    t.set_num_threads(1)
    sep = Engine(ModelStore(root)).separator("htdemucs")
    Path(out).write_text(json.dumps([sep.backend, sep.backend_record.measured_at]))


def test_two_processes_meeting_a_new_cpu_leave_one_whole_record(store, tmp_path):
    """Both measure and write at once; the record left is whole, valid, and one of theirs."""
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"child{k}.json" for k in range(2)]
    children = [ctx.Process(target=_load_in_child, args=(str(store.root), str(o))) for o in outs]
    for c in children:
        c.start()
    for c in children:
        c.join(240)
        assert c.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    kept = our_record(store)
    assert kept is not None and kept.machine == this_machine()
    assert kept.measured_at in [r[1] for r in results]
    assert [p.name for p in (store.root / backend_choice.DIRECTORY).iterdir()] == [
        backend_choice.path_for(store.root, "htdemucs", this_machine()).name
    ]  # no temp file left behind


def test_time_interleaved_alternates_and_stops_at_the_budget():
    order: list[str] = []
    seconds, rounds = backend_choice.time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: (order.append("b"), time.sleep(0.01))}, runs=4, budget_s=60
    )
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"] and rounds == 4
    assert seconds["b"] > seconds["a"]
    _, rounds = backend_choice.time_interleaved(
        {"a": lambda: time.sleep(0.05), "b": lambda: None}, runs=10, budget_s=0.01
    )
    assert rounds == 1


def test_choice_needs_a_clear_onnxruntime_win():
    assert backend_choice.choose({"torch": 1.0, "onnxruntime": 0.5}) == "onnxruntime"
    assert backend_choice.choose({"torch": 1.0, "onnxruntime": 0.99}) == "torch"  # level: torch's smaller memory
    assert backend_choice.choose({"torch": 1.0}) == "torch"


def test_cpu_info_reads_model_and_the_flags_that_matter(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Test\nflags\t\t: fpu sse avx2 avx512f "
        "avx512_bf16 amx_tile amx_bf16 pni\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Test\n"
    )
    cpu, flags = cpu_info(cpuinfo)
    assert cpu == "Intel(R) Xeon(R) Test" and flags == ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def test_models_bench_and_list_show_the_figures(store):
    """`stems models bench` measures again (each time), `stems models list` shows the figures `auto` follows."""

    def models(*args: str) -> subprocess.CompletedProcess[str]:
        # the CLI at another thread count than this test's one (tests/__init__.py): a record of its own
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        cmd = [sys.executable, "-m", "stems.cli", "models", *args, "--model-dir", str(store.root)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)

    kept = []
    for _ in range(2):
        r = models("bench", "htdemucs")
        assert r.returncode == 0, r.stderr
        (record,) = [r for r in backend_choice.records(store.root, "htdemucs") if r.machine.threads != 1]
        assert "torch" in r.stdout and "onnxruntime" in r.stdout and f"{record.choice} chosen" in r.stdout
        kept.append(record)
    assert kept[1].measured_at > kept[0].measured_at
    r = models("list", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = [row for row in json.loads(r.stdout) if row["id"] == "htdemucs"]
    assert row["backend"]["choice"] == kept[1].choice and row["backend"]["seconds"] == kept[1].seconds
    r = models("list")
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("htdemucs ")]
    assert f"{kept[1].choice} chosen" in line
    r = models("bench", "dsp.centre")
    assert r.returncode == 2 and "one backend" in r.stderr
