"""Speech for real: Whisper base (multilingual) and tiny.en on real recordings,
and no invented text for inputs that hold no speech or lie about their format.

Real human speech comes from Debian's pocketsphinx-testdata and
asterisk-core-sounds-en-wav (./scripts/install.sh installs them); the tests
that need them skip without them. Models are converted once per session into
the test models folder, never into the repository.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bench.asr import corpus_wer, normaliser
from config.taskconfig import TierSpec
from fleet.models.convert.whisper_ct2 import MARKER
from workers.adapters.base import InputError, Prediction, Source
from workers.adapters.transcribe import TranscribeAdapter

pytestmark = pytest.mark.slow

SR = 16000
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
CARDS = Path("/usr/share/pocketsphinx/test/data/cards")
ASTERISK = Path("/usr/share/asterisk/sounds/en")
SENTENCE = (
    "sense_and_sensibility_01_austen_64kb-0890.wav",
    "unless to be rather cold hearted and rather selfish is to be ill disposed",
)


def sentence_wer(hypothesis: str) -> float:
    return corpus_wer([SENTENCE[1]], [hypothesis], normaliser())


def _need(path: Path) -> None:
    if not path.is_dir():
        pytest.skip(f"{path} is missing (./scripts/install.sh installs the Debian speech packages)")


@pytest.fixture(scope="module", params=["whisper-base", "whisper-tiny.en"])
def adapter(
    request: pytest.FixtureRequest,
    whisper_base_dir: Path,
    whisper_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TranscribeAdapter]:
    """Each tier of the transcribe ladder, loaded once for the module."""
    folder = whisper_base_dir if request.param == "whisper-base" else whisper_dir
    ad = TranscribeAdapter(audio_root=tmp_path_factory.mktemp("speech"))
    ad.load(TierSpec(name=request.param, path=str(folder), dtype="auto"), str(folder), "cpu")
    yield ad
    ad.unload()


def _run(ad: TranscribeAdapter, files: dict[str, np.ndarray]) -> dict[str, Prediction]:
    """Write float32 mono 16 kHz files under the adapter's root, transcribe them in
    one batch, return the predictions by name."""
    for name, x in files.items():
        sf.write(ad.audio_root / name, np.asarray(x, np.float32), SR, subtype="PCM_16")
    names = list(files)
    preps = [ad.prepare(Source(i, "audio", n, {"uri": n})) for i, n in enumerate(names)]
    out = ad.predict(preps)
    assert all(isinstance(p, Prediction) for p in out), out
    return dict(zip(names, out, strict=True))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the base model


def test_base_conversion_is_multilingual(whisper_base_dir: Path) -> None:
    gen = json.loads((whisper_base_dir / "generation_config.json").read_text())
    assert gen["is_multilingual"] is True
    # Multilingual special ids sit one above tiny.en's (50256, 50257, 50362).
    assert gen["eos_token_id"] == gen["pad_token_id"] == 50257
    assert gen["decoder_start_token_id"] == 50258 and gen["no_timestamps_token_id"] == 50363
    assert len(gen["lang_to_id"]) == 99 and gen["lang_to_id"]["<|en|>"] == 50259
    info = json.loads((whisper_base_dir / MARKER).read_text())
    assert info["parameters"] == 72_593_920 and info["vocab_size"] == 51865
    assert len(info["source"]) == 2  # model.bin read from its two package parts


def test_real_read_speech_and_prompts(adapter: TranscribeAdapter) -> None:
    """LibriVox sentences and spoken card names, through one batch: low WER, English."""
    _need(LIBRIVOX)
    refs = {}
    for folder, listing in ((LIBRIVOX, "transcription"), (CARDS, "cards.transcription")):
        for line in (folder / listing).read_text().splitlines():
            words, _, fileid = line.replace("<s>", "").replace("</s>", "").rpartition("(")
            name = f"{folder.name}-{fileid.strip(') ')}.wav"
            shutil.copy(folder / f"{fileid.strip(') ')}.wav", adapter.audio_root / name)
            refs[name] = " ".join(words.split())
    preps = [adapter.prepare(Source(i, "audio", n, {"uri": n})) for i, n in enumerate(refs)]
    results = adapter.predict(preps)
    hyps = []
    for res in results:
        assert isinstance(res, Prediction) and res.output is not None, res
        assert res.output["no_speech"] is False and res.output["language"] == "en"
        hyps.append(res.output["transcript"])
    # Whisper's English normaliser on both sides ("four" and "4" are the same word).
    rate = corpus_wer(list(refs.values()), hyps, normaliser())
    assert rate < 0.1, list(zip(refs.values(), hyps, strict=True))


# ----------------------------------------------------------------------------- no speech, no text

RNG = np.random.default_rng(14)
T3 = np.arange(3 * SR) / SR
HOSTILE = {
    "faint-noise.wav": RNG.standard_normal(3 * SR) * 1e-3,  # -60 dBFS
    "one-sample.wav": np.array([0.5]),
    "ten-samples.wav": RNG.standard_normal(10) * 0.3,
    "fifty-ms.wav": RNG.standard_normal(SR // 20) * 0.3,
    "tone-440.wav": 0.5 * np.sin(2 * np.pi * 440 * T3),
    "loud-noise.wav": RNG.standard_normal(3 * SR) * 0.1,  # passes the gate; Whisper says no speech
}


def test_hostile_inputs_end_done_with_no_text(adapter: TranscribeAdapter) -> None:
    """Each of these used to come back as "you", "Beeping" or an "Aaaa..." run."""
    speech = sf.read(LIBRIVOX / SENTENCE[0], dtype="float32")[0] if LIBRIVOX.is_dir() else None
    files = dict(HOSTILE)
    if speech is not None:
        files["speech.wav"] = speech  # in the same batch, still transcribed
    got = _run(adapter, files)
    for name in HOSTILE:
        out = got[name].output
        assert out is not None
        assert out["transcript"] == "" and out["no_speech"] is True, (name, out)
        assert out["language"] is None and out["skipped_chunks"], (name, out)
    assert got["tone-440.wav"].output["skipped_chunks"] == {"tone": 1}  # type: ignore[index]
    assert got["faint-noise.wav"].output["skipped_chunks"] == {"quiet": 1}  # type: ignore[index]
    # Loud noise reached the model: its own no-speech rule stopped the text.
    assert got["loud-noise.wav"].output["skipped_chunks"] == {"no_speech_prob": 1}  # type: ignore[index]
    if speech is not None:
        out = got["speech.wav"].output
        assert out is not None and out["no_speech"] is False
        assert sentence_wer(out["transcript"]) < 0.1


def test_recorded_tones_and_silence_are_not_transcribed(adapter: TranscribeAdapter) -> None:
    """asterisk-core-sounds-en's beep and silence prompts: no text."""
    _need(ASTERISK)
    names = ["beep.wav", "silence/1.wav", "silence/3.wav"]
    for n in names:
        shutil.copy(ASTERISK / n, adapter.audio_root / n.replace("/", "-"))
    preps = [
        adapter.prepare(Source(i, "audio", n.replace("/", "-"), {"uri": n.replace("/", "-")}))
        for i, n in enumerate(names)
    ]
    for res in adapter.predict(preps):
        assert isinstance(res, Prediction) and res.output is not None
        assert res.output["no_speech"] is True and res.output["transcript"] == ""


