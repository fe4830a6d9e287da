"""Run an API-format prompt through ComfyUI's own executor, in-process.

Used by the tests and by the headless runner (tools/run_workflow.py).
"""
from __future__ import annotations

import asyncio
import itertools

_ids = itertools.count()


def new_executor(server=None):
    """A PromptExecutor with the classic cache on either host: v0.33.0 reads cache_args["ram"] and
    ["ram_inactive"] even with the classic cache; v0.3.64 has no cache_args parameter."""
    import inspect

    import execution
    server = server or StubServer()
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                         cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)


class StubServer:
    """The little of PromptServer that PromptExecutor uses when no client is connected."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def __init__(self):
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))


def cached_outputs(executor, node_id: str) -> list:
    """The outputs of `node_id` in the executor's cache: v0.33.0's cache is async and holds a CacheEntry
    (ui, outputs); v0.3.64's returns the outputs list directly."""
    entry = executor.caches.outputs.get(node_id)
    if asyncio.iscoroutine(entry):
        entry = asyncio.run(entry)
    return entry.outputs if hasattr(entry, "outputs") else entry


class PromptFailed(AssertionError):
    """A prompt that did not validate or failed in a node, with ComfyUI's own message."""


def _validation_message(error: dict, node_errors: dict) -> str:
    details = "; ".join(f"node {node}: {e['message']} {e.get('details', '')}".strip()
                        for node, errors in node_errors.items() for e in errors.get("errors", []))
    return f"the prompt does not validate: {error.get('message', error)}. {details}".strip()


def run_prompt(prompt: dict, executor=None, prompt_id: str | None = None):
    """Validate and execute `prompt`; returns (executor, ui outputs by node id). Raises PromptFailed."""
    import execution
    prompt_id = prompt_id or f"test-{next(_ids)}"
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise PromptFailed(_validation_message(error, node_errors))
    executor = executor or new_executor()
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    if not executor.success:
        event, data = executor.status_messages[-1]
        raise PromptFailed(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                           f"{data.get('exception_message', data)}")
    return executor, executor.history_result["outputs"]


def run_prompt_expecting_error(prompt: dict) -> str:
    """Execute `prompt`, which must fail; returns the error message ComfyUI reports."""
    import execution
    prompt_id = f"test-{next(_ids)}"
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        return f"{error} {node_errors}"
    executor = new_executor()
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    if executor.success:
        raise AssertionError("the prompt was expected to fail but succeeded")
    event, data = executor.status_messages[-1]
    return data.get("exception_message", str(data))
