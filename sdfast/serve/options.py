"""How a served application is set up: one ``ServeOptions`` that the CLI, ``serve deploy`` configs and tests fill.

Plain Python, so ``sdfast serve --help`` and option errors need no Ray.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, field, fields

from . import controlnets, loras
from .requests import Limits

API_KEY_ENV = "SDFAST_API_KEY"
# A public bind refuses shorter keys: placeholders that configs ship ("change-me", "secret") and words are guessed.
MIN_PUBLIC_KEY_CHARS = 16


@dataclass
class ServeOptions:
    """Each option with what it costs.

    Batching: a replica groups requests of the same shape (``GenerationRequest.batch_key``) into one call of up to
    ``max_batch`` images, waiting at most ``batch_wait_s`` for batch-mates after the first arrives. The default of
    4 is reasoned, not measured (no GPU run yet): an SD 1.5 U-Net step at 512x512 and batch 1 (2 with guidance)
    leaves an H100 partly idle, so a few more images cost less than their share of time, while each image in a
    batch waits for the whole batch; 4 images bound that wait to about four single images' time. The 10 ms wait
    is under 2% of a 30-step image's latency and is paid only when the queue is empty.
    """

    model: str | None = None  # a diffusers folder or single file on the server; None: the shipped default model
    backend: str = "torch"  # one of sdfast.backends.BACKENDS: torch, triton, compile, onnxruntime, tensorrt
    replicas: int = 1  # pipeline replicas; each takes one GPU where the cluster has GPUs
    host: str = "127.0.0.1"  # loopback by default; any other address needs an API key
    port: int = 8000
    api_key: str | None = None  # clients send "Authorization: Bearer KEY"; default $SDFAST_API_KEY
    gpus: str = "auto"  # "auto": one GPU per replica when the cluster has any, else CPU replicas; "0" or "1"
    cpus_per_replica: float = 1.0  # CPU replicas: cores reserved each (torch uses that many threads)
    dtype: str | None = None  # default fp16 on a GPU, fp32 on the CPU
    max_batch: int = 4  # images per batched call; capped by the engines' profiles on tensorrt (engine_max_batch)
    batch_wait_s: float = 0.01  # how long the first request of a batch waits for batch-mates
    max_ongoing_requests: int | None = None  # per replica, in its batch queues; default 2 x max_batch
    max_queued_requests: int = 16  # waiting for a replica, per caller; beyond: 503 with Retry-After
    retry_after_s: int = 2  # the Retry-After a 503 carries
    request_timeout_s: float = 300.0  # a request unanswered by then gets a 504, never a hang
    warmup_steps: int = 2  # steps of the warm-up image each replica draws before it takes traffic
    lora_dir: str | None = None  # a folder of .safetensors LoRAs requests may name (by file stem, never a path)
    max_loaded_loras: int = 8  # per replica: each holds its factors and a copy of the base weights it touches
    # a folder of ControlNets requests may name (diffusers sub-folders, .safetensors / .pth files; by name, never a
    # path); each replica loads them all at start (see sdfast.serve.controlnets)
    controlnet_dir: str | None = None
    max_controlnets: int = 8  # a larger folder is refused: each replica holds every one (SD 1.5's: 0.72 GB in fp16)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if isinstance(self.limits, dict):
            self.limits = Limits(**self.limits)
        if not self.api_key:  # None or "": no key given here
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 2 * self.max_batch
        self.check()

    @classmethod
    def from_dict(cls, args: dict) -> "ServeOptions":
        """From a ``serve deploy`` config's ``args`` (unknown names are refused, with the known ones listed)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown serve option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**args)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas}: need at least 1")
        if self.gpus not in ("auto", "0", "1"):
            raise ValueError(f"gpus={self.gpus!r}: use 'auto', '0' (CPU replicas) or '1' (one GPU each)")
        if self.max_batch < 1 or self.batch_wait_s < 0:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1 and batch_wait_s={self.batch_wait_s} >= 0")
        if self.max_ongoing_requests < self.max_batch:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} is below max_batch="
                             f"{self.max_batch}: a replica could never fill a batch")
        if self.max_loaded_loras < self.limits.max_loras:
            raise ValueError(f"max_loaded_loras={self.max_loaded_loras} is below limits.max_loras="
                             f"{self.limits.max_loras}: a request naming that many could never run")
        if self.lora_dir is not None:
            loras.listing(self.lora_dir)  # a missing folder fails here, before any replica starts
        if self.controlnet_dir is not None:
            controlnets.listing(self.controlnet_dir, self.max_controlnets)  # as lora_dir; also too many, or clashes
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests={self.max_queued_requests}: need >= 0 (a bounded queue)")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()
                                             and self.api_key == self.api_key.strip()):
            raise ValueError(f"the API key (${API_KEY_ENV}) holds what an HTTP header cannot carry (a character that "
                             "is not printable ASCII, or spaces at an end): use e.g. the output of "
                             "`openssl rand -hex 32`")
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"binding to {self.host} exposes the server beyond this machine: set an API key in "
                             f"${API_KEY_ENV} (clients then send 'Authorization: Bearer KEY'), or bind 127.0.0.1")
        if not is_loopback(self.host) and len(self.api_key) < MIN_PUBLIC_KEY_CHARS:
            raise ValueError(f"binding to {self.host} with an API key of {len(self.api_key)} characters, which anyone "
                             f"may guess (placeholders such as 'change-me' too): set ${API_KEY_ENV} to a secret of at "
                             f"least {MIN_PUBLIC_KEY_CHARS} random characters, e.g. `openssl rand -hex 32`")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
