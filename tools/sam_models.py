"""Tiny randomly initialised SAM Audio checkpoints, and the package's own inference as a reference.

SAM Audio's weights are gated and T5's cannot be fetched here, so tests build a tiny model
with mlx-audio's own classes (`SAMAudioConfig`, `SAMAudio`, its `T5Encoder`), a T5 config with
transformers' `T5Config` and a Unigram tokenizer trained on a few words with `tokenizers`,
and write them in the files the registry names: the checkpoint as mlx-community publishes it
(config.json + safetensors) and T5 as Hugging Face does (config.json, model.safetensors,
tokenizer.json). The codec keeps the real 1920-sample hop; widths are a few dozen channels.

`python -m tools.sam_models reference ...` runs the package alone on such files: its
`SAMAudio.from_pretrained` on a checkpoint directory, its text encoder fetched by name from a
Hugging Face cache in offline mode (as on a machine that downloaded it), its processor for the
anchors and `SAMAudio.separate` per chunk, joined with its `separate_long` cross-fade.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

WORDS = [
    "a man speaking",
    "drums and bass",
    "lead vocal singing",
    "a dog barking loudly",
    "the quick brown fox",
    "piano",
    "guitar",
    "birds",
]
T5_NAME = "stems-test/t5-tiny"  # the name the tiny checkpoint's config gives its text encoder


def write_random_sam(out: Path, model_id: str = "sam-audio-small", seed: int = 0, width: int = 32) -> dict[str, Path]:
    """Write a random tiny SAM Audio model's five store files into `out`; returns them by name."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_audio.sts.models.sam_audio import (
        DACVAEConfig,
        SAMAudio,
        SAMAudioConfig,
        T5EncoderConfig,
        TransformerConfig,
    )
    from mlx_audio.sts.models.sam_audio.text_encoder import T5Config, T5Encoder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5Config as HfT5Config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    codebook = 8
    config = SAMAudioConfig(
        in_channels=6 * codebook,
        audio_codec=DACVAEConfig(
            encoder_dim=8,
            encoder_rates=[2, 8, 10, 12],
            latent_dim=16,
            decoder_dim=96,
            decoder_rates=[12, 10, 8, 2],
            n_codebooks=2,
            codebook_size=16,
            codebook_dim=codebook,
        ),
        text_encoder=T5EncoderConfig(name=T5_NAME, dim=width),
        transformer=TransformerConfig(
            dim=width, n_heads=4, n_layers=2, context_dim=width, out_channels=2 * codebook, frequency_embedding_dim=32
        ),
        num_anchors=3,
        anchor_embedding_dim=8,
    )
    model = SAMAudio(config)
    # the anchor gate starts at 0 (tanh(0) = 0: spans would change nothing); a trained model's is not
    model.embed_anchors.gate = mx.random.uniform(0.5, 1.5, (1,))
    params = dict(tree_flatten(model.parameters()))
    files = {
        f"{model_id}.config.json": out / f"{model_id}.config.json",
        f"{model_id}.safetensors": out / f"{model_id}.safetensors",
        "t5-base.config.json": out / "t5-base.config.json",
        "t5-base.safetensors": out / "t5-base.safetensors",
        "t5-base.tokenizer.json": out / "t5-base.tokenizer.json",
    }
    mx.save_safetensors(str(files[f"{model_id}.safetensors"]), params)
    files[f"{model_id}.config.json"].write_text(json.dumps(dataclasses.asdict(config), indent=1))

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(
        WORDS, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(files["t5-base.tokenizer.json"]))
    vocab = tok.get_vocab_size() + 100  # T5's tokenizer adds 100 <extra_id_N> tokens
    hf = HfT5Config(
        vocab_size=vocab,
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
    )
    files["t5-base.config.json"].write_text(hf.to_json_string())
    t5 = T5Encoder(
        T5Config(
            vocab_size=vocab,
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            is_gated_act=hf.is_gated_act,
            dense_act_fn=hf.dense_act_fn,
        )
    )
    mx.save_safetensors(str(files["t5-base.safetensors"]), dict(tree_flatten(t5.parameters())))
    return files


def install_random_sam(
    store, model_id: str = "sam-audio-small", seed: int = 0, params: dict | None = None, workdir: Path | None = None
) -> dict[str, Path]:
    """A random tiny SAM Audio model installed in `store` under `model_id` (in-process, for benchmarks)."""
    import tempfile

    files = write_random_sam(Path(workdir or tempfile.mkdtemp(prefix="sam-")), model_id, seed)
    store.install(model_id, list(files.values()), params=params)
    return files


