"""``prefetch_on_open``: the setting's validation and matching, how a client decides which mount's
setting applies, and how the cluster view carries it (the loads themselves:
tests/integration/test_prefetch_on_open.py)."""

from __future__ import annotations

import pytest

from depot.client.prefetch import OpenPrefetcher, _merged
from depot.client.routing import WorkerRouter
from depot.core.config import DepotConfig, MountConfig, glob_matches, load_config
from depot.core.errors import ConfigError
from depot.core.types import FileStatus
from depot.placement.ring import PlacementPolicy
from depot.placement.view import ClusterView


def config_with(patterns: object, path: str = "/models") -> DepotConfig:
    return load_config(
        environ={},
        overrides={"mounts": [{"path": path, "ufs": "file:///srv/m", "prefetch_on_open": patterns}]},
    )


def test_default_is_off() -> None:
    mount = MountConfig(path="/", ufs="file:///srv")
    assert mount.prefetch_on_open == []
    assert not mount.prefetches("/model.safetensors")


def test_patterns_match_the_name_or_the_whole_path() -> None:
    mount = config_with(["*.safetensors", "*.gguf", "/models/llama-*/*.bin"]).mounts[0]
    assert mount.prefetches("/models/x/model-00001-of-00004.safetensors")
    assert mount.prefetches("/models/q.gguf")
    assert mount.prefetches("/models/llama-3/pytorch_model.bin")
    assert not mount.prefetches("/models/mistral/pytorch_model.bin")
    assert not mount.prefetches("/models/model.safetensors.index.json")
    assert not mount.prefetches("/models/MODEL.SAFETENSORS")  # case-sensitive, as POSIX names
    # a name pattern never sees the directories: '*' there cannot reach a parent's name
    assert not glob_matches(["models*"], "/models/a.bin")
    assert glob_matches(["/models/*"], "/models/sub/a.bin")  # in a path pattern '*' crosses '/'


def test_comma_separated_string_and_duplicates() -> None:
    mount = config_with("*.safetensors, *.gguf,*.safetensors").mounts[0]
    assert mount.prefetch_on_open == ["*.safetensors", "*.gguf"]


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ([""], "empty pattern"),
        (["  "], "empty pattern"),
        (["models/*.bin"], "must start with '/'"),
        (["/models/"], "patterns name files"),
        (["*.[st"], "never closed"),
        (["a\nb"], "control character"),
        ([5], "valid string"),
        ({"a": 1}, "valid list"),
    ],
)
def test_bad_patterns_are_config_errors(patterns: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"mounts\.0\.prefetch_on_open") as info:
        config_with(patterns)
    assert message in str(info.value)


def test_good_bracket_patterns() -> None:
    mount = config_with(["model-[0-9]*.bin", "[!.]*.pt", "x[]]y"]).mounts[0]
    assert mount.prefetches("/models/model-3.bin")
    assert mount.prefetches("/models/w.pt") and not mount.prefetches("/models/.w.pt")
    assert mount.prefetches("/models/x]y")


def _view(mounts: tuple[MountConfig, ...]) -> ClusterView:
    return ClusterView(workers=(), policy=PlacementPolicy(), mounts=mounts)


def test_cluster_view_carries_the_setting_only_when_set() -> None:
    marked = MountConfig(path="/models", ufs="s3://b/models", prefetch_on_open=["*.safetensors"])
    plain = MountConfig(path="/data", ufs="s3://b/data")
    doc = _view((marked, plain)).to_document()
    assert doc["mounts"][0]["prefetch_on_open"] == ["*.safetensors"]
    assert "prefetch_on_open" not in doc["mounts"][1]  # clients before the setting still parse it
    doc["workers"] = []
    again = ClusterView.from_document(doc)
    assert again.mounts[0].prefetch_on_open == ["*.safetensors"]
    assert again.mounts[1].prefetch_on_open == []


def test_client_takes_the_cluster_setting_unless_it_sets_its_own() -> None:
    served = (
        MountConfig(path="/", ufs="s3://b/root"),
        MountConfig(path="/models", ufs="s3://b/models", prefetch_on_open=["*.safetensors"]),
    )
    own = load_config(environ={}, overrides={"mounts": [
        {"path": "/models/", "ufs": "s3://b/models", "options": {"secret_key": "x"}},
        {"path": "/local", "ufs": "file:///srv", "prefetch_on_open": ["*.gguf"]},
    ]})
    router = WorkerRouter("http://127.0.0.1:1", own, max_connections=1)
    prefetcher = OpenPrefetcher(router, own, _no_stat)
    # no view yet: the client's own mounts (its /models sets nothing)
    assert not prefetcher.wanted("/models/a.safetensors")
    assert prefetcher.wanted("/local/q.gguf")
    router._view = _view(served)
    assert prefetcher.wanted("/models/a.safetensors")  # the cluster's, credentials or not
    assert not prefetcher.wanted("/models/a.bin") and not prefetcher.wanted("/a.safetensors")
    assert prefetcher.wanted("/local/q.gguf")  # a mount of its own the cluster does not serve
    # a client that sets the mount's patterns itself (here: none) overrides the cluster
    mine = load_config(environ={}, overrides={"mounts": [
        {"path": "/models", "ufs": "s3://b/models", "prefetch_on_open": []},
    ]})
    other = OpenPrefetcher(router, mine, _no_stat)
    assert not other.wanted("/models/a.safetensors")
    router.close()


async def _no_stat(path: str) -> FileStatus:
    raise AssertionError("no stat expected")


def test_segments_of_one_owner_are_joined() -> None:
    items = [(8, 12, ()), (0, 4, ()), (4, 8, ()), (16, 20, ())]
    assert _merged(items) == [(0, 12), (16, 20)]
