"""``edgemoe serve``: an OpenAI-compatible HTTP server (llama-server's flags
where they overlap) batching concurrent requests through one model."""

from __future__ import annotations

import argparse
import sys

from edgemoe.commands.options import add_load_args, load_model


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching"
    )
    add_load_args(s)
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    s.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080)")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health",
    )
    s.add_argument(
        "-np",
        "--parallel",
        type=int,
        default=4,
        help="requests decoded together; each gets the context / N (default: 4)",
    )
    s.add_argument(
        "--queue",
        type=int,
        default=64,
        help="requests waiting for a slot before 503 (default: 64)",
    )
    s.add_argument(
        "--max-body",
        type=int,
        default=1 << 20,
        help="largest request body in bytes; larger gets 413 (default: 1 MiB)",
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from edgemoe.errors import ConfigError

    if not 1 <= args.parallel <= 256:
        raise ConfigError(f"--parallel must be in 1..256, got {args.parallel}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.queue < 0 or args.max_body < 1:
        raise ConfigError("--queue must be >= 0 and --max-body >= 1")
    try:
        import uvicorn

        from edgemoe.serve.app import ServeOptions, create_app
    except ImportError as e:
        raise ConfigError(f"serve needs {e.name}: pip install edgemoe") from None
    import threading
    from pathlib import Path

    from edgemoe.runtime.scheduler import Scheduler

    with load_model(args, n_seq_max=args.parallel) as model:
        # The steps run on this (the main) thread, the HTTP server beside it.
        scheduler = Scheduler(model, args.parallel, args.queue, thread=False)
        name = Path(args.model).name.removesuffix(".gguf")
        app = create_app(
            model, scheduler, ServeOptions(name, args.api_key, args.max_body)
        )
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            print(
                f"warning: serving on {args.host} without --api-key: anyone "
                "who can reach this port can use the model",
                file=sys.stderr,
            )
        server = uvicorn.Server(
            uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
        )

        def serve() -> None:
            try:
                server.run()
            finally:
                scheduler.close()  # a port in use ends the steps too

        http = threading.Thread(target=serve, name="edgemoe-http", daemon=True)
        http.start()
        print(
            f"serving {name} on http://{args.host}:{args.port}/v1 · "
            f"{args.parallel} slots of {scheduler.slot_ctx} tokens",
            file=sys.stderr,
        )
        try:
            scheduler.run()
        finally:
            server.should_exit = True
            scheduler.close()
            http.join(10)
        if not server.started:
            raise ConfigError(
                f"could not listen on {args.host}:{args.port} (see above; is the "
                "port in use?)"
            )
    return 0
