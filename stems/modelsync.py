"""Sync a model store kept under an S3 prefix into the local model directory.

Only files the remote manifest names are fetched, and only when missing or of a different
size; the model store then checks every sha256 on load, as for a local directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from .settings import Settings


def sync_models(settings: Settings) -> list[str]:
    """Download the store at `settings.model_s3_uri` into `settings.model_dir`; returns fetched names."""
    import boto3

    if not settings.model_s3_uri:
        return []
    parts = urlsplit(settings.model_s3_uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    prefix = prefix + "/" if prefix else ""
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=settings.s3_secret_access_key,
    )
    root = Path(settings.model_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    fetched = []
    for entry in manifest["models"].values():
        for name in entry["files"]:
            head = client.head_object(Bucket=bucket, Key=prefix + name)
            local = root / name
            if local.exists() and local.stat().st_size == head["ContentLength"]:
                continue
            tmp = local.with_suffix(local.suffix + ".part")
            client.download_file(bucket, prefix + name, str(tmp))
            os.replace(tmp, local)
            fetched.append(name)
    tmp = root / "manifest.json.part"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / "manifest.json")
    return fetched
