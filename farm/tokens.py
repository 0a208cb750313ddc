"""API tokens: who a request is. Only a token's SHA-256 is stored (`keys.TOKENS`), so a copy
of Redis gives nobody a way in; the token itself is shown once, when it is made."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

import redis

from farm import keys
from farm.errors import PermanentError

#: Tokens start with this, so a leaked one is recognisable in logs and secret scanners.
TOKEN_PREFIX = "farm_"


class TokenNotFound(PermanentError):
    """No such token (never made, or revoked)."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a user, and whether they may see and control everyone's jobs."""

    user: str
    admin: bool = False

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def create(self, user: str, *, admin: bool = False) -> str:
        """A new token for `user`, returned once."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = {"user": user, "admin": admin, "created": time.time()}
        self.redis.hset(keys.TOKENS, _digest(token), json.dumps(row))
        return token

    def caller(self, token: str) -> Caller | None:
        """The caller a token stands for; None for a wrong or revoked one."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        # Looked up by digest: how long the lookup takes tells nothing about stored tokens.
        raw = self.redis.hget(keys.TOKENS, _digest(token))
        if raw is None:
            return None
        row = json.loads(raw)
        return Caller(row["user"], bool(row.get("admin")))

    def revoke(self, token: str) -> None:
        if not self.redis.hdel(keys.TOKENS, _digest(token)):
            raise TokenNotFound("no such token (never made, or revoked already)")
