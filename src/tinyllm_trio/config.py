"""Configuration: `EngineConfig` (the engine's defaults, once) and `ServerConfig` (every knob
of `tinyllm-trio serve`, whose engine part is an `EngineConfig`), built from flags and
environment and passed down.

Every knob of `tinyllm-trio serve` is declared once, in `_OPTIONS` below, with its flag, its
environment variable, its type and its default. `add_server_arguments` turns that table into
argparse flags (each `--help` line names the environment variable), and `ServerConfig.from_args`
turns parsed flags and the environment back into the dataclass. `add_model_arguments` declares
the two model flags from the same table for the commands that load a model themselves.

Precedence: a flag given on the command line wins, then the environment variable, then the
default. Limits live here with documented defaults, the way hypercorn keeps
`h11_max_incomplete_size`, `keep_alive_timeout` and `graceful_timeout` in one config object.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tinyllm_trio.model.batching import MAX_BATCH
from tinyllm_trio.model.transformer import WEIGHTS_FORMATS

MiB = 1024 * 1024


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs and their defaults, for `open_engine`, the worker pool and `serve`.

    `model` None is the packaged checkpoint; `workers` None is one worker per CPU core. Times
    are seconds.
    """

    model: str | None = None
    attention_scale: str | None = None
    weights: str = "float32"
    workers: int | None = None
    max_batch: int = MAX_BATCH
    max_queue: int = 256
    pin_workers: bool = True
    prefix_cache: bool = True
    coast: bool = True
    busy_tick: float = 0.016
    stall_timeout: float = 5.0
    ready_timeout: float = 120.0
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.stall_timeout > 0:
            raise ValueError(
                f"stall_timeout must be > 0 (math.inf: never), got {self.stall_timeout}"
            )
        if not 0 <= self.busy_tick <= 1:
            raise ValueError(f"busy_tick must be between 0 and 1 second, got {self.busy_tick}")
        if self.attention_scale not in (None, "head", "embd"):
            raise ValueError(
                f"attention_scale must be 'head' or 'embd', got {self.attention_scale!r}"
            )
        if self.weights not in WEIGHTS_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHTS_FORMATS}, got {self.weights!r}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP server and the engine it starts need to know.

    Times are seconds, sizes bytes. `None` for `workers` means one worker per CPU core;
    `None` for `model` means the packaged default checkpoint; `None` for `model_name` means the
    engine's own `model_id`.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    # the engine (see `engine`)
    model: str | None = EngineConfig.model
    attention_scale: str | None = EngineConfig.attention_scale
    weights: str = EngineConfig.weights
    workers: int | None = EngineConfig.workers
    max_batch: int = EngineConfig.max_batch
    max_queue: int = EngineConfig.max_queue
    pin_workers: bool = EngineConfig.pin_workers
    prefix_cache: bool = EngineConfig.prefix_cache
    coast: bool = EngineConfig.coast
    busy_tick: float = EngineConfig.busy_tick
    worker_stall_timeout: float = EngineConfig.stall_timeout
    # what the server makes of the model's output
    model_name: str | None = None
    detokenize: str = "text"
    no_repeat_ngram_size: int = 3
    # limits and timeouts
    max_body_size: int = 1 * MiB
    max_header_size: int = 16 * 1024
    max_connections: int = 512
    max_connections_per_ip: int = 0  # 0: off (behind a proxy every client has its address)
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 15.0
    send_timeout: float = 30.0
    sse_ping_interval: float = 15.0
    shutdown_grace: float = 10.0
    drain_delay: float = 0.0
    # security and logging
    api_key: str | None = field(default=None, repr=False)
    log_format: str = "text"
    log_level: str = "info"
    access_log: bool = True
    access_log_skip: str = "/health,/ping"
    # browser clients
    cors_origins: tuple[str, ...] = ()
    no_webui: bool = False
    metrics_compat: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_queue", "max_body_size", "max_header_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_connections_per_ip < 0:
            raise ValueError(
                f"max_connections_per_ip must be >= 0 (0 = off), got {self.max_connections_per_ip}"
            )
        for name in (
            "header_timeout",
            "body_timeout",
            "keep_alive_timeout",
            "send_timeout",
            "sse_ping_interval",
            "worker_stall_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, got {self.shutdown_grace}")
        if self.detokenize not in ("plain", "text"):
            raise ValueError(f"detokenize must be 'plain' or 'text', got {self.detokenize!r}")
        if not 0 <= self.no_repeat_ngram_size <= 32:
            raise ValueError(
                f"no_repeat_ngram_size must be in 0..32, got {self.no_repeat_ngram_size}"
            )
        if any(p and not p.startswith("/") for p in self.access_log_skip.split(",")):
            raise ValueError(
                f"access_log_skip must be comma-separated paths starting with '/', "
                f"got {self.access_log_skip!r}"
            )
        if not 0 <= self.drain_delay < float("inf"):
            raise ValueError(f"drain_delay must be >= 0 and finite, got {self.drain_delay}")
        if self.metrics_compat not in (None, "vllm"):
            raise ValueError(f"metrics_compat must be 'vllm' or unset, got {self.metrics_compat!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        given = self.cors_origins
        try:
            origins = _origins(given if isinstance(given, str) else ",".join(given))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"cors_origins: {exc}") from None
        object.__setattr__(self, "cors_origins", origins)
        self.engine  # noqa: B018 (validates the engine's part too)

    @property
    def engine(self) -> EngineConfig:
        """The engine this server starts (`open_engine(**asdict(server_config.engine))`)."""
        return EngineConfig(
            model=self.model,
            attention_scale=self.attention_scale,
            weights=self.weights,
            workers=self.workers,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            pin_workers=self.pin_workers,
            prefix_cache=self.prefix_cache,
            coast=self.coast,
            busy_tick=self.busy_tick,
            stall_timeout=self.worker_stall_timeout,
        )

    def access_logged(self, path: str) -> bool:
        """Whether a request for `path` gets an access-log line (probes are skipped)."""
        return self.access_log and path not in self.access_log_skip.split(",")

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, env: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Flags (from a parser `add_server_arguments` prepared), then env, then defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for opt in _OPTIONS:
            given = getattr(args, opt.dest, None)
            if given is not None:
                values[opt.dest] = given
            elif opt.env in env:
                values[opt.dest] = opt.parse_env(env[opt.env])
        return cls(**values)


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G suffix (binary: 1M = 1048576)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": MiB, "G": 1024 * MiB}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _origins(text: str) -> tuple[str, ...]:
    """`--cors-origins`: comma-separated `scheme://host[:port]` origins, or `*` for any.

    Browsers send `Origin` with a lowercase scheme and host and no path, so a configured origin
    is lowercased and a trailing slash dropped; one with a path can never match and is refused.
    """
    origins: list[str] = []
    for part in text.split(","):
        origin = part.strip().lower().rstrip("/")
        if not origin:
            continue
        scheme, sep, rest = origin.partition("://")
        valid = sep and scheme in ("http", "https") and rest and "/" not in rest
        if origin != "*" and not valid:
            raise argparse.ArgumentTypeError(
                f"not an origin: {part.strip()!r} (want scheme://host[:port], or *)"
            )
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    type: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    const: Any = None  # not None: a flag that takes no value and sets `dest` to this
    negatable: bool = False  # a boolean: --flag [BOOL] and --no-flag

    @property
    def env(self) -> str:
        return "TINYLLM_" + self.dest.upper()

    def parse_env(self, text: str) -> Any:
        try:
            value = self.type(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"environment variable {self.env}={text!r}: {exc}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"environment variable {self.env}={text!r}: not one of {self.choices}")
        return value


_DEFAULTS = {f.name: f.default for f in fields(ServerConfig)}

_OPTIONS: tuple[_Option, ...] = (
    _Option("--host", "host", str, "address to listen on"),
    _Option("--port", "port", int, "TCP port (0 picks a free one; the log says which)"),
    _Option(
        "--model",
        "model",
        str,
        "checkpoint directory (ours, or the original release's model/ dir); "
        "unset: the packaged default model",
    ),
    _Option(
        "--attention-scale",
        "attention_scale",
        str.lower,
        "override the checkpoint's attention scale: head = 1/sqrt(head_size), "
        "embd = 1/sqrt(n_embd)",
        choices=("head", "embd"),
    ),
    _Option(
        "--weights",
        "weights",
        str.lower,
        "the weights' precision in the model processes: float32 (as stored), or bfloat16 "
        "(rounded once at load: half the bytes per decode step, faster at 1-2 sequences)",
        choices=WEIGHTS_FORMATS,
    ),
    _Option("--workers", "workers", int, "worker processes; unset: one per CPU core"),
    _Option("--max-batch", "max_batch", int, "sequences decoded together per worker"),
    _Option(
        "--pin-workers",
        "pin_workers",
        _to_bool,
        "with fewer workers than cores, keep each worker on a core of its own, leaving the "
        "others to the server (true/false); false when several servers share the cores",
        metavar="BOOL",
    ),
    _Option(
        "--prefix-cache",
        "prefix_cache",
        _to_bool,
        "keep the keys and values of finished sequences and reuse a prompt's longest cached "
        "prefix; route requests to the worker holding their prefix (--no-prefix-cache: off)",
        metavar="BOOL",
        negatable=True,
    ),
    _Option(
        "--coast",
        "coast",
        _to_bool,
        "while a worker sends its decode steps at a steady pace (under 2 ms apart), read them "
        "on a timer at that pace instead of having the worker wake this process after each "
        "one, which on a virtual machine costs the worker an interrupt per step "
        "(--no-coast: always woken, and no busy tick either)",
        metavar="BOOL",
        negatable=True,
    ),
    _Option(
        "--busy-tick",
        "busy_tick",
        float,
        "while every core runs a busy worker, read the workers' tokens on a shared tick of "
        "this many seconds instead of being woken after each decode step of each worker, "
        "which takes the CPU from a worker's step; a request's first token and its end still "
        "arrive at once, other tokens at most this late (0: woken after every step)",
        metavar="SECONDS",
    ),
    _Option(
        "--max-queue",
        "max_queue",
        int,
        "requests waiting for a slot before new ones get 429 + Retry-After",
    ),
    _Option(
        "--model-name",
        "model_name",
        str,
        "model id served by /v1/models and echoed in responses; unset: the engine's id",
    ),
    _Option(
        "--detokenize",
        "detokenize",
        str.lower,
        "text: sentence case, 'I' and English apostrophes; plain: the original's lowercase form",
        choices=("plain", "text"),
    ),
    _Option(
        "--no-repeat-ngram-size",
        "no_repeat_ngram_size",
        int,
        "/process's default no_repeat_ngram_size (0 = off): no n-gram of prompt + output is "
        "generated twice; the OpenAI endpoints default to off",
        metavar="N",
    ),
    _Option(
        "--max-body-size",
        "max_body_size",
        _size,
        "largest request body (K/M suffixes allowed); larger -> 413 without reading it",
        metavar="BYTES",
    ),
    _Option(
        "--max-header-size",
        "max_header_size",
        _size,
        "largest request head (request line + headers); larger -> 431",
        metavar="BYTES",
    ),
    _Option(
        "--max-connections",
        "max_connections",
        int,
        "open client connections; at the cap a new one evicts the oldest idle connection, "
        "or, with none idle, gets 503 and is closed (/health and /ping are still answered)",
    ),
    _Option(
        "--max-connections-per-ip",
        "max_connections_per_ip",
        int,
        "open connections per client address, enforced like --max-connections (0 = off: "
        "behind a proxy every client has the proxy's address)",
        metavar="N",
    ),
    _Option(
        "--header-timeout",
        "header_timeout",
        float,
        "seconds for a request's head to arrive once it started -> 408; a new connection's "
        "first head counts from the accept (a connection that sends nothing is closed)",
        metavar="SECONDS",
    ),
    _Option(
        "--body-timeout",
        "body_timeout",
        float,
        "seconds for a request body to arrive in full -> 408",
        metavar="SECONDS",
    ),
    _Option(
        "--keep-alive-timeout",
        "keep_alive_timeout",
        float,
        "seconds an idle keep-alive connection is kept open",
        metavar="SECONDS",
    ),
    _Option(
        "--send-timeout",
        "send_timeout",
        float,
        "seconds a write to a client may stall (client not reading) before it is dropped",
        metavar="SECONDS",
    ),
    _Option(
        "--sse-ping-interval",
        "sse_ping_interval",
        float,
        "seconds of silence before a streaming response sends ': ping' comments "
        "(while queued or in prefill)",
        metavar="SECONDS",
    ),
    _Option(
        "--worker-stall-timeout",
        "worker_stall_timeout",
        float,
        "seconds a worker holding requests may send nothing before it is killed as hung "
        "(its requests get a worker_died error; it is restarted)",
        metavar="SECONDS",
    ),
    _Option(
        "--shutdown-grace",
        "shutdown_grace",
        float,
        "seconds in-flight requests get to finish after SIGINT/SIGTERM before they are "
        "cancelled with a final error event",
        metavar="SECONDS",
    ),
    _Option(
        "--drain-delay",
        "drain_delay",
        float,
        "seconds after SIGTERM/SIGINT during which /health says 503 while everything else is "
        "served as usual, before the drain starts (for a load balancer or Kubernetes to take "
        "the instance out of rotation first)",
        metavar="SECONDS",
    ),
    _Option(
        "--api-key",
        "api_key",
        str,
        "require 'Authorization: Bearer KEY' on the generation endpoints "
        "(/process, /v1/*, /tokenize, /detokenize); /health, /ping, /metrics stay open",
        metavar="KEY",
    ),
    _Option("--log-format", "log_format", str.lower, "log line format", choices=("text", "json")),
    _Option(
        "--log-level",
        "log_level",
        str.lower,
        "logging level",
        choices=("debug", "info", "warning", "error"),
    ),
    _Option(
        "--access-log",
        "access_log",
        _to_bool,
        "log one line per request (true/false)",
        metavar="BOOL",
    ),
    _Option(
        "--access-log-skip",
        "access_log_skip",
        str,
        "comma-separated paths left out of the access log (health probes by default; '' logs "
        "every path)",
        metavar="PATHS",
    ),
    _Option(
        "--cors-origins",
        "cors_origins",
        _origins,
        "browser origins allowed to call the API from another site, comma-separated "
        "(https://app.example,http://localhost:3000), or * for any; unset: no CORS headers",
        metavar="ORIGINS",
    ),
    _Option(
        "--no-webui",
        "no_webui",
        _to_bool,
        "do not serve the browser playground at / (which then answers 404)",
        const=True,
    ),
    _Option(
        "--metrics-compat",
        "metrics_compat",
        str.lower,
        "also export the engine gauges under another server's names, for routers and "
        "dashboards that scrape those (vllm: vllm:num_requests_waiting, ...)",
        choices=("vllm",),
    ),
)


def add_model_arguments(parser: argparse.ArgumentParser, *, weights: bool = True) -> None:
    """`--model`, `--attention-scale` and (with `weights`) `--weights` as `serve` declares
    them, for the commands that load a model in their own process (generate, eval, bench
    model, bench engine); the environment variable is the default, read now."""
    wanted = ("model", "attention_scale", "weights") if weights else ("model", "attention_scale")
    for opt in _OPTIONS:
        if opt.dest in wanted:
            given = os.environ.get(opt.env)
            parser.add_argument(
                opt.flag,
                dest=opt.dest,
                type=opt.type,
                choices=opt.choices,
                default=_DEFAULTS[opt.dest] if given is None else opt.parse_env(given),
                help=f"{opt.help} [env {opt.env}]",
            )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every `serve` flag; defaults stay None so `from_args` can tell 'not given'."""
    parser.epilog = (
        "Every flag has an environment variable (shown with it); a flag given on the command "
        "line wins over the variable, which wins over the default."
    )
    for opt in _OPTIONS:
        default = _DEFAULTS[opt.dest]
        shown = "unset" if default is None else default
        if opt.dest == "max_body_size" or opt.dest == "max_header_size":
            shown = f"{default} bytes"
        if opt.const is not None:
            parser.add_argument(
                opt.flag,
                dest=opt.dest,
                action="store_const",
                const=opt.const,
                default=None,
                help=f"{opt.help} [env {opt.env}={str(opt.const).lower()}]",
            )
            continue
        if opt.dest == "cors_origins":
            shown = "none"
        extra: dict[str, Any] = {"nargs": "?", "const": True} if opt.negatable else {}
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            type=opt.type,
            choices=opt.choices,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help} [env {opt.env}; default: {shown}]",
            **extra,
        )
        if opt.negatable:
            parser.add_argument(
                "--no-" + opt.flag[2:],
                dest=opt.dest,
                action="store_const",
                const=False,
                default=None,
                help=f"the same as {opt.flag} false",
            )


__all__ = ["EngineConfig", "ServerConfig", "add_model_arguments", "add_server_arguments"]
