"""Keep secrets out of what dbagent prints, logs and publishes."""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host (any scheme: postgresql, redis, rediss…)
# The secret runs to the authority's last '@' (redis-py accepts an unescaped '@' in it).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)(?P<secret>[^/?#\s]*)(?P<tail>@)")
# libpq keyword form and environment-style assignments: password=secret, PGPASSWORD=secret
_KEYWORD_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|passwd|pgpassword|sslpassword)\s*=\s*)(?P<secret>'[^']*'|\"[^\"]*\"|[^\s&;'\")]+)",
    re.IGNORECASE,
)
# ?password=secret in a URL's query
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&\s]+)", re.IGNORECASE)


def redact(text: object) -> str:
    """The text with every password it contains replaced by ``***``."""
    value = str(text)
    value = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", value)
    value = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", value)
    value = _KEYWORD_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", value)
    return value
