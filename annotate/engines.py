"""Chat engines for the describe stage: one interface, ``chat(conversations) -> completions``.

- ``OpenAIChatEngine``: any OpenAI-compatible endpoint (``vllm serve``…) through the official ``openai`` client:
  bounded concurrency, timeouts, and the client's own retries (connection errors, timeouts, 408/409/429/5xx,
  honouring ``Retry-After``, jittered exponential backoff). Failures come back as ``Completion.error``, never as
  exceptions, so a row keeps its error instead of vanishing.
- ``TransformersChatEngine``: Hugging Face ``generate`` in-process, one conversation at a time (debugging, tiny
  models).
- ``build_vllm_processor``: the GPU production path, a ``ray.data.llm`` processor running offline vLLM engines,
  wrapped so that every request row comes out as one completion row (:class:`VLLMChatProcessor`).

The ``reference`` engine is not a chat engine: grain.annotate.describe copies ground-truth region texts instead.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from grain.annotate.prompts import Messages, decode_data_url
from grain.config import DescribeConfig

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One reply: ``text`` on success, ``error`` (a sentence naming the cause) on failure."""

    text: str | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatEngine(ABC):
    name: str
    model: str

    @abstractmethod
    def chat(self, conversations: list[Messages], max_tokens: int, temperature: float) -> list[Completion]:
        """One completion per conversation, in order. Must not raise for a per-request failure."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections / memory."""


def make_engine(cfg: DescribeConfig) -> ChatEngine:
    if cfg.engine == "openai":
        return OpenAIChatEngine(cfg)
    if cfg.engine == "transformers":
        return TransformersChatEngine(cfg)
    raise ValueError(f"describe.engine={cfg.engine!r} has no in-process chat engine (vllm runs as a Ray Data processor)")


# ------------------------------------------------------------------------------------------------ openai


class OpenAIChatEngine(ChatEngine):
    """Chat completions from an OpenAI-compatible server, ``cfg.openai.concurrency`` requests in flight.

    Retrying is the ``openai`` client's (``max_retries`` = ``describe.openai.max_retries``): it retries connection
    errors, timeouts and HTTP 408/409/429/5xx with jittered exponential backoff (0.5 s doubling, at most 8 s) or the
    server's ``Retry-After`` (up to 2 minutes), and never other 4xx. Whatever still fails becomes the
    ``Completion.error`` of that conversation, a sentence naming the cause and the endpoint.
    """

    name = "openai"

    def __init__(self, cfg: DescribeConfig):
        import openai

        self.cfg = cfg.openai
        self.model = cfg.model
        self._url = self.cfg.base_url.rstrip("/")
        # The client refuses to start without a key; servers run without --api-key ignore the placeholder.
        api_key = os.environ.get(self.cfg.api_key_env) or "EMPTY"
        # The sync client is thread-safe: one client (one connection pool) shared by the worker threads.
        self._client = openai.OpenAI(
            base_url=self.cfg.base_url, api_key=api_key, timeout=self.cfg.timeout_s, max_retries=self.cfg.max_retries
        )
        self._pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="openai")

    def chat(self, conversations: list[Messages], max_tokens: int, temperature: float) -> list[Completion]:
        return [self._redacted(c) for c in self._pool.map(lambda m: self._one(m, max_tokens, temperature), conversations)]

    def _redacted(self, completion: Completion) -> Completion:
        """The completion with the API key masked: a server (or gateway) that quotes the Authorization header back
        in an error body, or in a reply, must not make the key part of the dataset (``error``/``raw`` in Parquet)."""
        key = getattr(self._client, "api_key", None)  # read from the client: the engine itself keeps no copy
        if not key or key == "EMPTY" or len(key) < 4:
            return completion
        for attr in ("text", "error"):
            value = getattr(completion, attr)
            if value and key in value:
                setattr(completion, attr, value.replace(key, "<api key redacted>"))
        return completion

    def _one(self, messages: Messages, max_tokens: int, temperature: float) -> Completion:
        import openai

        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature  # type: ignore[arg-type]
            )
        except openai.APITimeoutError as exc:
            return Completion(None, f"timeout after {self.cfg.timeout_s}s at {self._url}{_gave_up(exc.request)}")
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            # a connect failure (nobody listening, refused, unresolvable) vs a connection that broke after the
            # request went out (the server dropped it before or while answering)
            where = f"cannot reach {self._url}" if type(cause).__name__.startswith("Connect") else f"connection to {self._url} broke"
            return Completion(None, f"{where}: {type(cause).__name__}: {cause}{_gave_up(exc.request)}")
        except openai.APIStatusError as exc:
            code = exc.status_code
            retried = code in (408, 409, 429) or code >= 500
            return Completion(None, f"HTTP {code} from {self._url}: {exc.response.text[:300]}"
                                    f"{_gave_up(exc.response.request) if retried else ''}")
        except openai.OpenAIError as exc:  # anything else the client raises: still this row's error, not a crash
            return Completion(None, f"request to {self._url} failed: {type(exc).__name__}: {exc}")
        try:
            response = raw.parse()
            if not getattr(response, "choices", None):
                raise _NotAChatCompletion("no choices")
            text = response.choices[0].message.content
            if text is not None and not isinstance(text, str):
                raise _NotAChatCompletion(f"content is {type(text).__name__}")
            usage = response.usage
            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        except Exception as exc:  # noqa: BLE001 - not JSON, not a chat completion: the row records what came back
            what = str(exc) if isinstance(exc, _NotAChatCompletion) else f"{type(exc).__name__}: {str(exc)[:100]}"
            return Completion(None, f"malformed response from {self._url}: {what}: {_body_text(raw)[:200]}")
        return Completion(text or "", None, prompt_tokens, completion_tokens)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


