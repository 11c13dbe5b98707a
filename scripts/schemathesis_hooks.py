"""Schemathesis hooks for scripts/contract.sh (loaded through SCHEMATHESIS_HOOKS).

`before_call` replaces a generated value by another one that the document accepts just as
well, so a positive case stays positive and a negative case stays negative. Schemathesis
would re-validate an edited case and could relabel it (a case testing a missing
`Authorization` header, which no declared parameter describes, would become "positive" and
be sent with the key), so after such edits the hook keeps the labels drawn at generation.
The one edit that can change validity (a callback URL whose host is not a valid RFC 3986
host, made valid by the swap below) is left to schemathesis to re-validate.

- Idempotency-Key: a valid generated key is replaced by a fresh one for every request.
  Schemathesis draws keys from a small space, so two requests with different bodies would
  share a key; the server then answers 422 idempotency_key_reused, which is correct (IETF
  idempotency-key draft) and stays. An invalid generated key (too long, spaces, ...) is
  left alone, so the server's 400 for it is still tested.
- callback_url: the host (and port) of an http(s) URL is replaced by 127.0.0.1 and a port
  nothing listens on; scheme, credentials, path and query stay. The local runtime delivers
  webhooks to whatever the task names, and generated URLs name arbitrary public hosts: the
  run must send nothing beyond loopback. Any other value (not a URL, too long, not a
  string) is left alone, so the server's 400 for it is still tested.

One failure is dropped, narrowly: `GET /v1/tasks` answering `400` with `param: cursor` to a
non-empty `cursor` that schemathesis made up. A cursor is an opaque token the API returned
(openapi.yaml: "anything else is 400"); JSON Schema cannot say "a value this API returned",
so a made-up one looks schema-valid (ST202) although refusing it is the documented behaviour.
Every other ST202, and every other check on that operation, still counts.
"""

import itertools
import os
import re
import uuid
from urllib.parse import urlsplit, urlunsplit

import schemathesis

# The document's Idempotency-Key rule: 1 to 255 printable ASCII characters, no spaces.
_VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# The characters of an RFC 3986 `host [":" port]` (reg-name, IP literal, percent-encoding).
_URI_HOST = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*")
# Where webhooks of the run's tasks go: loopback, a port nothing listens on (refused at once).
_CALLBACK_HOST = os.environ.get("CONTRACT_CALLBACK_HOST", "127.0.0.1:9")
_RUN = uuid.uuid4().hex[:12]
_counter = itertools.count()


def _fresh_key() -> str:
    return f"contract-{_RUN}-{next(_counter)}"


def _fix_headers(case) -> None:
    headers = case.headers
    if not headers:
        return
    for name in list(headers):
        if name.lower() != "idempotency-key":
            continue
        value = headers[name]
        if isinstance(value, str) and _VALID_KEY.fullmatch(value):
            headers[name] = _fresh_key()


def _to_loopback(value):
    """`value` with its host and port replaced by the loopback target, or None to leave it.

    Also says whether the swap kept validity: False when the original host was not a valid
    RFC 3986 host (say, non-ASCII), which the swap may have made valid.
    """
    if not isinstance(value, str) or len(value) > 2048:
        return None
    try:
        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return None
    except ValueError:
        return None
    userinfo, _, host = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@{_CALLBACK_HOST}" if userinfo else _CALLBACK_HOST
    url = urlunsplit(parts._replace(netloc=netloc))
    if len(url) > 2048:
        # Longer than the limit after the swap: keep it valid and loopback.
        url = f"{parts.scheme}://{_CALLBACK_HOST}/"
    return url, bool(_URI_HOST.fullmatch(host))


def _fix_body(case) -> bool:
    """Points the body's callback_url at loopback; False if that may have changed validity."""
    body = case.body
    if not isinstance(body, dict):
        return True
    swapped = _to_loopback(body.get("callback_url"))
    if swapped is None:
        return True
    body["callback_url"], kept_validity = swapped
    return kept_validity


# Takes the case's containers as they are now as the baseline, so schemathesis does not
# re-validate them (see the module docstring). A private method of the pinned version: if it
# goes away in an upgrade, the hook fails loudly rather than mislabelling cases.
def _keep_labels(case) -> None:
    case._sync_validated_hashes()


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    _fix_headers(case)
    _keep_labels(case)
    if _fix_body(case):
        _keep_labels(case)


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    """False to drop a failure (see the module docstring); True keeps it."""
    if getattr(failure, "code", None) != "ST202":
        return True
    if case.method.upper() != "GET" or case.path != "/v1/tasks" or response.status_code != 400:
        return True
    cursor = (case.query or {}).get("cursor")
    if not isinstance(cursor, str) or cursor == "":
        return True
    try:
        param = response.json()["error"]["param"]
    except (ValueError, KeyError, TypeError):
        return True
    return param != "cursor"
