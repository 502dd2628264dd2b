"""FAULT INJECTOR at the ``ray.data.llm`` processor boundary: a Ray ``StatefulStage`` that stands in for the stages
of a vLLM processor (multimodal preparation, chat template, tokenizer, vLLM engine, detokenizer), so the processor's
row handling can be tested without a GPU or vLLM.

This is a test fake, for fault injection only. It replaces the processor's *stages* and nothing else: Ray's real
``Processor``, ``wrap_preprocess`` / ``wrap_postprocess``, the ``StatefulStage`` / ``StatefulStageUDF`` machinery
(batching, row alignment, the bypass of rows already failed), and grain's own preprocess, postprocess and
normalisation all run for real (``build_vllm_chat_processor(..., stages=[...])``).

What it returns is what Ray 2.60's vLLM stage returns (``vLLMEngineStageUDF._generate_with_error_handling``, then
the detokenizer):

- an answered row: a ``vLLMOutputData`` with ``generated_text`` = the configured ``reply`` (and token counts), plus
  ``request_id``, ``batch_uuid``, ``time_taken_llm``, ``params`` and ``__inference_error__ = ""``;
- a row chosen to fail (its ``fail_column`` value is in ``fail_values``): exactly the per-row failure of
  ``should_continue_on_error=True``: empty outputs (``generated_text=""``, no tokens), ``request_id=-1``, and
  ``__inference_error__ = "RuntimeError: <error>"``.

Like the real stages it refuses a row whose ``messages`` are not a chat (a list of role/content turns): that
fails the whole job, as vLLM's multimodal preparation or chat template would. Every row it sees is appended to
``seen_log`` (one JSON object per line: the ``log_columns`` of the row), so a test can say which requests reached
the engine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import ray
from ray.llm._internal.batch.stages import StatefulStage
from ray.llm._internal.batch.stages.base import StatefulStageUDF


class FaultLLMStageUDF(StatefulStageUDF):
    """The stand-in engine: one output row per input row, answered or failed by the rule above."""

    def __init__(self, data_column: str, expected_input_keys: list[str], *, reply: str, fail_column: str,
                 fail_values: list[Any], error: str, seen_log: str, log_columns: list[str]):
        super().__init__(data_column, expected_input_keys)
        self.reply = reply
        self.fail_column = fail_column
        self.fail_values = set(fail_values)
        self.error = error
        self.seen_log = seen_log
        self.log_columns = log_columns

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData

        batch_uuid = uuid.uuid4().hex
        with open(self.seen_log, "a") as log:
            for row in batch:
                log.write(json.dumps({c: row.get(c) for c in self.log_columns}) + "\n")
        for row in batch:
            prompt = _chat_text(row["messages"])
            common = {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "batch_uuid": batch_uuid}
            if row.get(self.fail_column) in self.fail_values:
                yield {**vLLMOutputData(prompt=prompt, prompt_token_ids=None, num_input_tokens=0).model_dump(),
                       **common, "request_id": -1, "time_taken_llm": -1, "params": "",
                       "__inference_error__": f"RuntimeError: {self.error}"}
                continue
            prompt_ids = list(range(len(prompt.split())))
            generated = list(range(len(self.reply.split())))
            yield {**vLLMOutputData(prompt=prompt, prompt_token_ids=prompt_ids, num_input_tokens=len(prompt_ids),
                                    generated_tokens=generated, generated_text=self.reply,
                                    num_generated_tokens=len(generated)).model_dump(),
                   **common, "request_id": row[self.IDX_IN_BATCH_COLUMN], "time_taken_llm": 0.0,
                   "params": str(row.get("sampling_params")), "__inference_error__": ""}


def _chat_text(messages: Any) -> str:
    """The text parts of a chat; ValueError (failing the job, as the real stages would) if it is not a chat."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Iterable):
        raise ValueError(f"messages is not a chat: {str(messages)[:200]}")
    texts = []
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"chat turn without role/content: {str(turn)[:200]}")
        content = turn["content"]
        parts = [content] if isinstance(content, str) else [p.get("text") or "" for p in content]
        texts.extend(parts)
    return " ".join(texts)


class FaultLLMStage(StatefulStage):
    """A processor stage running :class:`FaultLLMStageUDF` (one actor)."""

    fn: type[StatefulStageUDF] = FaultLLMStageUDF

    def get_required_input_keys(self) -> dict[str, str]:
        return {"messages": "the chat (preprocess output)", "sampling_params": "generation settings"}


def fault_llm_stage(*, reply: str, fail_column: str, fail_values: Iterable[Any] = (), seen_log: str,
                    error: str = "injected fault: the engine failed on this row", log_columns: Iterable[str] = (),
                    num_cpus: float = 0.5) -> FaultLLMStage:
    """The FAULT INJECTOR stage: answers ``reply``, fails the rows whose ``fail_column`` is in ``fail_values`` with
    ``error``, logs ``log_columns`` (default: ``fail_column``) of every row it sees to ``seen_log``; its actor takes
    ``num_cpus`` (fractional: a whole CPU per actor deadlocks a 2-core machine)."""
    return FaultLLMStage(
        fn_constructor_kwargs={"reply": reply, "fail_column": fail_column, "fail_values": list(fail_values),
                               "error": error, "seen_log": str(seen_log),
                               "log_columns": list(log_columns) or [fail_column]},
        map_batches_kwargs={"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": num_cpus},
    )


def seen_rows(seen_log: str) -> list[dict[str, Any]]:
    """The rows the stage has seen so far (its log), in the order it saw them."""
    try:
        with open(seen_log) as log:
            return [json.loads(line) for line in log]
    except FileNotFoundError:
        return []

