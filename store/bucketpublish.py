"""``jbl registry add TARBALL… --registry s3://BUCKET/PREFIX``: a registry in an S3-compatible
bucket (AWS, MinIO, Ceph RGW), written as store/pack.py's ``registry_add`` writes a directory.

The bucket ends up holding what a registry directory holds, under PREFIX: each tarball, the
content-addressed form (store/caspublish.py: objects, then packs, then the tree) and
``registry.json``, uploaded last, so no cache ever stores a "not found" for a file about to
exist. Uploads go through ``transport.S3Target`` (boto3, the ``jbl[s3]`` extra; credentials
from boto3's usual environment variables and files; ``s3_endpoint`` when set). The existing
registry.json is read back (signed) and checked as an installer reads it; trees published
before are read as nodes read them, over the bucket's unsigned URL (a tree that cannot be
read is only not reused). A tarball name that another version's entry already names with a
different checksum is refused, as in a directory.

Not for concurrent use on one bucket prefix; one publisher at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .caspublish import Publisher
from .errors import RegistryError, UsageError
from .ingest import inspect
from .pack import REGISTRY_FILE, checked_platforms, finish_doc
from .regformat import MAX_INDEX_BYTES, dump_registry, entry_doc, parse_registry
from .transport import Fetcher, S3Target, TransportSettings, source_for


def registry_add_bucket(location: str, tarballs: list[Path], *, transport: TransportSettings,
                        endpoint: str | None = None, platforms: list[str] | None = None,
                        base_url: str | None = None) -> list[dict[str, Any]]:
    """Add (or replace) each tarball's entry in the bucket's registry.json; return the
    entries (as ``registry_add``). ``endpoint``: the S3 API (config ``s3_endpoint``)."""
    plats = checked_platforms(platforms)
    target = S3Target(location, endpoint)
    # how nodes will read it: the checks resolve download_url against this URL
    index_url = source_for(location, s3_endpoint=transport.s3_endpoint).base + \
        "/" + REGISTRY_FILE
    doc = _load(target, index_url)
    with Fetcher([location], transport) as published, Publisher(target, published) as pub:
        pub.learn(doc)
        added = []
        for tb in map(Path, tarballs):
            if not tb.is_file():
                raise UsageError(f"no such tarball: {tb}")
            info = inspect(tb)
            name, ver = info.manifest.name, info.manifest.version
            url = f"{base_url.rstrip('/')}/{quote(tb.name)}" if base_url else quote(tb.name)
            _refuse_clash(doc, url, (name, ver), info.checksum, tb)
            before = dict(pub.written)
            tree = pub.publish(tb)
            target.put_file(tb.name, tb, immutable=False)
            entry = entry_doc(ver, info.manifest.description, url, info.checksum, info.size,
                              plats, tree)
            doc["runtimes"].setdefault(name, {})[ver] = entry
            added.append({"name": name, **entry,
                          "published": {k: v - before[k] for k, v in pub.written.items()}})
    finish_doc(doc)
    target.put(REGISTRY_FILE, dump_registry(doc, index_url), immutable=False)
    return added


def _load(target: S3Target, index_url: str) -> dict[str, Any]:
    """The bucket's registry.json, checked as an installer reads it; an empty one if none."""
    data = target.get(REGISTRY_FILE, MAX_INDEX_BYTES)
    if data is None:
        if target.exists(REGISTRY_FILE):
            raise RegistryError(f"registry {target.label}/{REGISTRY_FILE} is larger than "
                                f"{MAX_INDEX_BYTES >> 20} MiB")
        return {"version": "1", "updated_at": "", "runtimes": {}}
    parse_registry(data, index_url)
    doc: dict[str, Any] = json.loads(data)
    return doc


def _refuse_clash(doc: dict[str, Any], url: str, me: tuple[str, str], checksum: str,
                  tb: Path) -> None:
    for name, vers in doc["runtimes"].items():
        for ver, e in vers.items():
            if (name, ver) != me and isinstance(e, dict) and e.get("download_url") == url \
                    and e.get("checksum") != checksum:
                raise UsageError(f"{url} in the bucket is {name}@{ver}'s download; rename "
                                 f"{tb.name} before adding it")