def package_layout(files: dict[str, Path], model_id: str, root: Path) -> tuple[Path, Path]:
    """The files as the package reads them: a checkpoint directory and a Hugging Face cache holding T5."""
    ckpt = root / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    _link(ckpt / "config.json", files[f"{model_id}.config.json"])
    _link(ckpt / "model.safetensors", files[f"{model_id}.safetensors"])
    cache = root / "hf-cache"
    repo = cache / ("models--" + T5_NAME.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for name, src in (
        ("config.json", "t5-base.config.json"),
        ("model.safetensors", "t5-base.safetensors"),
        ("tokenizer.json", "t5-base.tokenizer.json"),
    ):
        _link(snapshot / name, files[src])
    return ckpt, cache


def _link(dst: Path, src: Path) -> None:
    if not dst.exists():
        dst.symlink_to(Path(src).resolve())


def run_reference(files: dict[str, Path], model_id: str, root: Path, jobs: list[dict]) -> list[dict[str, np.ndarray]]:
    """The package's own inference on each job, in a fresh offline process; see `_reference_main`.

    A job: {"wav": mono 48 kHz float32, "prompt", "anchors": [[sign, start, end]], "chunk", "overlap"
    (samples), "seed", "steps", "method"}. Returns {"target", "residual"} per job.
    """
    ckpt, cache = package_layout(files, model_id, root)
    inputs = root / "jobs.npz"
    np.savez(
        inputs,
        meta=json.dumps([{k: v for k, v in j.items() if k != "wav"} for j in jobs]),
        **{f"wav{i}": j["wav"] for i, j in enumerate(jobs)},
    )
    output = root / "reference.npz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "hf-home")}
    subprocess.run(
        [sys.executable, "-m", "tools.sam_models", "reference", str(ckpt), str(inputs), str(output)],
        env=env,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    with np.load(output) as ref:
        return [{"target": ref[f"target{i}"], "residual": ref[f"residual{i}"]} for i in range(len(jobs))]


def _reference_main(ckpt: str, inputs: str, output: str) -> None:
    import mlx.core as mx
    from mlx_audio.sts.models.sam_audio import SAMAudio

    model = SAMAudio.from_pretrained(ckpt)  # config.json + *.safetensors; text encoder by name, from the cache
    hop = model.audio_codec.config.hop_length
    results = {}
    with np.load(inputs) as data:
        meta = json.loads(str(data["meta"]))
        for i, job in enumerate(meta):
            wav = data[f"wav{i}"].astype(np.float32)
            n, chunk, overlap = len(wav), job["chunk"], job["overlap"]
            hop_s = chunk - overlap
            starts = [0] if n <= chunk else [k * hop_s for k in range(math.ceil((n - overlap) / hop_s))]
            ode = {"method": job["method"], "step_size": 1.0 / job["steps"]}
            target, residual = np.zeros(n, np.float32), np.zeros(n, np.float32)
            t = mx.linspace(0, 1, overlap)  # the cross-fade of the package's separate_long
            fade_in = np.asarray(0.5 * (1 - mx.cos(math.pi * t)), dtype=np.float32)
            for k, lo in enumerate(starts):
                hi = min(lo + chunk, n)
                lo_s, hi_s = lo / 48000, hi / 48000
                anchors = [
                    (a[0], max(a[1], lo_s) - lo_s, min(a[2], hi_s) - lo_s)
                    for a in job["anchors"]
                    if a[2] > lo_s and a[1] < hi_s
                ]
                batch = model.processor(
                    descriptions=[job["prompt"]], audios=[wav[lo:hi]], anchors=[anchors] if anchors else None
                )
                frames = math.ceil((hi - lo) / hop)
                noise = mx.random.normal(
                    (1, frames, 2 * model.config.audio_codec.codebook_dim),
                    dtype=model.dtype,
                    key=mx.random.key(job["seed"] + k),
                )
                res = model.separate(
                    batch.audios,
                    batch.descriptions,
                    sizes=batch.sizes,
                    anchor_ids=batch.anchor_ids,
                    anchor_alignment=batch.anchor_alignment,
                    audio_pad_mask=batch.audio_pad_mask,
                    noise=noise,
                    ode_opt=ode,
                )
                tc = np.asarray(res.target[0])[: hi - lo, 0]
                rc = np.asarray(res.residual[0])[: hi - lo, 0]
                if k > 0:  # blend the previous chunk's tail into this chunk's head
                    tc[:overlap] = target[lo : lo + overlap] * (1 - fade_in) + tc[:overlap] * fade_in
                    rc[:overlap] = residual[lo : lo + overlap] * (1 - fade_in) + rc[:overlap] * fade_in
                target[lo:hi], residual[lo:hi] = tc, rc
            results[f"target{i}"], results[f"residual{i}"] = target, residual
    np.savez(output, **results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("checkpoint")
    ref.add_argument("inputs")
    ref.add_argument("output")
    args = parser.parse_args()
    _reference_main(args.checkpoint, args.inputs, args.output)
