"""CTC transcribe tiers (workers.adapters.ctc) with small wav2vec2 models built
from a Wav2Vec2Config with random weights and a character vocabulary
(bench.ctc_model): their text is meaningless, so these tests check frames,
windows, batching, the no-speech gate and failures, never words.

The windowing test uses a model without transformer layers: each of its output
frames depends only on the samples within the convolutional position
embedding's reach (a few hundred ms here; its feature encoder normalises each
frame, not the whole input as wav2vec2-base's group norm does), less than the 2 s of context a
window keeps at each seam, so a windowed run must give the one-pass run's
log-probabilities frame for frame, with no frame twice and none missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bench.ctc_model import build_ctc_model
from config.taskconfig import TierSpec
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.ctc import CTCAdapter, CTCAudio
from workers.adapters.speech import SpeechAdapter
from workers.ctc_windows import conv_frames, kept_parts

pytestmark = pytest.mark.slow

SR = 16000


def babble(seconds: float, seed: int) -> np.ndarray:
    """Loud noise in syllable-like bursts: passes the voice gate (not quiet, not a tone)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(n) / SR + rng.uniform(0, 6))
    return (0.2 * envelope * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ctc-models")
    return {
        # wav2vec2-base style (group norm, zero padding, no attention mask)
        "base": build_ctc_model(d / "base", seed=1),
        # wav2vec2-large-lv60 style (layer norm, attention mask)
        "masked": build_ctc_model(d / "masked", seed=2, attention_mask=True),
        # no transformer layers, per-frame layer norm: every frame sees only its neighbours
        "local": build_ctc_model(d / "local", seed=3, num_hidden_layers=0, attention_mask=True),
        # emits blank for everything, as a trained model does for noise
        "blank": build_ctc_model(d / "blank", seed=4, blank_bias=50.0),
    }


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctc-audio")
    for name, seconds, seed in (("one.wav", 1.0, 1), ("seven.wav", 7.0, 2), ("long.wav", 45.0, 3)):
        sf.write(root / name, babble(seconds, seed), SR, subtype="FLOAT")
    sf.write(root / "three-min.flac", babble(180.0, 4), SR)
    sf.write(root / "silence.wav", np.zeros(40 * SR, np.float32), SR)
    rng = np.random.default_rng(5)
    sf.write(root / "faint.wav", (1e-3 * rng.standard_normal(3 * SR)).astype(np.float32), SR)
    # 8 kHz stereo: resampled and mixed like any other file
    stereo = np.stack([babble(5.0, 6)[::2], babble(5.0, 7)[::2]], axis=1)
    sf.write(root / "phone.wav", stereo, 8000, subtype="PCM_16")
    return root


def load(path: Path, root: Path, **options: object) -> CTCAdapter:
    adapter = CTCAdapter(audio_root=root)
    adapter.load(TierSpec(name=path.name, path=str(path), options=dict(options)), str(path), "cpu")
    return adapter


def source(item_id: int, uri: str) -> Source:
    return Source(item_id=item_id, kind="audio", external_id=uri, data={"uri": uri})


def one_pass(adapter: CTCAdapter, prep: Prepared) -> np.ndarray:
    audio: CTCAudio = prep.payload
    whole = ((audio.samples - audio.mean) / audio.std).astype(np.float32)
    return adapter.log_probs([whole])[0]


def windowed(adapter: CTCAdapter, prep: Prepared) -> np.ndarray:
    audio: CTCAudio = prep.payload
    whole = ((audio.samples - audio.mean) / audio.std).astype(np.float32)
    outs = [adapter.log_probs([whole[w.start : w.end]])[0] for w in audio.windows]
    return np.concatenate(kept_parts(audio.windows, outs))


@pytest.mark.parametrize(("uri", "window_s"), [("long.wav", 20.0), ("three-min.flac", 30.0)])
def test_windows_merge_to_the_one_pass_frames(
    models: dict[str, Path], audio_root: Path, uri: str, window_s: float
) -> None:
    adapter = load(models["local"], audio_root, window_s=window_s, overlap_s=4.0)
    prep = adapter.prepare(source(0, uri))
    n = len(prep.payload.samples)
    assert len(prep.payload.windows) > 1
    full, merged = one_pass(adapter, prep), windowed(adapter, prep)
    assert len(full) == len(merged) == conv_frames(n, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    np.testing.assert_allclose(merged, full, atol=2e-4, rtol=0)
    (res,) = adapter.predict([prep])
    assert isinstance(res, Prediction) and res.output is not None
    assert res.output["frames"] == len(full) and res.output["chunks"] == len(prep.payload.windows)
    assert res.output["decoder"] == "ctc_greedy" and res.output["transcript"]


def test_windows_with_attention_keep_every_frame(models: dict[str, Path], audio_root: Path) -> None:
    """With self-attention the logits near a seam differ a little from a one-pass
    run (the window sees less context); the frame count may not, and frames away
    from the seams mostly agree."""
    adapter = load(models["masked"], audio_root, window_s=20.0, overlap_s=4.0)
    prep = adapter.prepare(source(0, "long.wav"))
    full, merged = one_pass(adapter, prep), windowed(adapter, prep)
    assert full.shape == merged.shape
    assert np.mean(full.argmax(-1) == merged.argmax(-1)) > 0.5


def test_mixed_lengths_in_one_batch(models: dict[str, Path], audio_root: Path) -> None:
    """A 1 s, a 7 s, a windowed 45 s and an 8 kHz stereo file together give what
    each gives alone (attention-masked padding), however the windows are grouped."""
    adapter = load(models["masked"], audio_root, window_s=20.0)
    uris = ["one.wav", "seven.wav", "long.wav", "phone.wav"]
    prepared = [adapter.prepare(source(i, u)) for i, u in enumerate(uris)]
    assert [p.cost for p in prepared] == [100, 700, 4500, 500]
    together = adapter.predict(prepared)
    alone = [adapter.predict([p])[0] for p in prepared]
    assert adapter.tier is not None
    adapter.tier.options["max_chunks_per_forward"] = 2
    grouped = adapter.predict(prepared)
    for a, b, c, p in zip(together, alone, grouped, prepared, strict=True):
        assert isinstance(a, Prediction) and isinstance(b, Prediction) and a.output
        assert a.output == b.output == c.output  # type: ignore[union-attr]
        n = len(p.payload.samples)
        assert a.output["frames"] == conv_frames(n, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    assert [a.output["chunks"] for a in together if isinstance(a, Prediction) and a.output] == [
        1,
        1,
        3,
        1,
    ]


def test_zero_padded_batch_keeps_shapes(models: dict[str, Path], audio_root: Path) -> None:
    """A wav2vec2-base style model (no attention mask) in a mixed batch: every file
    gets its own frame count back, the padding never becomes frames."""
    adapter = load(models["base"], audio_root, window_s=20.0)
    prepared = [adapter.prepare(source(i, u)) for i, u in enumerate(["one.wav", "long.wav"])]
    results = adapter.predict(prepared)
    for p, res in zip(prepared, results, strict=True):
        assert isinstance(res, Prediction) and res.output is not None
        assert res.output["frames"] == conv_frames(
            len(p.payload.samples), (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
        )


def test_silence_never_reaches_the_model(models: dict[str, Path], audio_root: Path) -> None:
    adapter = load(models["base"], audio_root)
    results = adapter.predict(
        [adapter.prepare(source(i, u)) for i, u in enumerate(["silence.wav", "faint.wav"])]
    )
    for res, chunks in zip(results, (2, 1), strict=True):
        assert isinstance(res, Prediction) and res.output is not None
        assert res.output["transcript"] == "" and res.output["no_speech"] is True
        assert res.output["skipped_chunks"] == {"quiet": chunks} and res.output["frames"] == 0
        assert res.output["language"] is None


def test_empty_decode_is_no_speech(models: dict[str, Path], audio_root: Path) -> None:
    """Noise loud enough for the voice gate, decoded to nothing: no text, no_speech."""
    adapter = load(models["blank"], audio_root, language="en")
    (res,) = adapter.predict([adapter.prepare(source(0, "seven.wav"))])
    assert isinstance(res, Prediction) and res.output is not None
    assert res.output == {
        "transcript": "",
        "no_speech": True,
        "language": None,
        "duration_s": 7.0,
        "chunks": 1,
        "frames": 349,
        "decoder": "ctc_greedy",
        "blank_share": 1.0,
        "skipped_chunks": {"empty": 1},
    }


def test_corrupt_files_fail_alone(models: dict[str, Path], audio_root: Path) -> None:
    good = (audio_root / "seven.wav").read_bytes()
    (audio_root / "cut.wav").write_bytes(good[: len(good) // 3])
    (audio_root / "notes.wav").write_text("not audio\n")
    adapter = load(models["base"], audio_root)
    errors: dict[str, str] = {}
    prepared = []
    for i, uri in enumerate(["one.wav", "cut.wav", "notes.wav", "seven.wav"]):
        try:
            prepared.append(adapter.prepare(source(i, uri)))
        except InputError as e:
            errors[uri] = str(e)
    assert "truncated" in errors["cut.wav"] and "text file" in errors["notes.wav"]
    bad = Prepared(item_id=9, cost=100, payload=[np.zeros(SR, np.float32)])  # a Whisper payload
    results = adapter.predict([*prepared, bad])
    assert all(isinstance(r, Prediction) for r in results[:2])
    assert isinstance(results[2], InputError) and "not prepared for a CTC model" in str(results[2])


def test_speech_adapter_switches_kinds(
    models: dict[str, Path], audio_root: Path, whisper_dir: Path, tiny_models: Path
) -> None:
    """One transcribe adapter loads a Whisper tier, then a CTC tier, then refuses a
    model that is neither."""
    adapter = SpeechAdapter(audio_root=audio_root)
    adapter.load(TierSpec(name="tiny.en", path=str(whisper_dir)), str(whisper_dir), "cpu")
    whisper_prep = adapter.prepare(source(0, "seven.wav"))
    assert isinstance(whisper_prep.payload, list)  # Whisper's 30 s chunks
    adapter.load(TierSpec(name="ctc", path=str(models["base"])), str(models["base"]), "cpu")
    prep = adapter.prepare(source(0, "seven.wav"))
    assert isinstance(prep.payload, CTCAudio)
    (res,) = adapter.predict([prep])
    assert isinstance(res, Prediction) and res.output and res.output["decoder"] == "ctc_greedy"
    bert = tiny_models / "tiny-small"
    with pytest.raises(ValueError, match="model_type 'bert' is not a speech model"):
        adapter.check(TierSpec(name="bert", path=str(bert)), str(bert))
    with pytest.raises(ValueError, match="model_type 'bert' is not a speech model"):
        adapter.load(TierSpec(name="bert", path=str(bert)), str(bert), "cpu")


def test_model_that_cannot_be_windowed_is_refused(tmp_path: Path, audio_root: Path) -> None:
    """A CTC model with an adapter stack changes its frame rate: refused at load."""
    folder = build_ctc_model(tmp_path / "adapted", add_adapter=True, output_hidden_size=32)
    with pytest.raises(ValueError, match="cannot be windowed"):
        load(folder, audio_root)


def test_a_silent_window_splits_the_runs(models: dict[str, Path], audio_root: Path) -> None:
    """20 s of sound, 40 s of silence, 20 s of sound in 20 s windows: the window
    inside the silence is gated, its frames are not decoded, the two runs either
    side are decoded apart and every other frame is kept once."""
    track = np.concatenate([babble(20.0, 8), np.zeros(40 * SR, np.float32), babble(20.0, 9)])
    sf.write(audio_root / "gap.wav", track, SR, subtype="FLOAT")
    adapter = load(models["base"], audio_root, window_s=20.0, overlap_s=4.0)
    prep = adapter.prepare(source(0, "gap.wav"))
    windows = prep.payload.windows
    assert [(w.start // SR, w.end // SR) for w in windows] == [
        (0, 20),
        (16, 36),
        (32, 52),
        (48, 68),
        (64, 80),
    ]
    (res,) = adapter.predict([prep])
    assert isinstance(res, Prediction) and res.output is not None
    assert res.output["skipped_chunks"] == {"quiet": 1}
    gap = windows[2].keep_to - windows[2].keep_from
    total = conv_frames(len(track), (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    assert res.output["frames"] == total - gap
