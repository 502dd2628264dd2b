"""Class descriptors from an MLLM: class names → DCLIP-format JSON ``{class: [visual descriptors]}``.

Description-based zero-shot evaluation (DCLIP / GRAIN) needs a few short visual descriptors per class. For the
synthetic world ``grain descriptors`` writes them from the ground truth; for any other dataset
:func:`describe_classes` asks the configured describe engine, one text-only request per class name (no image), and
parses each reply with :func:`grain.annotate.parse.parse_descriptions` exactly like image descriptions.

Engines (``DescribeConfig.engine``):

- ``openai``: the describe stage's :class:`~grain.annotate.engines.OpenAIChatEngine` (timeouts, retries with
  backoff) with ``describe.openai.concurrency`` requests in flight.
- ``transformers``: :class:`~grain.annotate.engines.TransformersChatEngine` in-process, one class at a time.
- ``vllm``: a ``ray.data.llm`` processor with the describe stage's vLLM settings over a dataset of class names
  (:func:`build_class_processor`); the multimodal stage is switched off since no request carries an image.
- ``reference`` has no model and is refused.

A class whose request fails keeps its key with an empty list, and the reason lands in
:attr:`ClassDescriptors.errors`: no class is ever dropped silently. With ``describe.temperature`` 0 (the default)
generation is greedy, so the same engine, model and prompt give the same JSON.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from grain.annotate.engines import ChatEngine, Completion
from grain.annotate.parse import parse_descriptions
from grain.annotate.prompts import Messages
from grain.config import DescribeConfig, RayConfig

log = logging.getLogger(__name__)

#: The question asked for every class; ``{c}`` is the class name, ``{k}`` (optional) the number of descriptors.
DEFAULT_CLASS_PROMPT = (
    "What are useful visual features for distinguishing a {c} in a photo? Answer with a dash list of short "
    "phrases (at most {k}), one feature per line, such as '- a long neck'. No other text."
)


@dataclass
class ClassDescriptors:
    """The outcome of :func:`describe_classes`.

    ``descriptors`` has every requested class, in the order given (``[]`` where the request failed or nothing usable
    came back); ``errors`` maps each failed class to the reason; ``raw`` maps each answered class to the engine's
    reply text, before parsing. ``engine``/``model``/``prompt`` record what produced it.
    """

    descriptors: dict[str, list[str]]
    errors: dict[str, str] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict)
    engine: str = ""
    model: str = ""
    prompt: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def answered(self) -> int:
        """How many classes got a reply from the engine (empty or not)."""
        return len(self.raw)

    @property
    def empty(self) -> list[str]:
        """Classes that got a reply from which no descriptor survived parsing."""
        return [c for c in self.raw if not self.descriptors.get(c)]

    def to_json(self, indent: int | None = 1) -> str:
        """DCLIP-format JSON: one key per class name in the given order, a list of descriptor strings each."""
        return json.dumps(self.descriptors, indent=indent, ensure_ascii=False)

    def summary(self) -> str:
        """One line for logs and the CLI: classes, failures, empty replies, descriptors per class."""
        counts = [len(v) for v in self.descriptors.values()]
        mean = sum(counts) / len(counts) if counts else 0.0
        return (f"{len(self.descriptors)} classes via {self.engine} ({self.model}): {len(self.errors)} failed, "
                f"{len(self.empty)} empty replies, {mean:.1f} descriptors per class")


def class_prompt(prompt: str, classname: str, max_descriptors: int) -> str:
    """The prompt for one class: ``{c}`` → the class name, ``{k}`` → ``max_descriptors`` (other braces kept)."""
    return prompt.replace("{c}", classname.strip()).replace("{k}", str(max_descriptors))


def class_messages(prompt: str, classname: str, max_descriptors: int) -> Messages:
    """One text-only user turn asking for the descriptors of ``classname``."""
    return [{"role": "user", "content": class_prompt(prompt, classname, max_descriptors)}]


def check_classnames(classnames: list[str]) -> list[str]:
    """The class names as a list, or ValueError naming the blank, non-string or duplicate ones.

    Names are compared after stripping surrounding whitespace (the request would be the same), case kept.
    """
    names = list(classnames)
    bad = [repr(c) for c in names if not isinstance(c, str)]
    if bad:
        raise ValueError(f"class names must be strings; got {', '.join(bad)}")
    blank = [i for i, c in enumerate(names) if not c.strip()]
    if blank:
        raise ValueError(f"blank class name(s) at position(s) {blank}: {[names[i] for i in blank]!r}")
    counts = Counter(c.strip() for c in names)
    dupes = [c for c, n in counts.items() if n > 1]
    if dupes:
        raise ValueError(f"duplicate class name(s): {', '.join(repr(c) for c in dupes)}")
    return names


def describe_classes(
    cfg: DescribeConfig,
    classnames: list[str],
    *,
    prompt: str = DEFAULT_CLASS_PROMPT,
    max_descriptors: int | None = None,
    progress: bool = False,
    ray_cfg: RayConfig | None = None,
) -> ClassDescriptors:
    """Ask ``cfg``'s engine for visual descriptors of every class name (text only) and parse the replies.

    ``prompt`` must contain ``{c}`` (the class name) and may contain ``{k}`` (``max_descriptors``, default
    ``cfg.max_descriptions``); each descriptor is cut to ``cfg.max_description_chars``. Generation uses
    ``cfg.max_tokens`` and ``cfg.temperature``. ``ray_cfg`` (vllm only; default a local Ray) says where the
    processor runs, as for the describe stage. Raises ValueError for the reference engine, for blank or duplicate
    class names and for a prompt without ``{c}``; a failed request never raises (see :class:`ClassDescriptors`).
    """
    if cfg.engine == "reference":
        raise ValueError(
            "describe.engine='reference' has no model to ask for class descriptors: set describe.engine to openai, "
            "transformers or vllm (for the synthetic world, `grain descriptors` writes the ground-truth ones)"
        )
    if "{c}" not in prompt:
        raise ValueError("the class prompt must contain the placeholder {c} (the class name)")
    k = cfg.max_descriptions if max_descriptors is None else max_descriptors
    if k < 1:
        raise ValueError(f"max_descriptors must be at least 1 (got {k})")
    names = check_classnames(classnames)
    result = ClassDescriptors({c: [] for c in names}, engine=cfg.engine, model=cfg.model, prompt=prompt)
    if not names:
        return result
    conversations = [class_messages(prompt, c, k) for c in names]

    if cfg.engine == "vllm":
        completions = _run_vllm(cfg, names, conversations, ray_cfg or RayConfig())
    else:
        completions = _run_chat_engine(cfg, conversations, progress)

    for name, completion in zip(names, completions):
        result.prompt_tokens += completion.prompt_tokens
        result.completion_tokens += completion.completion_tokens
        if completion.error is not None or completion.text is None:
            result.errors[name] = f"class {name!r}: {completion.error or 'no reply'}"
            continue
        result.raw[name] = completion.text
        result.descriptors[name] = parse_descriptions(
            completion.text, k, cfg.max_description_chars, prompt=class_prompt(prompt, name, k)
        )
    if result.errors:
        log.warning("describe-classes: %d of %d requests failed, e.g. %s", len(result.errors), len(names),
                    next(iter(result.errors.values())))
    return result


# ------------------------------------------------------------------------------------------------ chat engines


def _make_chat_engine(cfg: DescribeConfig) -> ChatEngine:
    from grain.annotate.engines import OpenAIChatEngine, TransformersChatEngine

    if cfg.engine == "openai":
        return OpenAIChatEngine(cfg)
    if cfg.engine == "transformers":
        return TransformersChatEngine(cfg)
    raise ValueError(f"describe.engine={cfg.engine!r} has no in-process chat engine")


def _run_chat_engine(cfg: DescribeConfig, conversations: list[Messages], progress: bool) -> list[Completion]:
    """One completion per conversation, in order: concurrently for openai, one by one for transformers.

    Each class goes to the engine as its own ``chat`` call so the progress bar moves per class; for openai at most
    ``cfg.openai.concurrency`` calls run at once, which is also the engine's own connection limit.
    """
    from grain.progress import NullProgress
    from grain.progress import progress as reporter

    engine = _make_chat_engine(cfg)
    bar = reporter(len(conversations), f"describe-classes[{cfg.engine}]", "class", enabled=progress) or NullProgress()
    out: list[Completion | None] = [None] * len(conversations)

    def ask(messages: Messages) -> Completion:
        try:
            return engine.chat([messages], cfg.max_tokens, cfg.temperature)[0]
        except Exception as exc:  # noqa: BLE001 - engines should not raise, but a class keeps its error if one does
            return Completion(None, f"{cfg.engine} engine: {type(exc).__name__}: {exc}")

    try:
        if cfg.engine == "openai" and len(conversations) > 1:
            with ThreadPoolExecutor(max_workers=cfg.openai.concurrency, thread_name_prefix="classes") as pool:
                futures = {pool.submit(ask, m): i for i, m in enumerate(conversations)}
                for future in as_completed(futures):
                    out[futures[future]] = future.result()
                    bar.update(1)
        else:
            for i, messages in enumerate(conversations):
                out[i] = ask(messages)
                bar.update(1)
    finally:
        bar.close()
        engine.close()
    return [c if c is not None else Completion(None, "no reply") for c in out]


# ------------------------------------------------------------------------------------------------ vllm (GPU)


def class_processor_config(cfg: DescribeConfig) -> Any:
    """The describe stage's ``vLLMEngineProcessorConfig`` with the multimodal stage off (class requests are text)."""
    from grain.annotate.engines import vllm_processor_config

    base = vllm_processor_config(cfg)
    return type(base)(**{**base.model_dump(), "prepare_multimodal_stage": {"enabled": False}})


