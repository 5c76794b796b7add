"""`tpserve`: serve every model directory of a model store, or the directories given with -m.

    tpserve --model-store model_store
    tpserve -m /opt/ml/model                 # one directory; the model is named after the folder
    tpserve -m deepspeed=/opt/ml/model       # ...or explicitly
    tpserve shard --model-dir M --tensor-parallel-degree N --out D   # pre-shard a model (serving/shard.py)
"""
import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from serving import logs
from serving.api.auth import ENV as API_KEY_ENV, check_exposure
from serving.app import make_app
from serving.config import PROPERTIES_FILE, ConfigError, ModelConfig, ServerSettings, load_model_config
from serving.drain import DRAIN
from serving.heap import freeze_loaded_objects

log = logging.getLogger("tpserve")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shard"]:
        from serving.shard import main as shard_main
        shard_main(argv[1:])
        return
    args = parse_args(argv)
    logs.configure(args.log_format)
    try:
        configs = collect_models(args.model_store, args.model)
        settings = ServerSettings(model_store=args.model_store, grace_period=args.grace_period,
                                  log_format=args.log_format, access_log=args.access_log,
                                  api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                                  max_request_size=args.max_request_size, idle_timeout=args.idle_timeout,
                                  read_timeout=args.read_timeout)
    except (ConfigError, ValueError) as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(2) from None
    for config in configs:
        log.info("model %s (version %s): engine=%s tensor_parallel_degree=%s model_id=%s entryPoint=%s", config.name,
                 config.version, config.engine, config.world_size, config.model_id or config.model_dir,
                 config.entry_point_module())
    check_exposure(args.host, settings.api_key)
    asyncio.run(serve(make_app(configs, settings), args.host, args.port, settings))


async def serve(app: web.Application, host: str, port: int, settings: ServerSettings) -> None:
    """Bind at once (models load in the background), serve until SIGTERM/SIGINT, then drain: the port stays
    open answering 503s while requests in flight finish, up to grace_period; then the groups stop."""
    # access_log=None: the observe middleware writes its own line per request.
    # keepalive_timeout also closes a connection that never completes its request head (half-open, slowloris).
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0,
                           keepalive_timeout=settings.idle_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        freeze_loaded_objects("front end")  # the app's modules and routes, before any request
        log.info("Listening on http://%s:%d", host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("signal received: draining (grace period %.0f s)", settings.grace_period)
        stop.clear()  # a second signal ends the grace period early
        waits = [asyncio.create_task(app[DRAIN].drain(settings.grace_period)), asyncio.create_task(stop.wait())]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    finally:
        await runner.cleanup()  # closes the port, then stops every worker group
    log.info("stopped")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, help="serve every model directory in this folder; "
                        "POST /models may register more from it")
    parser.add_argument("-m", "--model", action="append", default=[], metavar="[NAME=]PATH",
                        help="serve this model directory (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--grace-period", type=float, default=float(os.environ.get("TPSERVE_GRACE_PERIOD", 25)),
                        help="seconds requests in flight get to finish after SIGTERM (env TPSERVE_GRACE_PERIOD; "
                             "default 25, within Kubernetes' default terminationGracePeriodSeconds of 30)")
    parser.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("TPSERVE_LOG_FORMAT", "text"),
                        help="log lines as text or as JSON objects (env TPSERVE_LOG_FORMAT)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        default=os.environ.get("TPSERVE_ACCESS_LOG", "true").lower() != "false",
                        help="no line per request (env TPSERVE_ACCESS_LOG=false)")
    defaults = ServerSettings()
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /ping and /health/* "
                             f"(prefer the {API_KEY_ENV} variable: arguments show in ps)")
    parser.add_argument("--max-request-size", type=int, metavar="BYTES",
                        default=int(os.environ.get("TPSERVE_MAX_REQUEST_SIZE", defaults.max_request_size)),
                        help="largest request body; larger gets 413 (default %(default)s; TPSERVE_MAX_REQUEST_SIZE)")
    parser.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                        default=float(os.environ.get("TPSERVE_IDLE_TIMEOUT", defaults.idle_timeout)),
                        help="close a connection idle or without a complete request head this long "
                             "(default %(default)s; TPSERVE_IDLE_TIMEOUT)")
    parser.add_argument("--read-timeout", type=float, metavar="SECONDS",
                        default=float(os.environ.get("TPSERVE_READ_TIMEOUT", defaults.read_timeout)),
                        help="time to send a whole body, 408 after (default %(default)s; TPSERVE_READ_TIMEOUT)")
    args = parser.parse_args(argv)
    if not args.model_store and not args.model:
        parser.error("nothing to serve: give --model-store DIR or -m PATH")
    return args


def collect_models(model_store: Path | None, models: list[str]) -> list[ModelConfig]:
    configs = []
    if model_store is not None:
        if not model_store.is_dir():
            raise ConfigError(f"--model-store {model_store}: no such folder")
        dirs = sorted(d for d in model_store.iterdir() if (d / PROPERTIES_FILE).exists() or (d / "model.py").exists())
        if not dirs:
            raise ConfigError(f"--model-store {model_store}: no folder in it has a {PROPERTIES_FILE} or model.py")
        configs += [load_model_config(d) for d in dirs]
    for spec in models:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = None, spec
        configs.append(load_model_config(Path(path), name=name))
    return configs


if __name__ == "__main__":
    main()
