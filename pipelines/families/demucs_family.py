"""Demucs models (htdemucs, the htdemucs_ft bag, htdemucs_6s, hdemucs_mmi, drumsep) run with demucs's own code.

Weights come only from the model store's verified files: a checkpoint is read with
`demucs.states.load_model` and a bag yaml with demucs's `BagOnlyRepo`, so nothing here
can reach the network. We do not go through `demucs.pretrained.get_model(repo=...)`:
its `LocalRepo` re-checks the 8-hex checksum in a file name such as `955717e8-8726e21a.th`,
which the store's full sha256 pin already covers, and which would reject random stand-in
models saved under the released names (see `tools/random_models.py`).

`separate` is what the demucs CLI (`demucs.api.Separator.separate_tensor` in demucs 4.1)
does to a loaded track: normalise the mix by the mean and std of its mono downmix,
`apply_model` (which does its own segmenting, overlap-add and shifts), undo the
normalisation. We keep the normalisation because the published scores were measured
through that path and because it changes the output: apply_model zero-pads the edges of
the track and of short last segments, and zero means "the mean of the track" only after
normalising. It also keeps a very quiet or very loud mix in the range the models saw.

`stream` gives the same result a block at a time, so a worker's memory follows the
segment and not the track. It walks apply_model's own grid: segments of `segment` seconds
at offsets 0, stride, 2 stride, ... of the whole signal, each padded from its true
neighbours as `TensorChunk.padded` does, run through the model as apply_model's un-split
branch does, weighted by the same triangle and summed in the same order; a block's output
is final once every segment overlapping it has been added, and a segment is kept only while
it still overlaps blocks to come. So every segment runs exactly once, as in a whole-track
apply_model, and the output equals it up to the normalisation statistics, which a first
streaming pass computes (mean and std of the mono mix, accumulated in float64). Bags run
their members side by side and combine them with the bag's weights as apply_model does.
A segment whose input is digital silence is not run: it counts as silence (the mix's
zero). Random `shifts` cannot be streamed exactly; with shifts > 0 the whole-signal path runs.

On a CPU in float32, `backend` "auto" runs each network in whichever of torch and ONNX
Runtime was measured faster on this CPU (`backend_choice`, kept in the store per CPU and
library versions). ONNX Runtime runs from a file derived once per checkpoint and cached in the
model store (`demucs_onnx`; the STFT stays in torch): the same arithmetic on other kernels,
checked against torch when the file is built.
When that cannot be had (no onnxruntime, a model without an exported form, a store that
cannot be written), "auto" runs torch and says why in `backend_reason`; an explicit
"onnxruntime" fails at load instead. The whole-signal path (shifts > 0) always runs torch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from demucs.apply import BagOfModels, Model, TensorChunk, apply_model
from demucs.htdemucs import HTDemucs
from demucs.repo import AnyModel, BagOnlyRepo, ModelLoadingError, ModelOnlyRepo
from demucs.states import load_model
from demucs.utils import center_trim

from .. import audio as A, signals as S
from ..errors import Cancelled, ChainError
from ..machine import Machine, this_machine
from ..modelstore import sha256_file
from ..registry import ModelSpec
from . import backend_choice, demucs_onnx
from .base import Blocks, whole
from .params import DemucsParams
from .torch_model import TorchSeparator

log = logging.getLogger(__name__)


class _StoreRepo(ModelOnlyRepo):
    """demucs's model-repo interface over the store's verified checkpoint files (no network, no re-hashing)."""

    def __init__(self, checkpoints: dict[str, Path]) -> None:
        self._models = checkpoints

    def has_model(self, sig: str) -> bool:
        return sig in self._models

    def get_model(self, sig: str) -> Model:
        if sig not in self._models:
            raise ModelLoadingError(f"checkpoint {sig!r} is not among the model's files {sorted(self._models)}")
        # demucs ships py.typed but leaves load_model, TensorChunk and its methods unannotated
        model: Model = load_model(self._models[sig])  # type: ignore[no-untyped-call]
        return model

    def list_model(self) -> dict[str, str | Path]:
        models: dict[str, str | Path] = dict(self._models)
        return models


def signature(file_name: str) -> str:
    """The signature demucs's LocalRepo gives a checkpoint file: its stem before any checksum suffix."""
    stem = Path(file_name).stem
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def member_files(name: str, files: dict[str, Path]) -> list[Path]:
    """The checkpoint file of each network `load_demucs(name, files)` holds, in the bag's member order."""
    checkpoints = {signature(n): p for n, p in files.items() if n.endswith(".th")}
    if name in checkpoints:
        return [checkpoints[name]]
    (bag,) = [p for n, p in files.items() if n.endswith(".yaml") and Path(n).stem == name]
    return [checkpoints[sig] for sig in yaml.safe_load(bag.read_text())["models"]]  # as demucs's BagOnlyRepo