def class_request_row(index: int, classname: str, messages: Messages) -> dict[str, Any]:
    """The dataset row for one class: its position, its name and the chat messages as JSON text."""
    return {"index": index, "classname": classname, "request": json.dumps(messages)}


def class_completion(row: dict[str, Any]) -> dict[str, Any]:
    """A ``ray.data.llm`` output row → ``index``, ``classname``, ``text`` / ``error`` and token counts."""
    from grain.annotate.engines import vllm_completion

    return {**vllm_completion(row, ("classname",)), "index": int(row["index"])}


def build_class_processor(cfg: DescribeConfig, *, stages: Sequence[Any] | None = None) -> Any:
    """A Ray Data engine: class rows (:func:`class_request_row`) → one completion row (:func:`class_completion`)
    each, a failed request included (:class:`~grain.annotate.engines.VLLMChatProcessor`); ``stages`` replaces the
    processor's vLLM stages (tests)."""
    from grain.annotate.engines import build_vllm_chat_processor

    return build_vllm_chat_processor(cfg, ("index", "classname"), config=class_processor_config(cfg),
                                     completion=class_completion, stages=stages)


def _run_vllm(cfg: DescribeConfig, names: list[str], conversations: list[Messages], ray_cfg: RayConfig) -> list[Completion]:
    """Run the class processor over all classes inside :func:`grain.annotate.streaming.ray_session` (the running
    Ray, ``ray_cfg.address``, or a local one on the loopback); completions in class order."""
    import ray.data

    from grain.annotate.streaming import ray_session

    rows = [class_request_row(i, n, m) for i, (n, m) in enumerate(zip(names, conversations))]
    by_index: dict[int, Completion] = {}
    try:
        with ray_session(ray_cfg):
            processor = build_class_processor(cfg)
            for row in processor(ray.data.from_items(rows)).take_all():
                by_index[int(row["index"])] = Completion(row["text"], row["error"], row["prompt_tokens"], row["completion_tokens"])
    except Exception as exc:  # noqa: BLE001 - a failed job keeps every class, each with the job's error
        reason = f"vllm job failed: {type(exc).__name__}: {exc}"
        return [Completion(None, reason) for _ in names]
    return [by_index.get(i, Completion(None, "vllm: no output row")) for i in range(len(names))]
