"""The baseline of the front-end benchmark: a bare aiohttp app answering the same POST as tpserve's echo model
(`{"echo": body, "batch_size": 1}` as JSON), with no middleware, no ranks, no access log.

    python -m bench.bare_app --port 8081
"""
import argparse

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"echo": body.decode("utf-8"), "batch_size": 1})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/predictions/{model}", echo)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bare_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)
