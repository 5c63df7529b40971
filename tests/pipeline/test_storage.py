"""StorageConfig: one resolution of object-store settings for Lance, fsspec and pyarrow/Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage import LANCE_RETRY_DEFAULTS, StorageConfig, parse_storage_options

FULL_ENV = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    "AWS_SESSION_TOKEN": "tok3n",
    "AWS_DEFAULT_REGION": "eu-west-1",
    "AWS_ALLOW_HTTP": "true",
    "UNRELATED": "x",
}


def test_from_env_maps_standard_variables_to_lance_names():
    cfg = StorageConfig.from_env(env=FULL_ENV)
    assert cfg.lance_options() == {
        **LANCE_RETRY_DEFAULTS,
        "endpoint": "http://127.0.0.1:9",
        "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": "s3cr3t",
        "session_token": "tok3n",
        "region": "eu-west-1",
        "allow_http": "true",
    }


def test_from_env_precedence_and_empty_environment():
    env = {
        "AWS_REGION": "us-east-2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://generic",
        "AWS_ENDPOINT_URL_S3": "http://s3-specific",
    }
    opts = StorageConfig.from_env(env=env).lance_options()
    assert opts == {**LANCE_RETRY_DEFAULTS, "region": "us-east-2", "endpoint": "http://s3-specific"}
    assert StorageConfig.from_env(env={}).lance_options() == LANCE_RETRY_DEFAULTS
    assert StorageConfig.from_env({"client_max_retries": "2"}, env={}).lance_options() == {"client_max_retries": "2"}


def test_overrides_win_normalize_aws_prefix_and_pass_unknown_keys_through():
    overrides = {
        "aws_region": "ap-south-1",
        "endpoint": "http://127.0.0.1:1234",
        "dynamodb_endpoint": "http://d",
    }
    cfg = StorageConfig.from_env(overrides, env=FULL_ENV)
    opts = cfg.lance_options()
    assert opts["region"] == "ap-south-1"
    assert opts["endpoint"] == "http://127.0.0.1:1234"
    assert opts["dynamodb_endpoint"] == "http://d"
    assert "aws_region" not in opts
    opts["region"] = "changed"  # a copy: the frozen config is unaffected
    assert cfg.lance_options()["region"] == "ap-south-1"


def test_parse_storage_options():
    assert parse_storage_options(["endpoint=http://h:1/?a=b", "allow_http=true", "region="]) == {
        "endpoint": "http://h:1/?a=b",
        "allow_http": "true",
        "region": "",
    }
    assert parse_storage_options(["region=a", "region=b"]) == {"region": "b"}
    for bad in ["novalue", "=value", ""]:
        with pytest.raises(ValueError, match="key=value"):
            parse_storage_options([bad])


def test_redacted_and_repr_hide_credentials():
    cfg = StorageConfig.from_env({"azure_storage_account_key": "k"}, env=FULL_ENV)
    red = cfg.redacted()
    assert red["secret_access_key"] == red["session_token"] == red["access_key_id"] == "***"
    assert red["azure_storage_account_key"] == "***"
    assert red["endpoint"] == "http://127.0.0.1:9" and red["region"] == "eu-west-1"
    for secret in ("s3cr3t", "tok3n", "AKIDEXAMPLE"):
        assert secret not in repr(cfg) and secret not in str(red)


def test_credentials_are_redacted_from_botocores_request_logs(caplog):
    """botocore logs request headers (the session token) at DEBUG; a config's credentials never show there."""
    import logging

    StorageConfig.from_env({"session_token": "tok-5f1c", "secret_access_key": "sec-77ab", "region": "eu-west-1"}, env={})
    caplog.set_level(logging.DEBUG)
    logging.getLogger("botocore.auth").debug("CanonicalRequest:\nx-amz-security-token:%s\nregion %s", "tok-5f1c", "eu-west-1")
    logging.getLogger("botocore.endpoint").debug("headers: %r", {"X-Amz-Security-Token": b"tok-5f1c", "k": "sec-77ab"})
    assert [r.getMessage() for r in caplog.records] == [
        "CanonicalRequest:\nx-amz-security-token:***\nregion eu-west-1",
        "headers: {'X-Amz-Security-Token': b'***', 'k': '***'}",
    ]


def test_local_paths_use_default_filesystems(tmp_path):
    cfg = StorageConfig.from_env(env={})
    assert cfg.pyarrow_filesystem(str(tmp_path)) is None
    assert cfg.pyarrow_filesystem(f"file://{tmp_path}") is None
    fs = cfg.fsspec_filesystem(str(tmp_path))
    (tmp_path / "a.txt").write_text("hi")
    assert fs.cat_file(str(tmp_path / "a.txt")) == b"hi"


def test_s3_filesystems_from_env_reach_moto(s3_env):
    cfg = StorageConfig.from_env()  # reads the AWS_* variables s3_env set
    assert cfg.lance_options() == {**LANCE_RETRY_DEFAULTS, **s3_env.storage_options}
    url = s3_env.url("storage-test", "t.parquet")

    fs = cfg.fsspec_filesystem(url)
    fs.pipe(s3_env.url("storage-test", "hello.txt"), b"hello")
    assert fs.cat(s3_env.url("storage-test", "hello.txt")) == b"hello"

    pafs = cfg.pyarrow_filesystem(url)
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    pq.write_table(table, url.removeprefix("s3://"), filesystem=pafs)
    assert pq.read_table(url.removeprefix("s3://"), filesystem=pafs).equals(table)


def test_read_stage_reads_shards_from_s3(s3_env, ray_local):
    from pipeline.config import SourceConfig
    from pipeline.read import list_files, read_source

    cfg = StorageConfig.from_env()
    url = s3_env.url("storage-ray", "part-0.parquet")
    table = pa.table({"id": [str(i) for i in range(50)], "text": [f"t{i}" for i in range(50)]})
    pq.write_table(table, url.removeprefix("s3://"), filesystem=cfg.pyarrow_filesystem(url), row_group_size=20)
    source = SourceConfig(input=s3_env.url("storage-ray"))
    ds = read_source(source, cfg, list_files(source, cfg), num_cpus=0.25)
    assert sorted(int(r["id"]) for r in ds.take_all()) == list(range(50))
