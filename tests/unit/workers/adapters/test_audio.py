"""workers.adapters.audio and .voice: path safety, decoding checks, resampling and chunking.

Pure tests (no model, no torch): every bad-file case must become an InputError
with a message that says what is wrong, never a crash or a silent half-result.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from workers.adapters.audio import decode_audio, mix_to_mono, resolve_audio_path
from workers.adapters.base import InputError
from workers.adapters.voice import chunk_audio, is_steady_tone, voice_gate, voiced_seconds

SR = 16000


def tone(seconds: float, sr: int = SR, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """A sine (per channel at a different frequency), shape (n,) or (n, channels)."""
    t = np.arange(int(seconds * sr)) / sr
    cols = [0.3 * np.sin(2 * np.pi * (freq + 110 * c) * t) for c in range(channels)]
    data = np.stack(cols, axis=1) if channels > 1 else cols[0]
    return data.astype(np.float32)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "audio"
    r.mkdir()
    return r


# ----------------------------------------------------------------------------- paths


def test_resolve_relative_absolute_and_file_uri(root: Path) -> None:
    (root / "calls").mkdir()
    f = root / "calls" / "a b.wav"
    sf.write(f, tone(0.5), SR)
    assert resolve_audio_path(root, "calls/a b.wav") == f.resolve()
    assert resolve_audio_path(root, str(f)) == f.resolve()
    assert resolve_audio_path(root, f.as_uri()) == f.resolve()  # percent-encoded space
    assert resolve_audio_path(root, "calls/../calls/a b.wav") == f.resolve()  # stays inside


@pytest.mark.parametrize("uri", ["", "   "])
def test_empty_uri(root: Path, uri: str) -> None:
    with pytest.raises(InputError, match="empty"):
        resolve_audio_path(root, uri)


@pytest.mark.parametrize("uri", ["../secret.wav", "calls/../../secret.wav", "/etc/passwd"])
def test_dotdot_and_absolute_escape(root: Path, uri: str) -> None:
    (root.parent / "secret.wav").write_bytes(b"x")
    with pytest.raises(InputError, match="outside the audio root"):
        resolve_audio_path(root, uri)


def test_file_uri_outside_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "x.wav"
    sf.write(outside, tone(0.2), SR)
    with pytest.raises(InputError, match="outside the audio root"):
        resolve_audio_path(root, outside.as_uri())


def test_other_schemes_refused(root: Path) -> None:
    with pytest.raises(InputError, match="scheme 's3' is not supported"):
        resolve_audio_path(root, "s3://bucket/a.wav")
    with pytest.raises(InputError, match="host"):
        resolve_audio_path(root, "file://otherhost/a.wav")


def test_symlink_escape(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.wav"
    sf.write(outside, tone(0.2), SR)
    (root / "link.wav").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path)
    with pytest.raises(InputError, match="symlink"):
        resolve_audio_path(root, "link.wav")
    with pytest.raises(InputError, match="symlink"):
        resolve_audio_path(root, "dirlink/outside.wav")


def test_symlink_inside_root_is_fine(root: Path) -> None:
    target = root / "real.wav"
    sf.write(target, tone(0.2), SR)
    (root / "alias.wav").symlink_to(target)
    assert resolve_audio_path(root, "alias.wav") == target.resolve()


def test_missing_file(root: Path) -> None:
    with pytest.raises(InputError, match="not found: 'nope.wav'"):
        resolve_audio_path(root, "nope.wav")


def test_directory(root: Path) -> None:
    (root / "d.wav").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        resolve_audio_path(root, "d.wav")


def test_fifo(root: Path) -> None:
    os.mkfifo(root / "pipe.wav")
    with pytest.raises(InputError, match="not a regular file"):
        resolve_audio_path(root, "pipe.wav")


def test_missing_root_is_not_the_items_fault(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_audio_path(tmp_path / "nowhere", "a.wav")


# ----------------------------------------------------------------------------- bad files


def test_zero_bytes(tmp_path: Path) -> None:
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    with pytest.raises(InputError, match="0 bytes"):
        decode_audio(p)


def test_truncated_wav(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    sf.write(good, tone(2.0), SR, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        decode_audio(cut)
    header_only = tmp_path / "hdr.wav"
    header_only.write_bytes(good.read_bytes()[:30])  # cut inside the header
    with pytest.raises(InputError, match="corrupt|not in a recognised"):
        decode_audio(header_only)


def test_wav_with_no_samples(tmp_path: Path) -> None:
    p = tmp_path / "nothing.wav"
    sf.write(p, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(InputError, match="no audio samples"):
        decode_audio(p)


def test_text_named_wav(tmp_path: Path) -> None:
    p = tmp_path / "notes.wav"
    p.write_text("meeting notes, not a recording\n" * 20)
    with pytest.raises(InputError, match="not a supported audio file: it looks like a text file"):
        decode_audio(p)


def test_png_named_ogg(tmp_path: Path) -> None:
    p = tmp_path / "pic.ogg"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match="PNG image"):
        decode_audio(p)


def test_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "noise.mp3"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="recognised audio format|corrupt"):
        decode_audio(p)


def test_low_sample_rate(tmp_path: Path) -> None:
    p = tmp_path / "low.wav"
    sf.write(p, tone(1.0, sr=4000, freq=300), 4000)
    with pytest.raises(InputError, match="4000 Hz"):
        decode_audio(p)


def test_too_many_channels(tmp_path: Path) -> None:
    p = tmp_path / "ten.wav"
    sf.write(p, tone(0.5, channels=10), SR)
    assert sf.info(p).channels == 10
    with pytest.raises(InputError, match="10 channels"):
        decode_audio(p)


def test_too_long(tmp_path: Path) -> None:
    p = tmp_path / "long.wav"
    sf.write(p, tone(3.0), SR)
    with pytest.raises(InputError, match="limit"):
        decode_audio(p, max_seconds=2.0)
    _, dur = decode_audio(p, max_seconds=3.0)
    assert dur == pytest.approx(3.0)


def test_nan_samples(tmp_path: Path) -> None:
    p = tmp_path / "nan.wav"
    x = tone(1.0)
    x[100] = np.nan
    sf.write(p, x, SR, subtype="FLOAT")
    with pytest.raises(InputError, match="NaN"):
        decode_audio(p)


# ----------------------------------------------------------------------------- good files


def test_stereo_44k_downmixed_and_resampled(tmp_path: Path) -> None:
    p = tmp_path / "stereo.wav"
    left = tone(2.5, sr=44100, freq=440.0)
    stereo = np.stack([left, -left * 0.5], axis=1)  # mean = 0.25 * left
    sf.write(p, stereo, 44100, subtype="FLOAT")
    samples, dur = decode_audio(p)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert dur == pytest.approx(2.5)
    assert len(samples) == 40000  # ceil(110250 * 160 / 441)
    # Downmix by mean, and the tone survives resampling at the right amplitude/pitch.
    ref = tone(2.5, sr=SR, freq=440.0) * 0.25
    mid = slice(1000, -1000)
    assert np.max(np.abs(samples[mid] - ref[mid])) < 2e-3


def test_16k_mono_passthrough(tmp_path: Path) -> None:
    p = tmp_path / "mono.wav"
    x = tone(1.0)
    sf.write(p, x, SR, subtype="FLOAT")
    samples, dur = decode_audio(p)
    assert dur == 1.0
    np.testing.assert_array_equal(samples, x)


def test_long_resample_matches_one_shot(tmp_path: Path) -> None:
    """Block-wise resampling must equal resampling the whole signal at once."""
    from scipy.signal import resample_poly

    x = np.random.default_rng(1).uniform(-0.5, 0.5, 48000 * 40).astype(np.float32)
    p = tmp_path / "long48k.wav"
    sf.write(p, x, 48000, subtype="FLOAT")
    samples, _ = decode_audio(p)
    np.testing.assert_allclose(samples, resample_poly(x, 1, 3), atol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext", "sr", "tol"),
    [
        ("FLAC", "PCM_16", "flac", 16000, 1e-3),
        ("OGG", "VORBIS", "ogg", 16000, 0.1),
        ("OGG", "OPUS", "opus", 48000, 0.1),
        ("MP3", "MPEG_LAYER_III", "mp3", 16000, 0.1),
    ],
)
def test_compressed_round_trip(
    tmp_path: Path, fmt: str, subtype: str, ext: str, sr: int, tol: float
) -> None:
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} cannot write {fmt}/{subtype}")
    p = tmp_path / f"a.{ext}"
    sf.write(p, tone(2.0, sr=sr, freq=440), sr, format=fmt, subtype=subtype)
    samples, dur = decode_audio(p)
    assert dur == pytest.approx(2.0, abs=0.1)  # codecs may add a frame of padding
    assert abs(len(samples) - 32000) < 0.1 * SR
    # Same tone: correlate against a 440 Hz reference over a middle stretch.
    mid = samples[8000:24000]
    spectrum = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    peak_hz = np.argmax(spectrum) * SR / len(mid)
    assert abs(peak_hz - 440) < 5
    assert abs(np.sqrt(np.mean(mid**2)) - 0.3 / np.sqrt(2)) < tol


def test_truncated_mp3(tmp_path: Path) -> None:
    if "MP3" not in sf.available_formats():
        pytest.skip("libsndfile without MP3")
    good = tmp_path / "a.mp3"
    sf.write(good, tone(6.0), SR, format="MP3")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated|corrupt"):
        decode_audio(cut)


def test_truncated_flac(tmp_path: Path) -> None:
    good = tmp_path / "a.flac"
    sf.write(good, tone(3.0), SR, format="FLAC")
    cut = tmp_path / "cut.flac"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt|truncated"):
        decode_audio(cut)


# ----------------------------------------------------------------------------- chunking


def test_chunk_65s_into_3() -> None:
    x = np.zeros(65 * SR, dtype=np.float32)
    chunks = chunk_audio(x)
    assert [len(c) for c in chunks] == [30 * SR, 30 * SR, 5 * SR]
    assert sum(len(c) for c in chunks) == len(x)


def test_chunk_drops_tiny_tail_but_keeps_tiny_only_chunk() -> None:
    x = np.zeros(30 * SR + SR // 20, dtype=np.float32)  # 30.05 s
    assert [len(c) for c in chunk_audio(x)] == [30 * SR]
    short = np.zeros(SR // 20, dtype=np.float32)
    assert [len(c) for c in chunk_audio(short)] == [SR // 20]
    assert chunk_audio(np.zeros(0, dtype=np.float32)) == []


def test_chunk_exact_multiple() -> None:
    assert [len(c) for c in chunk_audio(np.zeros(60 * SR, dtype=np.float32))] == [30 * SR] * 2


def test_chunk_cuts_at_silence() -> None:
    """With a search window, the cut moves to the quiet gap before the 30 s mark."""
    x = tone(65.0)
    x[int(28.5 * SR) : int(29.0 * SR)] = 0.0  # a pause 1-1.5 s before the window end
    chunks = chunk_audio(x, cut_search_s=2.0)
    assert all(len(c) <= 30 * SR for c in chunks)
    assert 28.5 * SR <= len(chunks[0]) <= 29.0 * SR
    assert sum(len(c) for c in chunks) == len(x)
    assert len(chunks) == 3


def test_chunk_prefers_a_pause_to_a_later_dropout() -> None:
    """A 40 ms dropout inside a word is quieter (digital zero) and later than a
    150 ms pause that holds faint room noise: the cut goes into the pause."""
    rng = np.random.default_rng(0)
    x = tone(40.0)
    x[int(28.6 * SR) : int(28.75 * SR)] = rng.normal(0, 1e-3, int(0.15 * SR))  # -60 dBFS
    x[int(29.6 * SR) : int(29.64 * SR)] = 0.0
    first = chunk_audio(x, cut_search_s=2.0)[0]
    assert 28.6 * SR <= len(first) <= 28.75 * SR


@pytest.mark.parametrize(
    ("gaps", "expect"),
    [
        ([(28.2, 28.3), (29.0, 29.3)], (29.0, 29.3)),  # the longest pause wins
        ([(28.2, 28.4), (29.0, 29.2)], (29.0, 29.2)),  # of two as long, the later
        ([], (29.98, 30.0)),  # no pause: the quietest frame, here the last
    ],
)
def test_chunk_cut_table(gaps: list[tuple[float, float]], expect: tuple[float, float]) -> None:
    x = tone(40.0)
    x[int(29.98 * SR) : int(30.0 * SR)] *= 0.5
    for a, b in gaps:
        x[int(a * SR) : int(b * SR)] = 0.0
    first = chunk_audio(x, cut_search_s=2.0)[0]
    assert expect[0] * SR <= len(first) <= expect[1] * SR


def test_chunk_rejects_multichannel() -> None:
    with pytest.raises(ValueError):
        chunk_audio(np.zeros((10, 2), dtype=np.float32))


# ----------------------------------------------------------------------------- headers that lie


def _wav_bytes(
    data: bytes, *, bits: int, block_align: int, channels: int = 1, tag: int = 1, sr: int = SR
) -> bytes:
    """A RIFF/WAVE file with a hand-written fmt chunk (whatever it claims) around `data`."""
    fmt = struct.pack("<HHIIHH", tag, channels, sr, sr * block_align, block_align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("block_align", [1, 2])
def test_seven_bit_wav_is_refused(tmp_path: Path, block_align: int) -> None:
    """16-bit speech under a header claiming 7-bit samples: libsndfile would read it
    as 8-bit noise twice as long; it must fail with the reason instead."""
    p = tmp_path / "seven.wav"
    p.write_bytes(_wav_bytes(_pcm16(tone(1.0)), bits=7, block_align=block_align))
    with pytest.raises(
        InputError, match=r"7-bit PCM samples; supported PCM sample sizes are 8, 16"
    ):
        decode_audio(p)


def test_inconsistent_block_align_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "align.wav"
    p.write_bytes(_wav_bytes(_pcm16(tone(1.0)), bits=16, block_align=3))
    with pytest.raises(InputError, match="need 2 bytes per frame, the header says 3"):
        decode_audio(p)


def test_hand_written_16_bit_wav_decodes(tmp_path: Path) -> None:
    """The same writer with an honest header decodes to the signal (the check is not
    refusing everything hand-made)."""
    p = tmp_path / "honest.wav"
    p.write_bytes(_wav_bytes(_pcm16(tone(1.0)), bits=16, block_align=2))
    samples, dur = decode_audio(p)
    assert dur == pytest.approx(1.0)
    assert np.max(np.abs(samples - tone(1.0))) < 1e-3


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_24", "PCM_32", "DOUBLE", "ULAW", "IMA_ADPCM"])
def test_real_sample_formats_still_decode(tmp_path: Path, subtype: str) -> None:
    p = tmp_path / f"{subtype}.wav"
    sf.write(p, tone(1.0), SR, subtype=subtype)
    samples, dur = decode_audio(p)
    assert dur == pytest.approx(1.0, abs=0.02)
    assert np.max(np.abs(samples[100:-100])) > 0.2


def test_24_bit_extensible_with_20_valid_bits_decodes(tmp_path: Path) -> None:
    """WAVE_FORMAT_EXTENSIBLE may declare fewer valid bits than its 24-bit container."""
    p = tmp_path / "ext.wav"
    sf.write(p, tone(1.0), SR, subtype="PCM_24", format="WAVEX")
    raw = bytearray(p.read_bytes())
    fmt_at = raw.index(b"fmt ") + 8
    assert struct.unpack_from("<H", raw, fmt_at)[0] == 0xFFFE
    struct.pack_into("<H", raw, fmt_at + 18, 20)  # wValidBitsPerSample
    p.write_bytes(bytes(raw))
    _, dur = decode_audio(p)
    assert dur == pytest.approx(1.0)


def test_stereo_channels_that_cancel_use_one_channel(tmp_path: Path) -> None:
    """Right = -left: the plain mix is digital silence; the left channel is used and
    the repair is noted."""
    p = tmp_path / "cancel.wav"
    left = tone(2.0)
    sf.write(p, np.stack([left, -left], axis=1), SR, subtype="PCM_16")
    notes: dict[str, object] = {}
    samples, dur = decode_audio(p, notes=notes)
    assert notes == {"channels_cancel": True}
    assert np.max(np.abs(samples - left)) < 1e-3


def test_nearly_cancelling_channels_are_caught_too(tmp_path: Path) -> None:
    p = tmp_path / "almost.wav"
    left = tone(2.0)
    sf.write(p, np.stack([left, -0.95 * left], axis=1), SR, subtype="FLOAT")  # mix at -32 dB
    notes: dict[str, object] = {}
    samples, _ = decode_audio(p, notes=notes)
    assert notes.get("channels_cancel") is True
    assert np.max(np.abs(samples - left)) < 1e-3


def test_ordinary_stereo_is_mixed_without_a_note(tmp_path: Path) -> None:
    p = tmp_path / "stereo.wav"
    sf.write(p, tone(1.0, channels=2), SR, subtype="FLOAT")
    notes: dict[str, object] = {}
    samples, _ = decode_audio(p, notes=notes)
    assert notes == {}
    assert np.allclose(samples, tone(1.0, channels=2).mean(axis=1), atol=1e-6)


@pytest.mark.parametrize(
    ("data", "cancelled"),
    [
        (np.zeros((100, 2), np.float32), False),  # silence is not "cancelling"
        (np.stack([tone(0.1), np.zeros(1600, np.float32)], axis=1), False),  # one channel empty
        (np.stack([tone(0.1), -tone(0.1)], axis=1), True),
        (np.stack([tone(0.1), tone(0.1), -2 * tone(0.1)], axis=1), True),  # 3 channels
    ],
)
def test_mix_to_mono_table(data: np.ndarray, cancelled: bool) -> None:
    mono, flag = mix_to_mono(data)
    assert flag is cancelled and mono.shape == (len(data),)


# ----------------------------------------------------------------------------- voice gate

RNG = np.random.default_rng(7)
HOSTILE = {
    "faint noise (-60 dBFS)": (RNG.standard_normal(3 * SR) * 1e-3, "quiet"),
    "1 sample": (np.array([0.5]), "quiet"),
    "10 samples": (RNG.standard_normal(10) * 0.3, "quiet"),
    "50 ms of loud noise": (RNG.standard_normal(SR // 20) * 0.3, "quiet"),
    "steady 440 Hz tone": (tone(3.0, freq=440.0) * 1.6, "tone"),
    "DTMF-like pair of tones": (tone(2.0, freq=697.0) + tone(2.0, freq=1209.0), "tone"),
    "digital silence": (np.zeros(SR, np.float32), "quiet"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_voice_gate_stops_hostile_inputs(name: str) -> None:
    samples, why = HOSTILE[name]
    assert voice_gate(samples.astype(np.float32)) == why


def test_voice_gate_lets_loud_broadband_noise_through_to_the_model() -> None:
    """Loud noise is not the gate's call: Whisper's no-speech probability decides it."""
    assert voice_gate((RNG.standard_normal(2 * SR) * 0.1).astype(np.float32)) is None


SPEECH_DIRS = [
    Path("/usr/share/pocketsphinx/test/data/cards"),
    Path("/usr/share/asterisk/sounds/en/letters"),
    Path("/usr/share/asterisk/sounds/en/digits"),
]


def test_voice_gate_passes_real_recorded_speech() -> None:
    """Every recording of a spoken letter, digit and card name passes the gate (Debian's
    pocketsphinx-testdata and asterisk-core-sounds-en-wav: ./scripts/install.sh)."""
    files = [f for d in SPEECH_DIRS if d.is_dir() for f in sorted(d.glob("*.wav"))]
    if not files:
        pytest.skip("pocketsphinx-testdata / asterisk-core-sounds-en-wav are not installed")
    stopped = {f.name: voice_gate(decode_audio(f)[0]) for f in files}
    assert {k: v for k, v in stopped.items() if v} == {}
    assert len(files) > 50


def test_steady_tone_needs_a_steady_pitch() -> None:
    sweep_t = np.arange(SR) / SR
    sweep = 0.5 * np.sin(2 * np.pi * (200 + 300 * sweep_t) * sweep_t)  # a glide, like a voice
    assert not is_steady_tone(sweep.astype(np.float32))
    assert is_steady_tone(tone(1.0, freq=1000.0))
    assert voiced_seconds(tone(1.0)) == pytest.approx(1.0)