def load_demucs(name: str, files: dict[str, Path]) -> AnyModel:
    """The demucs model or bag `name` from verified files (file name -> path), in eval mode on the CPU."""
    checkpoints = {signature(n): p for n, p in files.items() if n.endswith(".th")}
    repo = _StoreRepo(checkpoints)
    if repo.has_model(name):
        model: AnyModel = repo.get_model(name)
    else:
        bags = {Path(n).stem: p for n, p in files.items() if n.endswith(".yaml")}
        if name not in bags:
            raise ChainError(
                f"demucs model {name!r} is neither a checkpoint signature {sorted(checkpoints)} "
                f"nor a bag yaml {sorted(bags)} among the model's files; fix params.name or the registry's files",
                name=name,
                files=sorted(files),
            )
        bag_repo = BagOnlyRepo(bags[name].parent, repo)  # demucs's own reading of models/weights/segment
        try:
            model = bag_repo.get_model(name)
        except ModelLoadingError as exc:  # the yaml names a checkpoint the registry does not list
            raise ChainError(
                f"bag {name!r} ({bags[name]}): {exc}; fix the yaml or the registry's files",
                name=name,
                file=str(bags[name]),
            ) from exc
    return model.eval()


class DemucsSeparator(TorchSeparator[DemucsParams]):
    """One demucs model or bag, loaded once by `setup` and run on whole tracks by `apply_model`."""

    Params, family = DemucsParams, "demucs"
    derives_files = True  # the ONNX Runtime graphs (demucs_onnx)

    def __init__(self, spec: ModelSpec, files: dict[str, Path], params: dict[str, Any]) -> None:
        super().__init__(spec, files, params)
        self.batch, self.precision = self.settings.resolved("cpu")
        self.backend = "torch"  # what runs the networks, once setup has resolved params.backend
        self.backend_reason = ""  # why "auto" runs torch, when it does
        self.backend_record: backend_choice.BackendRecord | None = None  # this CPU's figures, when "auto" used them
        self._runners: dict[int, demucs_onnx.CoreRunner] = {}  # id(network) -> its ONNX Runtime session

    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        self.batch, precision = self.settings.resolved(device)
        self._use_precision(precision, device)
        model = load_demucs(self.settings.name, self.files)
        self._check(model)
        self.model = model.to(device)
        self._runners, self.backend, self.backend_reason = {}, "torch", ""
        if self.settings.backend != "torch":
            self._setup_onnx()

    def _setup_onnx(self) -> None:
        """ONNX Runtime sessions for every network (params.backend auto or onnxruntime; see the module docstring).

        "auto" follows this CPU's measured figures (backend_choice): a kept record that chose torch
        builds no session at all, so the process holds only torch's memory; without a record, both
        run one segment here, the choice is kept, and the sessions are dropped again if torch won.
        """
        explicit = self.settings.backend == "onnxruntime"
        reason = None
        if not self.device.startswith("cpu"):
            reason = f"ONNX Runtime serves the CPU here, not {self.device!r}"
        elif self.precision != "float32":
            reason = f"precision {self.precision} runs in torch's autocast"
        else:
            reason = demucs_onnx.runtime_missing()
        members = list(self.model.models) if isinstance(self.model, BagOfModels) else [self.model]
        reason = reason or next(filter(None, (demucs_onnx.exportable(m, explicit) for m in members)), None)
        runners: dict[int, demucs_onnx.CoreRunner] = {}
        failed = reason is not None and reason == demucs_onnx.runtime_missing()
        paths = member_files(self.settings.name, self.files)
        lengths = [
            demucs_onnx.network_length(
                m, _valid_length(m, _segment_samples(m, self.settings.segment), self.settings.segment)
            )
            for m in members
        ]
        machine = this_machine()
        files = {name: sha256_file(path) for name, path in sorted(self.files.items())}
        record = None
        if reason is None and not explicit:
            record = backend_choice.recorded(paths[0].parent, self.spec.id, files, lengths[0], self.batch, machine)
            if record is not None and record.choice == "torch":
                reason = record.summary()
        if reason is None:
            try:
                for member, path, length in zip(members, paths, lengths):
                    runners[id(member)] = demucs_onnx.prepared_runner(
                        member, path.parent, sha256_file(path), length, torch.get_num_threads()
                    )
                if record is None and not explicit:
                    record = self._measure(members[0], runners[id(members[0])], files, machine)
                    backend_choice.save(paths[0].parent, record)
                    if record.choice == "torch":
                        reason, runners = record.summary(), {}  # the sessions go: torch's memory only
            # whatever stops the optional path (a read-only store, an export that does not match torch, an
            # operator the runtime lacks) leaves the exact torch path, and is said (backend_reason, the log)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                failed = True
        self.backend_record = record
        if reason is not None:
            if explicit:
                raise ChainError(
                    f"params.backend 'onnxruntime' for {self.spec.id!r} cannot run: {reason}",
                    model_id=self.spec.id,
                    reason=reason,
                )
            # a GPU, mixed precision or a measurement choosing torch is the plan; a failed build is news
            log.log(logging.WARNING if failed else logging.INFO, "%s runs in torch: %s", self.spec.id, reason)
            self.backend_reason = reason
            return
        self._runners, self.backend = runners, "onnxruntime"

    def _measure(
        self, member: Any, runner: demucs_onnx.CoreRunner, files: dict[str, str], machine: Machine
    ) -> backend_choice.BackendRecord:
        """Time one full segment (a batch of them) of `member` in torch and in ONNX Runtime, interleaved."""
        g = torch.Generator().manual_seed(0)
        mix = torch.randn(self.batch, member.audio_channels, runner.length, generator=g)
        with torch.inference_mode():
            seconds, rounds = backend_choice.time_interleaved(
                {"torch": lambda: TorchSeparator._forward(self, member, mix), "onnxruntime": lambda: runner(mix)}
            )
        record = backend_choice.BackendRecord(
            model_id=self.spec.id,
            files=files,
            segment_samples=runner.length,
            batch=self.batch,
            machine=machine,
            seconds={k: round(v, 5) for k, v in seconds.items()},
            rounds=rounds,
            choice=backend_choice.choose(seconds),
            loadavg=[round(x, 2) for x in os.getloadavg()],
            measured_at=time.time(),
        )
        log.info("%s on %s: %s", self.spec.id, machine.describe(), record.summary())
        return record

    def _forward(self, model: Callable[[torch.Tensor], torch.Tensor], mix: torch.Tensor) -> torch.Tensor:
        """The network's ONNX Runtime session where it has one, else torch (see TorchSeparator._forward)."""
        runner = self._runners.get(id(model))
        if runner is not None and runner.accepts(mix):
            return runner(mix)
        return super()._forward(model, mix)

    def _check(self, model: Any) -> None:
        """Fail at load time, naming the fix, on what would otherwise fail or mislabel mid-job."""
        spec, s = self.spec, self.settings
        if sorted(model.sources) != sorted(spec.sources):
            raise ChainError(
                f"checkpoint of {spec.id!r} has sources {list(model.sources)} but the registry declares "
                f"{list(spec.sources)}; install the right weights or fix catalogue/models/demucs.json",
                model_id=spec.id,
                checkpoint_sources=list(model.sources),
                registry_sources=list(spec.sources),
            )
        if model.samplerate != spec.sample_rate or model.audio_channels != spec.channels:
            raise ChainError(
                f"checkpoint of {spec.id!r} runs at {model.samplerate} Hz with {model.audio_channels} channels, "
                f"the registry says {spec.sample_rate} Hz with {spec.channels}",
                model_id=spec.id,
            )
        if isinstance(model, BagOfModels):
            longest = model.max_allowed_segment
        elif isinstance(model, HTDemucs):
            longest = float(model.segment)
        else:
            longest = float("inf")
        if s.segment is not None and s.segment > longest:  # a transformer cannot run past its training length
            raise ChainError(
                f"segment {s.segment} s is longer than {spec.id!r} was trained for ({longest:.2f} s); lower params.segment",
                model_id=spec.id,
                segment=s.segment,
                max_segment=longest,
            )

    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        self._ready(sample_rate)
        s = self.settings
        with torch.inference_mode():
            wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
            # As demucs.api.Separator.separate_tensor (see the module docstring).
            ref = wav.mean(0)
            mean = ref.mean()
            std = ref.std() + 1e-8
            for mixed in (True, False):  # float32 again if mixed precision overflowed anywhere
                pool = _BatchingPool(self.batch, self.device) if self.batch > 1 else None
                with self._autocast(mixed):
                    out = apply_model(
                        self.model,
                        ((wav - mean) / std)[None],
                        segment=s.segment,
                        overlap=s.overlap,
                        shifts=s.shifts,
                        split=True,
                        device=self.device,
                        num_workers=0,
                        pool=pool,
                        progress=False,
                    )
                if self.precision == "float32" or bool(torch.isfinite(out).all()):
                    break
                self.fallbacks += 1
            out = out[0].float().mul_(std).add_(mean)  # in place: apply_model's output is ours, 4+ times the track
        index = {name: k for k, name in enumerate(self.model.sources)}
        return {name: out[index[name]].float().numpy() for name in self.spec.sources}

    def stream(self, audio: S.Signal, sample_rate: int, block: int, cancelled: Callable[[], bool]) -> Blocks:
        self._ready(sample_rate)
        if self.settings.shifts:  # random shifts of the whole track: apply_model's own run, at once
            return whole(self, audio, sample_rate, cancelled)
        return self._stream(audio, max(1, block), cancelled)

    def _stream(self, audio: S.Signal, block: int, cancelled: Callable[[], bool]) -> Iterator[dict[str, np.ndarray]]:
        s, model = self.settings, self.model
        mean, std = _mono_stats(audio)
        if isinstance(model, BagOfModels):
            members, weights = list(model.models), model.weights
        else:
            members, weights = [model], None
        streams = [
            _SegmentStream(m, audio, mean, std, s.segment, s.overlap, self.batch, self.device, self._forward, cancelled)
            for m in members
        ]
        index = {name: k for k, name in enumerate(model.sources)}
        for lo in range(0, audio.frames, block):
            out = self._combine(streams, weights, mean, std, lo, min(audio.frames, lo + block))
            yield {name: out[index[name]].numpy() for name in self.spec.sources}

    @torch.inference_mode()
    def _combine(
        self,
        streams: list[_SegmentStream],
        weights: list[list[float]] | None,
        mean: torch.Tensor,
        std: torch.Tensor,
        lo: int,
        hi: int,
    ) -> torch.Tensor:
        """Final output of [lo, hi) as apply_model computes it (a bag: its weighted member average)."""
        if weights is None:
            out = streams[0].take(lo, hi)
        else:  # as apply_model's BagOfModels branch, in the same order of operations
            estimates: Any = 0.0  # a tensor once the first member is added
            totals = [0.0] * len(self.model.sources)
            for stream, model_weights in zip(streams, weights):
                member = stream.take(lo, hi)[None]
                for k, inst_weight in enumerate(model_weights):
                    member[:, k, :, :] *= inst_weight
                    totals[k] += inst_weight
                estimates += member
            for k in range(estimates.shape[1]):
                estimates[:, k, :, :] /= totals[k]
            out = estimates[0]
        return out.mul_(std).add_(mean)


