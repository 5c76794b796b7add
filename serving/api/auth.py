"""Bearer-token authentication: with `--api-key` (or TPSERVE_API_KEY) set, every route but the health probes
(/ping, /health, /health/*) needs `Authorization: Bearer <key>`; a missing or wrong token gets 401.

Without a key nothing is checked, which is right on a loopback address and wrong anywhere else: `check_exposure`
logs a warning when a non-loopback address is bound without one.
"""
import hmac
import ipaddress
import logging

from aiohttp import web

from serving.api.errors import error_response

log = logging.getLogger("tpserve.auth")

API_KEY = web.AppKey("api_key", str)
ENV = "TPSERVE_API_KEY"
OPEN_PATHS = ("/ping", "/health")  # Kubernetes probes carry no token


def is_open(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPEN_PATHS)


@web.middleware
async def require_token(request: web.Request, handler):
    key = request.app.get(API_KEY)
    if not key or is_open(request.path):
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        response = error_response(401, "Unauthorized", "this server needs an API key: send the header "
                                                         "'Authorization: Bearer <key>'")
        response.headers["WWW-Authenticate"] = 'Bearer realm="tpserve"'
        return response
    return await handler(request)


def check_exposure(host: str, api_key: str | None) -> None:
    """Warn when the server listens beyond this machine and anyone who reaches it may use it."""
    if api_key or is_loopback(host):
        return
    log.warning("listening on %s without an API key: anyone who can reach this address can use every model. "
                "Set %s (or --api-key) to require a bearer token.", host, ENV)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
