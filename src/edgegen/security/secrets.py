"""Secrets in settings: a secret is known by its type, and shown as stars wherever settings are shown.

Every setting that holds a secret is typed as one: `SecretStr` (a JWT secret, an API key) or
`SecretUrl` (a URL that may carry a password, e.g. `redis://:pw@host:6379/0`). The code that needs the
value asks for it (`get_secret_value()`); everything else, `repr` included, sees stars. `shown` is the
one way settings leave a process through an API: it walks the settings and replaces every secret-typed
value, so a new secret setting is redacted by being typed as one, not by being added to a list.

    shown(settings)["security"]["jwt"]["secret"]      # "**********"
    shown(settings)["jobs"]["redis_url"]              # "redis://**********@127.0.0.1:6379/0"

Keys that live in files (encryption keys, TLS private keys) are never settings: only their paths are.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

from pydantic import BaseModel, Secret, SecretBytes, SecretStr
from pydantic_core import to_jsonable_python

MASK = "**********"
SECRET_TYPES: tuple[type, ...] = (SecretStr, SecretBytes, Secret)


class SecretUrl(SecretStr):
    """A URL whose user info (a user name and a password) is a secret; its host, port and path are not.

    >>> SecretUrl("redis://app:hunter2@cache:6379/0")
    SecretUrl('redis://**********@cache:6379/0')
    """

    def _display(self) -> str:
        url = self.get_secret_value()
        try:
            parts = urlsplit(url)
        except ValueError:  # not a URL at all: nothing of it can be told apart from a secret
            return MASK
        if "@" not in parts.netloc:
            return url
        return parts._replace(netloc=f"{MASK}@{parts.netloc.rpartition('@')[2]}").geturl()


def shown(settings: BaseModel) -> dict[str, Any]:
    """`settings` as JSON-ready values, every secret as stars (a URL's user info only).

    >>> from pydantic import BaseModel
    >>> class Login(BaseModel):
    ...     user: str
    ...     password: SecretStr
    >>> shown(Login(user="ann", password="s3cret"))
    {'user': 'ann', 'password': '**********'}
    """
    # model_dump gives a dict, _redact keeps a dict a dict, and pydantic turns a dict into a dict.
    return cast(dict[str, Any], to_jsonable_python(_redact(settings.model_dump(mode="python"))))


def _redact(value: Any) -> Any:
    if isinstance(value, SecretUrl):
        return str(value)  # (its display: the user info as stars)
    if isinstance(value, SECRET_TYPES):
        return MASK
    if isinstance(value, dict):
        return {key: _redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(item) for item in value]
    return value
