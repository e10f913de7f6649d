"""Before a command reads or writes a store on S3: one quick request with short timeouts, so a wrong endpoint, missing
credentials or a missing bucket is one line naming the URL and what failed, not a hang, a traceback, or a
misleading "no cache"."""
from __future__ import annotations

from .errors import InputError
from .storage_options import url_protocol

PROBE_CONFIG = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 2, "mode": "standard"}}

CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or --storage-option key=... "
                   "--storage-option secret=...; --storage-option anon=true for a public bucket")


def check_reachable(url: str, storage_options: dict | None = None) -> None:
    """Lists at most one key under an s3:// store's prefix (does nothing for other stores), with fsspec's configuration
    plus `storage_options`. Raises InputError naming `url`, the endpoint and the failure: the endpoint unreachable or
    timing out, no or wrong credentials, access denied, no such bucket."""
    if url_protocol(url) not in ("s3", "s3a"):
        return
    from .writer import store_fs

    fs, path = store_fs(url, storage_options)
    options = {**fs.storage_options, "skip_instance_cache": True}
    options["config_kwargs"] = {**options.get("config_kwargs", {}), **PROBE_CONFIG}
    probe = type(fs)(**options)
    bucket, key, _ = probe.split_path(path)
    endpoint = (options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
                or "AWS's default endpoint")
    try:
        probe.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except Exception as error:  # noqa: BLE001  (every failure becomes the one line below)
        raise InputError(f"cannot open {url} (endpoint {endpoint}): {_what_failed(error, bucket)}") from None


def _what_failed(error: BaseException, bucket: str) -> str:
    chain, cause = [], error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = {type(e).__name__ for e in chain}
    codes = {(getattr(e, "response", None) or {}).get("Error", {}).get("Code") for e in chain}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return f"no credentials found; {CREDENTIALS_FIX}"
    if codes & {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}:
        return f"the credentials were refused ({', '.join(sorted(filter(None, codes)))}); {CREDENTIALS_FIX}"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerTimeoutError", "TimeoutError"}:
        return ("the endpoint did not answer (connection failed or timed out); check --storage-option "
                "endpoint_url=... and the network")
    if codes & {"NoSuchBucket"} or isinstance(error, FileNotFoundError):
        return f"there is no bucket {bucket!r} there (or the endpoint is no S3 server); create it or fix the URL"
    if codes & {"AccessDenied", "AllAccessDisabled"} or isinstance(error, PermissionError):
        return f"access denied to bucket {bucket!r}; use credentials that may list and write it"
    return f"{type(error).__name__}: {error}; check the URL, --storage-option endpoint_url=... and the credentials"
