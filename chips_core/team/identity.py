"""Who is acting: a signed-in user (claims of an OpenID Connect ID token) or the local user.

With no identity provider configured, CHIPS Studio is single-user: the person at the keyboard, who owns
the workspace files, acts as its lead. Background jobs started for a signed-in user carry that user in the
environment (`CHIPS_ACTOR`), so what the job records names them too.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

ENV_ACTOR = "CHIPS_ACTOR"


@dataclass(frozen=True)
class Actor:
    """One user: `subject` is the ID token's `sub` ('local:<login>' for the local user)."""

    subject: str
    email: str | None = None
    name: str | None = None
    signed_in: bool = False

    @property
    def display(self) -> str:
        """How people see this user: name, else e-mail, else subject."""
        return self.name or self.email or self.subject

    @property
    def keys(self) -> tuple[str, ...]:
        """The member keys a role may be granted under: subject, then e-mail."""
        return tuple(k for k in (self.subject, self.email) if k)

    def to_env(self) -> dict[str, str]:
        """The environment a background job needs to act as this user."""
        return {ENV_ACTOR: json.dumps(asdict(self))}


def local_actor() -> Actor:
    """The local user (env CHIPS_AUTHOR, else the login name); not signed in."""
    name = os.environ.get("CHIPS_AUTHOR")
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = "unknown"
    return Actor(subject=f"local:{name}", name=name)


def actor_from_claims(claims: Mapping[str, Any]) -> Actor:
    """A signed-in user from ID token claims (`sub` required; `email` lower-cased; `name` optional).

    An e-mail the provider marks unverified (`email_verified` false) is dropped: roles granted to an e-mail
    must not go to someone who typed that address into their own profile."""
    subject = claims.get("sub")
    if not subject:
        raise ValueError("the ID token has no 'sub' claim")
    email = claims.get("email") if claims.get("email_verified", True) not in (False, "false") else None
    name = claims.get("name") or claims.get("preferred_username")
    return Actor(
        subject=str(subject),
        email=str(email).strip().lower() if email else None,
        name=str(name) if name else None,
        signed_in=True,
    )


def current_actor(actor: Actor | None = None) -> Actor:
    """`actor` when given, else the user a background job was started for, else the local user."""
    if actor is not None:
        return actor
    env = os.environ.get(ENV_ACTOR)
    if env:
        return Actor(**json.loads(env))
    return local_actor()