@torch.inference_mode()
def _mono_stats(audio: S.Signal) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the mono downmix, as separate() computes them, in one streaming pass.

    Per-block mean and sum of squared deviations merged in float64 (Chan et al.), so the
    figures match torch's whole-track float32 reduction to float32 rounding.
    """
    count, mean, m2 = 0, 0.0, 0.0
    for _, block in audio.blocks():
        ref = torch.from_numpy(np.ascontiguousarray(block)).mean(0).double().numpy()  # float32 mix, as separate()
        k = ref.size
        if not k:
            continue
        bm = float(ref.mean())
        bm2 = float(((ref - bm) ** 2).sum())
        delta, total = bm - mean, count + k
        mean += delta * k / total
        m2 += bm2 + delta * delta * count * k / total
        count = total
    std = math.sqrt(m2 / (count - 1)) if count > 1 else float("nan")  # torch.std's correction, NaN for one sample
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32) + 1e-8


def _segment_samples(model: Any, segment: float | None) -> int:
    """A full segment's samples on apply_model's grid: `segment` seconds, or the model's own."""
    return int(model.samplerate * (segment if segment is not None else model.segment))


def _valid_length(model: Any, length: int, segment: float | None) -> int:
    """The padded length apply_model's un-split branch runs a `length`-sample segment at."""
    if isinstance(model, HTDemucs) and segment is not None:
        return int(segment * model.samplerate)
    if hasattr(model, "valid_length"):
        valid: int = model.valid_length(length)
        return valid
    return length