class _NotAChatCompletion(ValueError):
    """A 200 whose JSON is not a usable chat completion."""


def _body_text(raw: Any) -> str:
    try:
        return str(raw.text)
    except Exception as exc:  # noqa: BLE001 - a body that cannot even be decoded
        return f"<body unreadable: {type(exc).__name__}>"


def _gave_up(request: Any) -> str:
    """`` (gave up after N attempts)`` from the retry count the client stamps on each attempt it sends."""
    try:
        attempts = int(request.headers["x-stainless-retry-count"]) + 1
    except (AttributeError, KeyError, TypeError, ValueError):
        return ""
    return f" (gave up after {attempts} attempt{'s' if attempts != 1 else ''})"


# ------------------------------------------------------------------------------------------------ transformers


class TransformersChatEngine(ChatEngine):
    name = "transformers"

    def __init__(self, cfg: DescribeConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = cfg.model
        self._torch = torch
        self._device = cfg.transformers.device
        self._processor = AutoProcessor.from_pretrained(cfg.model)
        self._model = AutoModelForImageTextToText.from_pretrained(
            cfg.model, dtype=getattr(torch, cfg.transformers.dtype)
        ).to(self._device)
        self._model.eval()
        # An actor may run several calls at once (ray.calls_per_actor): one generate at a time per model, and
        # HF fast tokenizers are not safe to share between threads.
        self._lock = threading.Lock()

    def chat(self, conversations: list[Messages], max_tokens: int, temperature: float) -> list[Completion]:
        with self._lock:
            return [self._one(m, max_tokens, temperature) for m in conversations]

    def _one(self, messages: Messages, max_tokens: int, temperature: float) -> Completion:
        from PIL import Image

        try:
            hf_messages, images = _to_hf_messages(messages, lambda url: Image.open(io.BytesIO(decode_data_url(url))).convert("RGB"))
            text = self._processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
            inputs = self._processor(text=[text], images=images or None, return_tensors="pt").to(self._device)
            kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
            if temperature > 0:
                kwargs["temperature"] = temperature
            with self._torch.inference_mode():
                out = self._model.generate(**inputs, **kwargs)
            new = out[0, inputs["input_ids"].shape[1] :]
            reply = self._processor.decode(new, skip_special_tokens=True)
            return Completion(reply, None, int(inputs["input_ids"].shape[1]), int(new.shape[0]))
        except Exception as exc:  # noqa: BLE001 - a bad image or an engine failure becomes the row's error
            return Completion(None, f"transformers engine: {type(exc).__name__}: {exc}")


def _to_hf_messages(messages: Messages, load_image: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-style parts → HF chat-template parts ({"type": "image"} placeholders) plus the PIL images in order."""
    out, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            if part["type"] == "image_url":
                images.append(load_image(part["image_url"]["url"]))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out, images


# ------------------------------------------------------------------------------------------------ vllm (GPU)


#: Ray's per-row error column (``should_continue_on_error``): empty on success, the failure's message otherwise.
INFERENCE_ERROR = "__inference_error__"
#: The columns of a completion row after the passed-through keys (as :class:`grain.annotate.describe.ChatActor`'s).
COMPLETION_COLUMNS = ("text", "error", "prompt_tokens", "completion_tokens")


def vllm_processor_config(cfg: DescribeConfig) -> Any:
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` for the GPU path (built without needing a GPU or vLLM)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = cfg.vllm
    engine_kwargs = {
        "max_model_len": v.max_model_len,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"max_pixels": v.max_pixels},
        **v.engine_kwargs,
    }
    return vLLMEngineProcessorConfig(
        model_source=cfg.model,
        engine_kwargs=engine_kwargs,
        concurrency=v.replicas,
        batch_size=v.batch_size,
        should_continue_on_error=True,  # a failed row gets an error column instead of failing the job
        prepare_multimodal_stage={"enabled": True},
        chat_template_stage={"enabled": True},
        tokenize_stage={"enabled": True},
        detokenize_stage={"enabled": True},
    )


def vllm_completion(row: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A ``ray.data.llm`` output row → the passed-through ``keys``, ``text`` / ``error`` and token counts."""
    error = row.get(INFERENCE_ERROR) or None
    return {
        **{k: row[k] for k in keys},
        "text": None if error else (row.get("generated_text") or ""),
        "error": f"vllm: {error}" if error else None,
        "prompt_tokens": int(row.get("num_input_tokens") or 0),
        "completion_tokens": int(row.get("num_generated_tokens") or 0),
    }


class VLLMChatProcessor:
    """A ``ray.data.llm`` processor as a ``Dataset -> Dataset`` engine: one completion row (``keys`` +
    :data:`COMPLETION_COLUMNS`) per request row, whatever happened to the request.

    Ray's processor alone loses failures silently: with ``should_continue_on_error=True`` a row whose inference
    failed (non-empty ``__inference_error__``) skips the user's postprocess and comes out as Ray's internal row,
    without ``text`` or ``error``; the stage would take it for an empty reply and never retry it. So every output row
    goes through :func:`_completion_row`, which turns such a row into an ``error`` row (``vllm: <message>``).

    A request that could not be prepared (``{"pre_error": ...}``, an image that cannot be encoded) enters the
    processor already failed (see :func:`build_vllm_chat_processor`): every stage, and the postprocess, pass a failed
    row through untouched, so the engine never sees it and it ends as an ``error`` row with the reason as the other
    engines give it. (Routing it around the processor with ``filter`` + ``union`` would run everything upstream, the
    Parquet reads and image encoding, twice: Ray Data plans each branch of a union separately.)
    """

    def __init__(self, processor: Any, keys: Sequence[str], completion: Callable[[dict[str, Any]], dict[str, Any]]):
        self.processor = processor
        self._normalise = functools.partial(_completion_row, completion=completion, columns=(*keys, *COMPLETION_COLUMNS))

    def __call__(self, dataset: Any) -> Any:
        return self.processor(dataset).map(self._normalise)

    def list_stage_names(self) -> list[str]:
        """The processor's stages in order (Ray's ``Processor.list_stage_names``)."""
        return self.processor.list_stage_names()

    def get_stage_by_name(self, name: str) -> Any:
        """One of the processor's stages (Ray's ``Processor.get_stage_by_name``)."""
        return self.processor.get_stage_by_name(name)


def _completion_row(row: dict[str, Any], completion: Callable[[dict[str, Any]], dict[str, Any]],
                    columns: Sequence[str]) -> dict[str, Any]:
    """A processor output row → exactly ``columns``. A row that skipped the postprocess (by the criterion of Ray's
    ``wrap_postprocess``: a non-empty ``__inference_error__``) is turned into its completion here, with the
    ``pre_error`` of a request that never reached the engine as its error."""
    if row.get(INFERENCE_ERROR, "") != "":
        failed = completion(row)
        if row.get("pre_error"):
            failed["error"] = row["pre_error"]
        row = failed
    return {c: row[c] for c in columns}


def build_vllm_chat_processor(
    cfg: DescribeConfig,
    keys: Sequence[str],
    *,
    config: Any = None,
    completion: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    stages: Sequence[Any] | None = None,
) -> VLLMChatProcessor:
    """A :class:`VLLMChatProcessor` over rows holding a ``request`` (chat messages as JSON, or ``{"pre_error": why}``)
    and ``keys`` to pass through. ``config`` defaults to :func:`vllm_processor_config`; ``completion`` (the
    postprocess, also applied to failed rows) to :func:`vllm_completion`. ``stages`` (Ray ``StatefulStage`` objects)
    replace the stages ``build_processor`` makes for ``config`` (vLLM and its tokenizer stages) in Ray's own
    ``Processor``: the seam for testing the row handling without a GPU."""
    from ray.data.llm import Processor, build_processor

    sampling = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    keys = tuple(keys)
    config = config if config is not None else vllm_processor_config(cfg)
    completion = completion or functools.partial(vllm_completion, keys=keys)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        request = json.loads(row["request"])
        passed = {k: row[k] for k in keys}
        if isinstance(request, dict) and "pre_error" in request:  # failed before the engine: enters as a failed row
            return {**passed, INFERENCE_ERROR: request["pre_error"], "pre_error": request["pre_error"]}
        # The empty error is explicit: rows of one block share a schema, and a key only the failed rows had would
        # read None here, which Ray's stages would take for a failure.
        return {**passed, "messages": request, "sampling_params": sampling, INFERENCE_ERROR: ""}

    if stages is None:
        processor = build_processor(config, preprocess=preprocess, postprocess=completion)
    else:
        processor = Processor(config, list(stages), preprocess=preprocess, postprocess=completion)
    return VLLMChatProcessor(processor, keys, completion)


def build_vllm_processor(cfg: DescribeConfig, *, stages: Sequence[Any] | None = None) -> VLLMChatProcessor:
    """The describe stage's engine: request rows (``uid``, ``path``, ``kind``, ``request`` JSON) → completion rows;
    ``stages`` as for :func:`build_vllm_chat_processor`."""
    return build_vllm_chat_processor(cfg, ("uid", "path", "kind"), stages=stages)
