"""Run an API-format prompt through ComfyUI's own executor, in-process (comfyui-host.md §6.4)."""
from __future__ import annotations

import asyncio
import itertools

_ids = itertools.count()


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


class PromptFailed(AssertionError):
    pass


def run_prompt(prompt: dict, executor=None):
    """Validate and execute `prompt`; returns (executor, ui outputs by node id). Raises on failure."""
    import execution
    prompt_id = f"test-{next(_ids)}"
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise PromptFailed(f"prompt did not validate: {error} {node_errors}")
    executor = executor or execution.PromptExecutor(StubServer(), cache_type=execution.CacheType.CLASSIC)
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    if not executor.success:
        raise PromptFailed(f"prompt failed: {executor.status_messages[-1]}")
    return executor, executor.history_result["outputs"]


def run_prompt_expecting_error(prompt: dict) -> str:
    """Execute `prompt`, which must fail; returns the error message ComfyUI reports."""
    import execution
    prompt_id = f"test-{next(_ids)}"
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        return f"{error} {node_errors}"
    executor = execution.PromptExecutor(StubServer(), cache_type=execution.CacheType.CLASSIC)
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    if executor.success:
        raise AssertionError("the prompt was expected to fail but succeeded")
    event, data = executor.status_messages[-1]
    return data.get("exception_message", str(data))