class _SegmentStream:
    """One model's apply_model(split=True) output, produced a range at a time (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        audio: S.Signal,
        mean: torch.Tensor,
        std: torch.Tensor,
        segment: float | None,
        overlap: float,
        batch: int,
        device: str,
        forward: Callable[[Any, torch.Tensor], torch.Tensor],
        cancelled: Callable[[], bool],
    ) -> None:
        self.model, self.audio, self.mean, self.std = model, audio, mean, std
        self.segment = segment  # what apply_model passes down (None: the model's own)
        self.batch, self.device, self.forward, self.cancelled = batch, torch.device(device), forward, cancelled
        self.n = audio.frames
        self.seg_len = _segment_samples(model, segment)
        stride = int((1 - overlap) * self.seg_len)
        self.offsets = range(0, self.n, stride)
        # apply_model's transition weight (transition_power 1)
        weight = torch.cat(
            [
                torch.arange(1, self.seg_len // 2 + 1, device=self.device),
                torch.arange(self.seg_len - self.seg_len // 2, 0, -1, device=self.device),
            ]
        )
        self.weight = (weight / weight.max()) ** 1.0
        self.next = 0  # index of the next segment to run
        self.pending: dict[int, torch.Tensor] = {}  # offset -> (sources, channels, length) output, still needed
        self.silence = (-mean / std).item()  # the normalised value of a digital zero

    def take(self, lo: int, hi: int) -> torch.Tensor:
        """The normalised output of [lo, hi); ranges must be asked for in order."""
        while self.next < len(self.offsets) and self.offsets[self.next] < hi:
            self._run(range(self.next, min(len(self.offsets), self.next + self.batch)))
        sources, channels = len(self.model.sources), self.audio.channels
        out = torch.zeros(sources, channels, hi - lo)
        sum_weight = torch.zeros(hi - lo)
        for offset in sorted(self.pending):  # ascending offsets: apply_model's order of additions
            chunk_out = self.pending[offset]
            a, b = max(lo, offset), min(hi, offset + chunk_out.shape[-1])
            if a >= b:
                continue
            w = self.weight[a - offset : b - offset]
            out[..., a - lo : b - lo] += (w * chunk_out[..., a - offset : b - offset]).to("cpu")
            sum_weight[a - lo : b - lo] += w.to("cpu")
        for offset in [o for o, y in self.pending.items() if o + y.shape[-1] <= hi]:
            del self.pending[offset]
        out /= sum_weight
        return out

    def _run(self, indices: range) -> None:
        """Run segments (up to `batch` in one forward when their padded lengths agree)."""
        if self.cancelled():
            raise Cancelled("job cancelled")
        ready = []
        for k in indices:
            offset = self.offsets[k]
            length = min(self.seg_len, self.n - offset)
            valid = _valid_length(self.model, length, self.segment)
            start = offset - (valid - length) // 2  # as TensorChunk.padded
            end = start + valid
            raw = self.audio.read(max(0, start), min(self.n, end))
            if A.is_silent(raw):
                out = torch.full((len(self.model.sources), self.audio.channels, length), self.silence)
                self.pending[offset] = out.to(self.device)
                continue
            mix = (torch.from_numpy(np.ascontiguousarray(raw)) - self.mean) / self.std
            padded = F.pad(mix[None], (max(0, -start), max(0, end - self.n)))
            ready.append((offset, length, padded))
        self.next = indices.stop
        i = 0
        while i < len(ready):  # consecutive segments of one padded length run together
            j = i + 1
            while j < len(ready) and ready[j][2].shape[-1] == ready[i][2].shape[-1]:
                j += 1
            group = ready[i:j]
            out = self.forward(self.model, torch.cat([p for _, _, p in group]).to(self.device))
            for k, (offset, length, _) in enumerate(group):
                self.pending[offset] = center_trim(out[k : k + 1], length)[0]
            i = j


class _Pending:
    """A segment apply_model submitted; its forward runs when apply_model first asks for it."""

    def __init__(self, pool: _BatchingPool, model: Any, chunk: TensorChunk, valid_length: int) -> None:
        self.pool, self.model, self.chunk, self.valid_length = pool, model, chunk, valid_length
        self.value: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        if self.value is None:
            self.pool.run_from(self)
        assert self.value is not None
        return self.value


class _BatchingPool:
    """Stands in for apply_model's executor to run its segments `batch` at a time.

    apply_model submits every segment of a pass, then reads the results in order. When it
    asks for one that has not run, that segment and up to `batch - 1` following ones of the
    same model and padded length run as one forward, so memory holds one batch of
    segments, not the track's. Each segment is padded and trimmed exactly as apply_model's
    own un-split branch does; only the batching differs (equal to float rounding, checked
    by the tests). Nested calls from apply_model always come with split=False and shifts=0.
    """

    def __init__(self, batch: int, device: str) -> None:
        self.batch = batch
        self.device = torch.device(device)
        self._pending: list[_Pending] = []

    def submit(
        self,
        fn: Callable[..., Any],
        model: Any,
        chunk: torch.Tensor | TensorChunk,
        *,
        segment: float | None = None,
        **_apply_model_kwargs: Any,
    ) -> _Pending:
        # demucs's TensorChunk is unannotated (see _StoreRepo.get_model)
        chunk = chunk if isinstance(chunk, TensorChunk) else TensorChunk(chunk)  # type: ignore[no-untyped-call]
        if isinstance(model, HTDemucs) and segment is not None:
            valid_length = int(segment * model.samplerate)
        elif hasattr(model, "valid_length"):
            valid_length = model.valid_length(chunk.length)
        else:
            valid_length = chunk.length
        future = _Pending(self, model, chunk, valid_length)
        self._pending.append(future)
        return future

    def run_from(self, first: _Pending) -> None:
        start = self._pending.index(first)
        part = [first]
        for other in self._pending[start + 1 : start + self.batch]:
            if other.model is not first.model or other.valid_length != first.valid_length:
                break
            part.append(other)
        # demucs's TensorChunk.padded is unannotated (see _StoreRepo.get_model)
        mix = torch.cat([f.chunk.padded(f.valid_length) for f in part]).to(self.device)  # type: ignore[no-untyped-call]
        out = first.model(mix)
        for k, future in enumerate(part):
            future.value = center_trim(out[k : k + 1], future.chunk.length)
            self._pending.remove(future)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self._pending = []
