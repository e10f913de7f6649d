"""Options for the filesystem behind a store URL (an endpoint, a profile, credentials): fsspec's storage_options,
given on the command line as `--storage-option KEY=VALUE`.

They are set as fsspec's configuration for the URL's protocol while one command runs, so every filesystem of that
protocol the command opens (zarr's included) gets them, and in the FSSPEC_<PROTOCOL> environment variable, which
worker processes the command starts read; workers started elsewhere (`--scheduler`) get them with each task
(`options_for`). They are never written into a store's key, a report or a log line.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

from .errors import InputError

LOCAL_PROTOCOLS = ("file", "local")


def parse_storage_options(pairs) -> dict:
    """('endpoint_url=http://host:9000', 'anon=true') -> {'endpoint_url': 'http://host:9000', 'anon': True}: a value
    that reads as JSON (true, 5, {"a": 1}) is taken as such, any other as a string. InputError for a pair without '='."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--storage-option {pair!r}: give KEY=VALUE, e.g. --storage-option endpoint_url=http://host:9000")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def url_protocol(url) -> str | None:
    """'s3' for s3://bucket/f.zarr; None for a local path or a file:// URL."""
    url = str(url)
    if "://" not in url:
        return None
    protocol = url.split("://", 1)[0].split("::")[-1].lower()
    return None if protocol in LOCAL_PROTOCOLS else protocol


def options_for(url) -> dict:
    """The filesystem options this process uses for `url` (from --storage-option, or fsspec's own configuration);
    {} for a local path."""
    import fsspec.config

    protocol = url_protocol(url)
    return dict(fsspec.config.conf.get(protocol, {})) if protocol else {}


@contextmanager
def storage_options(urls, options: dict):
    """While the block runs, filesystems for the protocols of the remote URLs among `urls` get `options`. InputError
    when options are given and every URL is local (they would be ignored)."""
    protocols = sorted({p for p in map(url_protocol, filter(None, urls)) if p})
    if not options:
        yield
        return
    if not protocols:
        local = [str(url) for url in urls if url]
        raise InputError(f"--storage-option is for a store at a URL (s3://bucket/features.zarr); {', '.join(local)} "
                         f"{'is' if len(local) == 1 else 'are'} local: leave the option out")
    import fsspec.config

    saved = {p: (fsspec.config.conf.get(p), os.environ.get(f"FSSPEC_{p.upper()}")) for p in protocols}
    try:
        for protocol in protocols:
            merged = {**fsspec.config.conf.get(protocol, {}), **options}
            fsspec.config.conf[protocol] = merged
            os.environ[f"FSSPEC_{protocol.upper()}"] = json.dumps(merged)
        yield
    finally:
        for protocol, (conf, env) in saved.items():
            _restore(fsspec.config.conf, protocol, conf)
            _restore(os.environ, f"FSSPEC_{protocol.upper()}", env)


def _restore(mapping, key, value) -> None:
    if value is None:
        mapping.pop(key, None)
    else:
        mapping[key] = value
