"""Running requests by id -> the task serving each, so they can be aborted by id or all at once."""

from __future__ import annotations

import asyncio

from cache.api.errors import bad_request


class RequestTracker:
    """Event-loop only. A request is tracked from admission until its handler's ``finally``."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task] = {}
        self._aborted: set[str] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, request_id: str) -> None:
        if request_id in self._tasks:
            raise bad_request(f"request id {request_id!r} is already running", "rid")
        task = asyncio.current_task()
        assert task is not None
        self._tasks[request_id] = task

    def remove(self, request_id: str) -> None:
        self._tasks.pop(request_id, None)
        self._aborted.discard(request_id)

    def abort(self, request_id: str) -> bool:
        task = self._tasks.get(request_id)
        if task is None or request_id in self._aborted:
            return False
        self._aborted.add(request_id)
        task.cancel(msg=f"request {request_id} aborted")
        return True

    def abort_all(self) -> int:
        return sum(self.abort(request_id) for request_id in list(self._tasks))

    def was_aborted(self, request_id: str) -> bool:
        return request_id in self._aborted
