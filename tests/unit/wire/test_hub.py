"""wire.hub: ladder tiers named by Hugging Face id, resolved from a cache built
locally in the hub's layout (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from config.taskconfig import TierSpec
from tests.hubcache import add_to_hub_cache
from wire.hub import ModelNotCached, folder_revision, hub_id, resolve_tier

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _model(folder: Path, weights: bytes) -> Path:
    """A model folder: config.json, a tokenizer file and a real safetensors file
    holding `weights` as one uint8 tensor."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    save_file({"w": np.frombuffer(weights, dtype=np.uint8).copy()}, folder / "model.safetensors")
    return folder


def _weights(folder: Path) -> bytes:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")["w"].tobytes()


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def test_hub_id_resolves_in_the_cache_with_its_commit(tmp_path, hf_home):
    src = _model(tmp_path / "src", b"weights-1")
    snap = add_to_hub_cache(hf_home, "acme/tiny-intent", src, commit=COMMIT_A)
    got = resolve_tier(TierSpec(name="t", path="acme/tiny-intent"), tmp_path / "models")
    assert got.path == snap and got.revision == COMMIT_A and got.hub_id == "acme/tiny-intent"
    assert _weights(got.path) == b"weights-1"


def test_pinned_revision_and_a_newer_main(tmp_path, hf_home):
    add_to_hub_cache(hf_home, "acme/m", _model(tmp_path / "a", b"1"), commit=COMMIT_A)
    add_to_hub_cache(hf_home, "acme/m", _model(tmp_path / "b", b"2"), commit=COMMIT_B)
    models = tmp_path / "models"
    assert resolve_tier(TierSpec(name="t", path="acme/m"), models).revision == COMMIT_B
    pinned = TierSpec(name="t", path="acme/m", options={"revision": COMMIT_A})
    assert resolve_tier(pinned, models).revision == COMMIT_A


def test_a_model_not_in_the_cache_names_fleet_models_pull(tmp_path, hf_home):
    with pytest.raises(ModelNotCached, match=r"acme/absent .*`fleet models pull`"):
        resolve_tier(TierSpec(name="t", path="acme/absent"), tmp_path / "models")
    add_to_hub_cache(hf_home, "acme/m", _model(tmp_path / "a", b"1"), commit=COMMIT_A)
    with pytest.raises(ModelNotCached, match="at revision v2"):
        resolve_tier(TierSpec(name="t", path="acme/m", options={"revision": "v2"}), tmp_path)


def test_a_folder_wins_over_a_hub_id_and_has_a_content_revision(tmp_path, hf_home):
    models = tmp_path / "models"
    local = _model(models / "acme" / "m", b"local")
    tier = TierSpec(name="t", path="acme/m")
    assert hub_id(tier, models) is None
    got = resolve_tier(tier, models)
    assert got.path == local and got.revision.startswith("sha256:") and len(got.revision) == 71
    # The same files elsewhere: the same revision; other weights: another one.
    copy = shutil.copytree(local, tmp_path / "copy")
    assert folder_revision(copy) == got.revision
    other = _model(tmp_path / "other", b"changed")
    assert folder_revision(other) != got.revision
    assert hub_id(TierSpec(name="t", path="/abs/x"), models) is None
    assert hub_id(TierSpec(name="t", path="plain-folder"), models) is None


def test_missing_local_folder_names_both_commands(tmp_path):
    with pytest.raises(ModelNotCached, match="fleet models prepare.*fleet models pull"):
        resolve_tier(TierSpec(name="t", path="no-such-model"), tmp_path)


def test_a_worker_can_defer_hashing_a_local_folder(tmp_path):
    models = tmp_path / "models"
    _model(models / "m", b"w")
    assert resolve_tier(TierSpec(name="t", path="m"), models, hash_folder=False).revision is None


def _no_weights(snapshot: Path) -> None:
    (snapshot / "model.safetensors").unlink()


def _truncated(snapshot: Path) -> None:
    blob = (snapshot / "model.safetensors").resolve()
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) - 100])


def _dangling(snapshot: Path) -> None:
    (snapshot / "model.safetensors").resolve().unlink()  # the blob goes, the link stays


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_no_weights, r"has configuration but no weights"),
        (_truncated, r"model\.safetensors \(\d+ bytes\) is truncated or damaged"),
        (_dangling, r"model\.safetensors links to \.\./\.\./blobs/[0-9a-f]+, which is missing"),
    ],
)
def test_an_incomplete_snapshot_names_itself_and_fleet_models_pull(tmp_path, hf_home, damage, says):
    src = _model(tmp_path / "src", bytes(range(200)))
    snapshot = add_to_hub_cache(hf_home, "acme/m", src, commit=COMMIT_A)
    damage(snapshot)
    with pytest.raises(ModelNotCached, match=says) as err:
        resolve_tier(TierSpec(name="t", path="acme/m"), tmp_path / "models")
    assert str(snapshot) in str(err.value) and "`fleet models pull`" in str(err.value)


def test_a_local_folder_with_truncated_weights_says_so(tmp_path):
    models = tmp_path / "models"
    folder = _model(models / "m", bytes(range(200)))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:50])
    with pytest.raises(ModelNotCached, match=r"m/model\.safetensors .* truncated or damaged"):
        resolve_tier(TierSpec(name="t", path="m"), models)
