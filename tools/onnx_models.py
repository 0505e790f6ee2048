"""Tiny randomly initialised ONNX stand-ins for the UVR / MDX-Net models we cannot ship.

The real MDX-Net checkpoints cannot be had offline, so tests and benchmarks run the real
`onnx_spec` code on small networks with the same I/O: input (batch, 2 * channels, dim_f,
frames) of stacked real/imaginary STFT bins, output the same shape per source (or a mask).
Two 3x3 convolutions, the second dilated in time, give each output frame a receptive
field of 11 frames, so segment boundaries matter as they do for the real networks.
Their weights are random: the outputs are noise-like.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipelines.modelstore import ModelStore
from pipelines.registry import get_spec

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime we support


def make_random_mdx_onnx(
    path: Path | str,
    n_fft: int,
    dim_f: int,
    dim_t: int,
    output: Literal["spectrogram", "mask", "multi"] = "spectrogram",
    n_sources: int = 1,
    seed: int = 0,
    channels: int = 2,
    hidden: int = 8,
    fixed_frames: bool = False,
) -> Path:
    """Write a random MDX-style network to `path` and return the path.

    Batch and time axes are dynamic unless `fixed_frames`, which pins time to `dim_t` as
    many UVR exports do. `output="multi"` gives `n_sources` spectrograms stacked along the
    channel axis; `mask` ends in tanh so the complex mask stays bounded.
    """
    if dim_f > n_fft // 2 + 1:
        raise ValueError(f"dim_f {dim_f} exceeds the {n_fft // 2 + 1} bins of an n_fft {n_fft} STFT")
    if output != "multi" and n_sources != 1:
        raise ValueError(f"output {output!r} predicts one source, not {n_sources}")
    rng = np.random.default_rng(seed)
    c_in, c_out = 2 * channels, 2 * channels * n_sources

    def conv_weights(c_o: int, c_i: int) -> tuple[np.ndarray, np.ndarray]:
        w = rng.standard_normal((c_o, c_i, 3, 3)) / np.sqrt(9 * c_i)
        return w.astype(np.float32), (0.01 * rng.standard_normal(c_o)).astype(np.float32)

    w1, b1 = conv_weights(hidden, c_in)
    w2, b2 = conv_weights(c_out, hidden)
    frames: int | str = dim_t if fixed_frames else "frames"
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["h1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], pads=[1, 4, 1, 4], dilations=[1, 4]),
    ]
    if output == "mask":
        nodes.append(helper.make_node("Tanh", ["h2"], ["output"]))
    else:
        # a spectrogram near the input's scale: the mix (per source) plus the network's correction
        nodes.append(helper.make_node("Tile", ["input", "repeats"], ["tiled"]))
        nodes.append(helper.make_node("Mul", ["h2", "scale"], ["scaled"]))
        nodes.append(helper.make_node("Add", ["tiled", "scaled"], ["output"]))
    initializers = [numpy_helper.from_array(a, name) for name, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    initializers.append(numpy_helper.from_array(np.array([1, n_sources, 1, 1], np.int64), "repeats"))
    initializers.append(numpy_helper.from_array(np.array(0.5, np.float32), "scale"))
    graph = helper.make_graph(
        nodes,
        "random_mdx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c_in, dim_f, frames])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", c_out, dim_f, frames])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="stems.tools.onnx_models"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"random_stand_in": "1", "n_fft": str(n_fft), "dim_t": str(dim_t), "seed": str(seed)})
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def install_random_onnx(
    store: ModelStore, model_id: str, seed: int = 0, params: dict | None = None, fixed_frames: bool = False
) -> dict:
    """Make a random stand-in for registry model `model_id` and install it in `store`.

    `params` override the registry's (e.g. a small n_fft for fast tests) and are recorded
    in the store's manifest, so the separator runs with the same shapes the file has.
    Returns the manifest entry.
    """
    spec = get_spec(model_id)
    if spec.family != "onnx_spec":
        raise ValueError(f"{model_id!r} is a {spec.family!r} model, not onnx_spec")
    p = {**spec.params, **(params or {})}
    n_sources = len(spec.sources) if p.get("output", "spectrogram") == "multi" else 1
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_mdx_onnx(
            Path(tmp) / spec.files[0],
            p["n_fft"],
            p["dim_f"],
            p.get("segment_frames") or p["dim_t"],
            output=p.get("output", "spectrogram"),
            n_sources=n_sources,
            seed=seed,
            channels=spec.channels or 2,
            fixed_frames=fixed_frames,
        )
        return store.install(model_id, [path], params=params)
