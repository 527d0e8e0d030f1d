"""The mount table: validation, longest-prefix resolution, listings of mount points."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core.config import DepotConfig, MountConfig
from depot.core.errors import ConfigError, InvalidPath, NotFound
from depot.namespace.mounts import Mount, MountTable, Resolved, normalize_ufs_uri
from depot.namespace.paths import is_within, normalize_path
from depot.namespace.policy import MetadataPolicy


@pytest.fixture
def table() -> MountTable:
    return MountTable(
        [
            Mount("/", "file:///srv/data"),
            Mount("/models", "s3://bucket/models", policy=MetadataPolicy.immutable()),
            Mount("/models/llama", "gs://weights/llama", read_only=True),
            Mount("/data/x/y", "az://container/y"),
        ]
    )


# -- Mount ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/models/", "s3://bucket/models"),
        ("S3://Bucket/Models", "s3://Bucket/Models"),
        ("s3://bucket", "s3://bucket"),
        ("s3://bucket///", "s3://bucket"),
        ("s3://bucket/a//b", "s3://bucket/a//b"),
        ("file:///", "file://"),
        ("file:///srv/data/", "file:///srv/data"),
        ("memory://", "memory://"),
        ("  gs://b/p  ", "gs://b/p"),
        ("hdfs://namenode:8020/user", "hdfs://namenode:8020/user"),
    ],
)
def test_ufs_uri_normalization(uri: str, expected: str) -> None:
    assert normalize_ufs_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("bucket/models", "has no scheme"),
        ("/srv/data", "has no scheme"),
        ("", "has no scheme"),
        ("s3:/bucket", "has no scheme"),
        ("://bucket", "has no scheme"),
        ("3s://bucket", "has no scheme"),
        ("s3://bucket/a\x00b", "control character"),
        ("s3://bucket/a\nb", "control character"),
    ],
)
def test_bad_ufs_uri(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Mount("/m", uri)


def test_mount_normalizes_its_fields() -> None:
    mount = Mount("models/", "S3://bucket/models/")
    assert mount.path == "/models"
    assert mount.ufs_uri == "s3://bucket/models"
    assert mount.scheme == "s3"
    assert mount.read_only is False
    assert mount.policy == MetadataPolicy.parse("max-age=60s")


@pytest.mark.parametrize("path", ["/a/../b", "/a\x00", "/%2e%2e", "\uff0e\uff0e", "s3://x"])
def test_invalid_mount_path(path: str) -> None:
    with pytest.raises(ConfigError, match="invalid mount path"):
        Mount(path, "s3://bucket")


def test_object_uri_is_a_stable_identity() -> None:
    mount = Mount("/models", "s3://bucket/models")
    assert mount.object_uri("") == "s3://bucket/models"
    assert mount.object_uri("llama/w.bin") == "s3://bucket/models/llama/w.bin"
    root = Mount("/", "file:///")
    assert root.object_uri("etc/x") == "file:///etc/x"
    assert root.object_uri("") == "file://"


@pytest.mark.parametrize(
    ("rel", "key"),
    [("", ""), ("/", ""), ("a", "a"), ("a/b", "a/b"), ("/a/./b/", "a/b"), ("a//b", "a/b")],
)
def test_ufs_key(rel: str, key: str) -> None:
    assert Mount("/m", "s3://b/p").ufs_key(rel) == key


@pytest.mark.parametrize("rel", ["..", "a/../../b", "%2e%2e/x", "\uff0e\uff0e/x", "a\\..\\b"])
def test_ufs_key_refuses_escape(rel: str) -> None:
    with pytest.raises(InvalidPath):
        Mount("/m", "s3://b/p").ufs_key(rel)


def test_options_are_hidden_and_frozen() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG"
    mount = Mount("/m", "s3://b", options={"secret_access_key": secret, "endpoint": "http://x"})
    assert secret not in repr(mount)
    assert secret not in str(mount)
    assert "secret_access_key" not in repr(mount)
    assert mount.options["secret_access_key"] == secret
    with pytest.raises(TypeError):
        mount.options["endpoint"] = "http://evil"  # type: ignore[index]


def test_options_are_copied_from_the_caller() -> None:
    options = {"endpoint": "http://a"}
    mount = Mount("/m", "s3://b", options=options)
    options["endpoint"] = "http://b"
    assert mount.options["endpoint"] == "http://a"


def test_mounts_are_hashable_values() -> None:
    one = Mount("/m", "s3://b", options={"k": "v"})
    two = Mount("m/", "S3://b/", options={"k": "v"})
    assert one == two
    assert hash(one) == hash(two)
    assert one != Mount("/m", "s3://b", options={"k": "other"})
    assert len({one, two}) == 1


def test_str_shows_mode_and_policy() -> None:
    mount = Mount("/m", "s3://b", read_only=True, policy=MetadataPolicy.parse("max-age=5m"))
    assert str(mount) == "/m -> s3://b (ro, max-age=5m)"


# -- MountTable: construction -----------------------------------------------------------


def test_duplicate_mount_paths_are_rejected() -> None:
    with pytest.raises(ConfigError, match="'/models' is defined twice"):
        MountTable([Mount("/models", "s3://a"), Mount("models/", "s3://b")])


def test_from_config() -> None:
    configs = [
        MountConfig(path="/", ufs="file:///srv/"),
        MountConfig.model_validate(
            {
                "path": "/models",
                "ufs": "s3://bucket/models",
                "read_only": True,
                "metadata": "immutable",
                "options": {"endpoint_url": "http://minio:9000", "anonymous": True},
            }
        ),
    ]
    table = MountTable.from_config(configs)
    assert [m.path for m in table.mounts] == ["/", "/models"]
    models = table.mounts[1]
    assert models.read_only
    assert models.policy == MetadataPolicy.immutable()
    assert dict(models.options) == {"endpoint_url": "http://minio:9000", "anonymous": "true"}
    assert table.mounts[0].policy == MetadataPolicy.parse("max-age=60s")
    assert table.mounts[0].ufs_uri == "file:///srv"


def test_from_a_whole_config() -> None:
    config = DepotConfig.model_validate(
        {"mounts": [{"path": "/d", "ufs": "gs://b/d", "metadata": "max-age=5m"}]}
    )
    table = MountTable.from_config(config.mounts)
    assert table.resolve("/d/f").uri == "gs://b/d/f"
    assert table.resolve("/d").mount.policy.max_age == 300


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (MountConfig(path="/m", ufs="bucket/x"), "mount '/m': UFS URI 'bucket/x' has no scheme"),
        (MountConfig(path="/m/../x", ufs="s3://b"), "mount '/m/../x': invalid mount path"),
        (
            MountConfig(path="/m", ufs="s3://b", metadata="sometimes"),
            "mount '/m': invalid metadata",
        ),
        (MountConfig(path="/m", ufs="s3://b", metadata="max-age=-5s"), "mount '/m': invalid"),
    ],
)
def test_from_config_names_the_bad_mount(config: MountConfig, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        MountTable.from_config([MountConfig(path="/ok", ufs="s3://ok"), config])
    assert message in str(info.value)


def test_table_basics(table: MountTable) -> None:
    assert len(table) == 4
    assert [m.path for m in table.mounts] == ["/", "/data/x/y", "/models", "/models/llama"]
    assert list(table) == list(table.mounts)
    assert table.mount_at("models/") is table.mounts[2]
    assert table.mount_at("/models/x") is None
    assert "s3://bucket/models" in repr(table)


def test_empty_table_resolves_nothing() -> None:
    empty = MountTable([])
    assert len(empty) == 0
    with pytest.raises(NotFound):
        empty.resolve("/")
    assert empty.child_mounts("/") == []


# -- MountTable: resolution -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "mount", "key", "uri"),
    [
        ("/", "/", "", "file:///srv/data"),
        ("", "/", "", "file:///srv/data"),
        ("/a", "/", "a", "file:///srv/data/a"),
        ("/a/b/c", "/", "a/b/c", "file:///srv/data/a/b/c"),
        ("/models", "/models", "", "s3://bucket/models"),
        ("/models/", "/models", "", "s3://bucket/models"),
        ("/models/x", "/models", "x", "s3://bucket/models/x"),
        ("/models/x/y.bin", "/models", "x/y.bin", "s3://bucket/models/x/y.bin"),
        ("/models/llama", "/models/llama", "", "gs://weights/llama"),
        ("/models/llama/w.bin", "/models/llama", "w.bin", "gs://weights/llama/w.bin"),
        ("/models/llama2/w.bin", "/models", "llama2/w.bin", "s3://bucket/models/llama2/w.bin"),
        ("/models/llam", "/models", "llam", "s3://bucket/models/llam"),
        # Prefix boundaries are segments, not characters.
        ("/models2", "/", "models2", "file:///srv/data/models2"),
        ("/models2/x", "/", "models2/x", "file:///srv/data/models2/x"),
        ("/model", "/", "model", "file:///srv/data/model"),
        ("/models-old/x", "/", "models-old/x", "file:///srv/data/models-old/x"),
        ("/models.bak", "/", "models.bak", "file:///srv/data/models.bak"),
        # Directories above a deep mount belong to the root mount.
        ("/data", "/", "data", "file:///srv/data/data"),
        ("/data/x", "/", "data/x", "file:///srv/data/data/x"),
        ("/data/x/y", "/data/x/y", "", "az://container/y"),
        ("/data/x/y/z/w", "/data/x/y", "z/w", "az://container/y/z/w"),
        # Spellings of the same path.
        ("depot://models/x", "/models", "x", "s3://bucket/models/x"),
        ("depot:///models//./x/", "/models", "x", "s3://bucket/models/x"),
        ("models/x", "/models", "x", "s3://bucket/models/x"),
    ],
)
def test_resolve(table: MountTable, path: str, mount: str, key: str, uri: str) -> None:
    resolved = table.resolve(path)
    assert resolved.mount.path == mount
    assert resolved.key == key
    assert resolved.uri == uri
    assert resolved.path == normalize_path(path)
    assert resolved.is_mount_root is (key == "")


def test_resolved_is_a_value(table: MountTable) -> None:
    assert table.resolve("/models/x") == Resolved(table.mounts[2], "/models/x", "x")


def test_resolve_carries_mount_settings(table: MountTable) -> None:
    resolved = table.resolve("/models/llama/w.bin")
    assert resolved.mount.read_only
    assert table.resolve("/models/x").mount.policy == MetadataPolicy.immutable()


@pytest.mark.parametrize(
    "path",
    [
        "/models/../etc/passwd",
        "/models/llama/../../x",
        "/models/%2e%2e/x",
        "/models/%252e%252e/x",
        "/models/\uff0e\uff0e/x",
        "/models/a\\..\\..\\b",
        "/models/\x00",
    ],
)
def test_resolve_refuses_escapes(table: MountTable, path: str) -> None:
    with pytest.raises(InvalidPath):
        table.resolve(path)


@pytest.mark.parametrize("path", ["/", "/other", "/models2", "/mod", "/data/x"])
def test_not_found_without_a_covering_mount(path: str) -> None:
    table = MountTable([Mount("/models", "s3://b/m"), Mount("/data/x/y", "gs://b/y")])
    with pytest.raises(NotFound) as info:
        table.resolve(path)
    assert isinstance(info.value, FileNotFoundError)
    assert "no mount covers this path" in str(info.value)


# -- MountTable: mount points in listings -----------------------------------------------


@pytest.mark.parametrize(
    ("directory", "names"),
    [
        ("/", ["data", "models"]),
        ("depot://", ["data", "models"]),
        ("/models", ["llama"]),
        ("/models/", ["llama"]),
        ("/data", ["x"]),
        ("/data/x", ["y"]),
        ("/data/x/y", []),
        ("/models/llama", []),
        ("/models2", []),
        ("/nothing/here", []),
    ],
)
def test_child_mounts(table: MountTable, directory: str, names: list[str]) -> None:
    assert table.child_mounts(directory) == names


def test_child_mounts_without_a_root_mount() -> None:
    table = MountTable([Mount("/models", "s3://b/m"), Mount("/a/b/c", "s3://b/c")])
    assert table.child_mounts("/") == ["a", "models"]


def test_child_mounts_returns_a_copy(table: MountTable) -> None:
    table.child_mounts("/").append("intruder")
    assert table.child_mounts("/") == ["data", "models"]


# -- properties -------------------------------------------------------------------------

_SEGMENTS = ["models", "models2", "llama", "data", "x", "y", "a", ".", "..", "", "%2e", "\uff0e"]

mount_points = st.lists(
    st.lists(st.sampled_from(["models", "models2", "llama", "data", "x"]), max_size=3).map(
        lambda parts: "/" + "/".join(parts)
    ),
    min_size=1,
    max_size=6,
    unique_by=normalize_path,
)
probe_paths = st.one_of(
    st.lists(st.sampled_from(_SEGMENTS), max_size=6).map("/".join),
    st.text(max_size=40),
)


def _reference_resolve(mounts: list[Mount], canonical: str) -> Mount | None:
    """Brute force: the longest mount path that contains the path on segment boundaries."""
    covering = [m for m in mounts if is_within(canonical, m.path)]
    return max(covering, key=lambda m: len(m.path), default=None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mount_points, probe_paths)
def test_any_accepted_path_resolves_inside_its_mount(paths: list[str], probe: str) -> None:
    mounts = [Mount(p, f"s3://bucket{i}/prefix") for i, p in enumerate(paths)]
    table = MountTable(mounts)
    try:
        canonical = normalize_path(probe)
    except InvalidPath:
        with pytest.raises(InvalidPath):
            table.resolve(probe)
        return
    expected = _reference_resolve(mounts, canonical)
    if expected is None:
        with pytest.raises(NotFound):
            table.resolve(probe)
        return
    resolved = table.resolve(probe)
    assert resolved.mount == expected
    assert resolved.path == canonical
    assert is_within(resolved.path, resolved.mount.path)
    key_segments = resolved.key.split("/") if resolved.key else []
    assert all(seg not in ("", ".", "..") for seg in key_segments)
    assert not resolved.key.startswith("/")
    mount_prefix = resolved.mount.path.rstrip("/")
    assert resolved.path == (
        f"{mount_prefix}/{resolved.key}" if resolved.key else resolved.mount.path
    )
    assert resolved.uri.startswith(resolved.mount.ufs_uri)
    assert resolved.uri == resolved.mount.ufs_uri + (f"/{resolved.key}" if resolved.key else "")
    # Every mount point strictly below the resolved path shows up in its listing.
    for mount in mounts:
        if mount.path != resolved.path and is_within(mount.path, resolved.path):
            rest = mount.path[len(resolved.path) :].lstrip("/")
            assert rest.split("/")[0] in table.child_mounts(resolved.path)