def test_speech_after_a_long_silence_is_kept(adapter: TranscribeAdapter) -> None:
    """A 30 s window of silence is dropped, the window with speech is transcribed."""
    _need(LIBRIVOX)
    speech = sf.read(LIBRIVOX / SENTENCE[0], dtype="float32")[0]
    track = np.concatenate([np.zeros(35 * SR, np.float32), speech])
    out = _run(adapter, {"late.wav": track})["late.wav"].output
    assert out is not None and out["chunks"] == 2 and out["skipped_chunks"] == {"quiet": 1}
    assert out["no_speech"] is False and sentence_wer(out["transcript"]) < 0.1


# ----------------------------------------------------------------------------- formats that lie


def test_seven_bit_header_is_refused_not_transcribed(adapter: TranscribeAdapter) -> None:
    _need(LIBRIVOX)
    pcm = (sf.read(LIBRIVOX / SENTENCE[0], dtype="int16")[0]).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, SR, SR, 1, 7)  # PCM, mono, 7 bits, 1 byte per frame
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(pcm)) + pcm
    (adapter.audio_root / "seven.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(InputError, match="7-bit PCM samples"):
        adapter.prepare(Source(0, "audio", "seven.wav", {"uri": "seven.wav"}))


def test_stereo_that_cancels_is_transcribed_from_one_channel(adapter: TranscribeAdapter) -> None:
    _need(LIBRIVOX)
    speech = sf.read(LIBRIVOX / SENTENCE[0], dtype="float32")[0]
    sf.write(adapter.audio_root / "inverted.wav", np.stack([speech, -speech], axis=1), SR)
    prep = adapter.prepare(Source(0, "audio", "inverted.wav", {"uri": "inverted.wav"}))
    assert prep.notes["channels_cancel"] is True
    (res,) = adapter.predict([prep])
    assert isinstance(res, Prediction) and res.output is not None
    assert sentence_wer(res.output["transcript"]) < 0.1
