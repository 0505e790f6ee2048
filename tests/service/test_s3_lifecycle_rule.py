"""The bucket's lifecycle rule (infra/s3-lifecycle.json) agrees with retention: it never removes an object the
service keeps, whatever the retention settings, and S3 (moto's server) accepts it as written.

Retention decides when a stored object goes, from clocks a bucket cannot see (an original's import, a
split's end, a queued split that still needs its source, 0 for "keep"); so no rule may expire a current
object under any key the service writes or registers. What a rule may remove is what retention never
keeps: multipart uploads that were never completed, versions that a deletion made noncurrent, and the
delete markers left once those are gone.
"""

from __future__ import annotations

import json
import uuid

import boto3
import pytest

from stems.settings import Settings
from stems.storage import keys
from tests.support import ROOT

RULES = ROOT / "infra" / "s3-lifecycle.json"


def _expires_current_objects(rule: dict) -> bool:
    """Whether the rule can delete the current version of an object (Days or Date; a delete marker is no object)."""
    expiration = rule.get("Expiration", {})
    return rule.get("Status") == "Enabled" and ("Days" in expiration or "Date" in expiration)


def _matches(rule: dict, key: str, tags: dict[str, str]) -> bool:
    f = rule.get("Filter", {"Prefix": rule.get("Prefix", "")})
    clauses = f.get("And", f)
    wanted = clauses.get("Tags", []) + ([clauses["Tag"]] if "Tag" in clauses else [])
    return key.startswith(clauses.get("Prefix", "")) and all(tags.get(t["Key"]) == t["Value"] for t in wanted)


def _kept_keys(settings: Settings) -> list[str]:
    """A key of every kind the service stores or registers, under the deployment's S3 prefix."""
    u, a, j, t, s = "alice", str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4().hex[:8], str(uuid.uuid4())
    made = [
        keys.original(u, a),
        keys.audio_peaks(u, a),
        keys.stem(u, j, t, s, "wav"),
        keys.stem(u, j, t, s, "m4a"),
        keys.stem(u, j, t, s, "peaks.json"),
        keys.separated(u, j, t, "vocals"),
        f"{settings.ingest_prefix}{u}/2026/11/track.flac",
        "partner-drop/granted.flac",
    ]
    return [settings.s3_prefix.rstrip("/") + "/" + k if settings.s3_prefix else k for k in made]


@pytest.mark.parametrize(
    "retention",
    [
        {},  # the defaults: 7 days for originals and stems, 30 for records
        {"retain_originals_s": 0, "retain_stems_s": 0, "retain_records_s": 0},  # keep everything
        {"retain_originals_s": 90 * 86400, "retain_stems_s": 365 * 86400},  # longer than any fixed number of days
        {"retain_originals_s": 60, "retain_stems_s": 60, "s3_prefix": "svc/", "ingest_prefix": "drop/"},
    ],
    ids=["defaults", "keep-all", "long", "short-with-prefix"],
)
def test_the_rule_never_expires_what_retention_keeps(retention):
    settings = Settings(**retention)
    rules = json.loads(RULES.read_text())["Rules"]
    for key in _kept_keys(settings):  # the service tags no object: a rule filtered on a tag matches none of them
        expiring = [r["ID"] for r in rules if _expires_current_objects(r) and _matches(r, key, {})]
        assert not expiring, f"{key} (kept by retention {retention}) is expired by {expiring}"


def test_s3_accepts_the_rule_and_it_cleans_what_retention_never_keeps(s3_url):
    s3 = boto3.client(
        "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    bucket = f"lc{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=json.loads(RULES.read_text()))
    stored = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert set(stored) == {"stems-abort-incomplete-uploads", "stems-deleted-versions"}
    assert not any(_expires_current_objects(r) for r in stored.values())  # as S3 keeps it, too
    # the backstop covers the whole bucket: abandoned multipart uploads and noncurrent versions anywhere
    assert stored["stems-abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    assert stored["stems-deleted-versions"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 1
    assert all(_matches(r, key, {}) for r in stored.values() for key in _kept_keys(Settings(s3_prefix="svc/")))
