"""workers.audio: path safety, decoding checks, resampling and chunking.

Pure tests (no model, no torch): every bad-file case must become an InputError
with a message that says what is wrong, never a crash or a silent half-result.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from workers.adapters.base import InputError
from workers.audio import chunk_audio, decode_audio, resolve_audio_path

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


def test_chunk_rejects_multichannel() -> None:
    with pytest.raises(ValueError):
        chunk_audio(np.zeros((10, 2), dtype=np.float32))
