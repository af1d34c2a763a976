"""The HTTP API for an app's backend: photos, trainings, predictions and forgetting as
resources, webhooks on completion, API keys (``avatarforge api``).

- :mod:`.app`       the FastAPI app: routes, one error shape, auth and limits, the web page
- :mod:`.service`   what the routes do, over a deployment (the cloud client, forget, packs)
- :mod:`.tenancy`   a key's namespace: the deployment's user and training ids of a client's
- :mod:`.auth`      API keys by their sha256, a rate limit per key
- :mod:`.webhooks`  signed webhooks, where they may go, retried from an outbox in S3
- :mod:`.config`    :class:`ApiConfig`, new keys and their hashes

It serves any deployment the cloud client reaches (``generate --endpoint``'s options), and by
default the local stack of ``make demo-cloud``.
"""

from .app import create_app
from .config import ApiConfig, ApiKey, hash_key, new_key
from .service import ApiError, ApiService
from .webhooks import sign, verify

__all__ = [
    "ApiConfig",
    "ApiError",
    "ApiKey",
    "ApiService",
    "create_app",
    "hash_key",
    "new_key",
    "sign",
    "verify",
]
