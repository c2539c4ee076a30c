"""hayate serve: the OpenAI / GroqCloud-compatible HTTP server, from the command line."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from functools import partial
from pathlib import Path

from hayate.config import WEIGHT_MODES, EngineConfig
from hayate.loading.catalogue import model_path
from hayate.scale.options import add_ray_options, ray_options

log = logging.getLogger("hayate.server")
API_KEY_ENV = "HAYATE_API_KEY"


class ServeError(ValueError):
    """The server could not start (the model failed to load); printed as one line."""


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="OpenAI/GroqCloud-compatible HTTP server",
                                description="Serve the model over HTTP; OpenAI clients talk to "
                                            "http://HOST:PORT/v1 unchanged. API docs at /docs.")
    serve.add_argument("--model", help="a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct Q4_1)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append", default=[],
                       help=f"accepted API key (repeatable; also ${API_KEY_ENV}); none: no authentication")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests that may wait for a batch slot; beyond it: 429 (default 256)")
    serve.add_argument("--max-model-len", type=int, help="context length (default: min(model's, 4096))")
    serve.add_argument("--max-n", type=int, default=8, help="most choices (n) per request (default 8)")
    serve.add_argument("--threads", type=int, help="CPU threads (default: one per CPU this process may use)")
    serve.add_argument("--kv-cache-tokens", type=int,
                       help="KV-cache capacity shared by all requests, in tokens (default: by memory)")
    serve.add_argument("--weights", choices=WEIGHT_MODES, default="auto",
                       help="how GGUF weights are kept (see `hayate run --help`; default auto)")
    serve.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                       help="prefill every prompt whole instead of sharing the cached blocks of common prefixes")
    from hayate.cli import (add_device_options, add_kv_cache_option, add_speculative_options, add_structured_options,
                            add_vision_options)

    add_device_options(serve)
    add_kv_cache_option(serve)
    add_structured_options(serve)
    add_speculative_options(serve)
    add_vision_options(serve)
    serve.add_argument("--allowed-media-dir", type=Path,
                       help="local image paths (file:// or absolute) may be read from under this folder only")
    serve.add_argument("--allow-remote-media", action="store_true",
                       help="fetch http(s) image URLs (never loopback, private or metadata addresses)")
    serve.add_argument("--max-image-mb", type=float, default=20.0, help="bytes per image, in MB (default 20)")
    serve.add_argument("--max-image-megapixels", type=float, default=33.0,
                       help="pixels per image, in millions (default 33)")
    serve.add_argument("--max-images", type=int, default=5, help="images per request (default 5)")
    serve.add_argument("--encoder-cache-mb", type=int, default=256,
                       help="image embeddings kept by content hash, so a repeated image is encoded once (default 256)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds in-flight requests get to finish before being aborted")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_ray_options(serve)


def command_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hayate.cli import parallel_settings, speculative_settings
    from hayate.server import ServerSettings, create_app
    from hayate.server.lifecycle import Server

    _check_options(args)
    replicas = ray_options(args)   # None without --ray
    settings = ServerSettings(api_keys=api_keys(args), max_n=args.max_n, media=media_policy(args))
    config = EngineConfig(model=args.model, mmproj=args.mmproj, threads=args.threads, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_batch, kv_cache_tokens=args.kv_cache_tokens,
                          weights=args.weights, encoder_cache_mb=args.encoder_cache_mb,
                          prefix_caching=args.prefix_caching,
                          device=args.device, dtype=args.dtype, cuda_graphs=not args.enforce_eager,
                          kv_cache_dtype=args.kv_cache_dtype, tool_format=args.tool_format,
                          grammar_backend=args.grammar_backend,
                          vision_precision=args.vision_precision, **speculative_settings(args),
                          **parallel_settings(args))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    if replicas is not None:
        from hayate.scale.ray_serve import ServeSpec, run_on_ray

        return run_on_ray(ServeSpec(settings, config, args.max_queue, args.host, args.port, args.shutdown_timeout),
                          replicas)
    failures: list[str] = []

    def on_load_error(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    app = create_app(settings, partial(load_model, config, args.max_queue), on_load_error)
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=args.shutdown_timeout), app)
    with _sigterm_exits_cleanly():
        server.run()
    if failures:
        raise ServeError(f"could not load the model: {failures[0]}")
    return 0


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key) + ([os.environ[API_KEY_ENV]] if os.environ.get(API_KEY_ENV) else [])
    return tuple(dict.fromkeys(keys))


def media_policy(args: argparse.Namespace):
    from hayate.multimodal.image import ImageLimits
    from hayate.multimodal.media import MediaPolicy

    if args.allowed_media_dir is not None and not args.allowed_media_dir.is_dir():
        raise ValueError(f"--allowed-media-dir {args.allowed_media_dir} is not a folder")
    if args.max_image_mb <= 0 or args.max_image_megapixels <= 0 or args.max_images < 0:
        raise ValueError("--max-image-mb and --max-image-megapixels must be > 0, --max-images >= 0")
    limits = ImageLimits(max_bytes=int(args.max_image_mb * 1024 * 1024),
                         max_pixels=int(args.max_image_megapixels * 1_000_000), max_images=args.max_images)
    return MediaPolicy(limits=limits, allowed_media_dir=args.allowed_media_dir,
                       allow_remote_media=args.allow_remote_media, default_detail=args.image_detail)


def _check_options(args: argparse.Namespace) -> None:
    if args.model is not None and not model_path(args.model).exists():   # a path, or a pulled model's name
        raise ValueError(f"no such file or folder: {args.model}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {args.port}")
    if args.max_batch < 1:
        raise ValueError(f"max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise ValueError(f"max-queue must be >= 1, got {args.max_queue}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"shutdown-timeout must be >= 0, got {args.shutdown_timeout}")


def load_model(config: EngineConfig, max_queue: int):
    from hayate.llm import LLM
    from hayate.server import ServedModel

    log.info("loading %s", config.model or "the default model")
    return ServedModel.load(lambda: LLM(config=config), max_queue)


@contextlib.contextmanager
def _sigterm_exits_cleanly():
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the previous
    handler in place; a no-op handler there makes that a clean exit (status 0)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
