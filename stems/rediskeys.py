"""Every Redis key name the project writes, in one place (as arq's `constants.py` does).

A key is `{STEMS_KEY_PREFIX}:{name}[:{part}...]`, joined by `JobStore._k(name, *parts)`; nothing else
spells a name. Read this module to see what one deployment keeps in Redis and to pick a new name that
collides with none. The comment says the type and what the parts are.
"""

from __future__ import annotations

# -- records: one JSON string each, by id
JOB = "job"  # a split: job:{job_id}
STEM = "stem"  # a stem (and a mastering's output): stem:{stem_id}
AUDIO = "audio"  # an uploaded, linked or imported original: audio:{audio_id}
MASTERING = "mastering"  # a mastering: mastering:{mastering_id}
GONE = "gone"  # a deleted record's tombstone (string with a TTL): gone:{id}

# -- indexes of records
USER_JOBS = "user_jobs"  # a user's splits, by creation time (zset): user_jobs:{user_id}
ACTIVE = "active"  # a user's queued and running splits (set): active:{user_id}
ACTIVE_MASTERS = "active_masters"  # a user's queued and running masterings (set): active_masters:{user_id}
ASSET_JOBS = "asset_jobs"  # the splits of an original (set): asset_jobs:{audio_id}
ASSET_MASTERS = "asset_masters"  # the masterings of an original (set): asset_masters:{audio_id}
PENDING_BYTES = "pending_bytes"  # a user's queued splits' output estimates (hash job_id -> bytes)
USAGE = "usage"  # a user's minutes and counts (hash): usage:{user_id}

# -- keys and their grants
APIKEY = "apikey"  # an API key's user and webhook secret (hash), by the key's sha256: apikey:{digest}
KEYIDS = "keyids"  # public key id -> digest (hash)
DOWNLOAD_TOKEN = "download_token"  # a download link's grant (string with a TTL), by the token's sha256
RATE = "rate"  # a key's requests in one minute (counter with a TTL): rate:{user_id}:{minute}
IDEM = "idem"  # an Idempotency-Key's claim and answer: idem:{scope...}

# -- the job lifecycle (stems/runstore.py, workers/)
LEASES = "leases"  # running attempts by lease expiry (zset job_id -> ms)
DEADLINES = "deadlines"  # running jobs by hard time limit (zset job_id -> ms)
OUTBOX = "outbox"  # messages owed to the broker, by due time (zset "{kind}:{id}" -> ms)
TRIES = "tries"  # deliveries of one task (counter): tries:{kind}:{id}
CANCEL = "cancel"  # a cancel a running attempt polls between chunks (string with a TTL): cancel:{job_id}
CLEANUP = "cleanup"  # prefixes a dead attempt may have left, by due time (zset)
LAST_SWEEP = "last_sweep"  # the same, swept once every attempt is past its hard time limit (zset)
CLEANUP_OBJECTS = "cleanup_objects"  # single objects owed deletion, by due time (zset)
LOCK = "lock"  # a named lock with a token and a TTL: lock:{name}
WEBHOOK = "webhook"  # a completed job's webhook owed delivery: webhook:{job_id}
RETAIN = "retain"  # what the retention sweep will expire, by creation time (zset): retain:{phase}

# -- workers, queues and estimates
WORKERS = "workers"  # each worker's last report: queues, models, time (hash hostname -> JSON)
SERVED = "served"  # the models each queue served last (hash queue -> JSON)
LOAD = "load"  # the jobs queued on a queue, oldest first (list): load:{queue}
SPEED = "speed"  # measured seconds of work per second of audio: speed:{queue}[:{preset}:{chain}]
CELERY = "celery"  # Celery's own keys on a Redis broker: celery:{queue} (its global_keyprefix)
