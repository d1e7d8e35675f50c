"""Views: how work is sent — load-balanced, or to chosen engines.

``LoadBalancedView`` sends each task through the ROUTER->DEALER relay, which
hands it to the next engine in turn; ``DirectView`` addresses engines by id
through the ROUTER->ROUTER relay.  Both offer ``apply`` / ``apply_async`` /
``apply_sync`` and ``map`` / ``map_async`` / ``map_sync``; ``apply`` and
``map`` follow ``block`` (False by default, like ipyparallel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from monq.client.results import AsyncMapResult, AsyncResult
from monq.errors import MonqError

if TYPE_CHECKING:
    from monq.client.client import Client


def _map_chunk(f: Callable[..., Any], *columns: Sequence[Any]) -> list[Any]:
    """Run on the engine: ``f`` over one chunk of the mapped sequences."""
    return [f(*args) for args in zip(*columns)]


def _chunks(seqs: Sequence[Sequence[Any]], chunksize: int) -> list[list[list[Any]]]:
    n = min(len(s) for s in seqs)
    return [[list(s[i : i + chunksize]) for s in seqs] for i in range(0, n, chunksize)]


class View:
    """What both views share: flags, map built on apply."""

    def __init__(self, client: Client, block: bool = False, label: str | None = None,
                 timeout: float | None = None) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.client = client
        #: the client's waiter, bound once (not a bound method per AsyncResult in a burst)
        self._waiter = client._wait_for
        self.block = block
        self.label = label
        #: seconds a task may run before it is ended and recorded ``timeout``
        self.timeout = timeout

    def _submit(self, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                sync: bool = False) -> list[Any]:
        """Send the task(s); ``sync``: the caller waits for them next (and receives
        their replies itself, see Client._wait_for)."""
        raise NotImplementedError

    def _n_workers(self) -> int:
        raise NotImplementedError

    def apply_async(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncResult:
        """Submit ``f(*args, **kwargs)``; return its AsyncResult at once."""
        children = self._submit(f, args, kwargs)
        return AsyncResult(children, single=self._single(), waiter=self._waiter)

    def apply_sync(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)`` and return its result (or raise its RemoteError)."""
        children = self._submit(f, args, kwargs, sync=True)
        return AsyncResult(children, single=self._single(), waiter=self._waiter).get()

    def apply(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return (self.apply_sync if self.block else self.apply_async)(f, *args, **kwargs)

    def _single(self) -> bool:
        return True

    def map_async(self, f: Callable[..., Any], *seqs: Iterable[Any], chunksize: int | None = None,
                  ordered: bool = True) -> AsyncMapResult:
        """Apply ``f`` to every item (or tuple of items) of ``seqs``, in chunks.

        ``chunksize`` items go in one task; by default the work is cut into
        about eight chunks per engine.  With ``ordered=False`` the results
        come in the order chunks finish.
        """
        return self._map(f, seqs, chunksize, ordered, sync=False)

    def _map(self, f: Callable[..., Any], seqs: Sequence[Iterable[Any]], chunksize: int | None,
             ordered: bool, sync: bool) -> AsyncMapResult:
        if not seqs:
            raise TypeError("map needs at least one sequence")
        lists = [s if isinstance(s, Sequence) else list(s) for s in seqs]
        n = min(len(s) for s in lists)
        if chunksize is None:
            chunksize = max(1, math.ceil(n / (max(1, self._n_workers()) * 8)))
        if chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        children = self._submit_chunks(f, _chunks(lists, chunksize), sync)
        return AsyncMapResult(children, ordered=ordered, waiter=self._waiter)

    def _submit_chunks(self, f: Callable[..., Any], chunks: list[list[list[Any]]],
                       sync: bool = False) -> list[Any]:
        out: list[Any] = []
        for cols in chunks:
            out += self._submit(_map_chunk, (f, *cols), {}, sync)
        return out

    def map_sync(self, f: Callable[..., Any], *seqs: Iterable[Any], chunksize: int | None = None,
                 ordered: bool = True) -> list[Any]:
        return self._map(f, seqs, chunksize, ordered, sync=True).get()  # type: ignore[no-any-return]

    def map(self, f: Callable[..., Any], *seqs: Iterable[Any], **kw: Any) -> Any:
        return (self.map_sync if self.block else self.map_async)(f, *seqs, **kw)

    def imap(self, f: Callable[..., Any], *seqs: Iterable[Any], **kw: Any) -> Any:
        """Iterate over ``map``'s results as they come."""
        return iter(self.map_async(f, *seqs, **kw))


class LoadBalancedView(View):
    """Tasks go to whichever engine is free next (ROUTER->DEALER relay)."""

    def __init__(self, client: Client, block: bool = False, label: str | None = None,
                 retries: int = 0, timeout: float | None = None) -> None:
        super().__init__(client, block, label, timeout)
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, not {retries!r}")
        #: how many more times a task may run after its engine died under it or it
        #: overran ``timeout``
        self.retries = retries

    def _submit(self, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                sync: bool = False) -> list[Any]:
        return [self.client._send_apply("task", f, args, kwargs, label=self.label,
                                        retries=self.retries, timeout=self.timeout, sync=sync)]

    def apply_async(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncResult:
        """Submit ``f(*args, **kwargs)``; return its AsyncResult at once."""
        # one task, one future: made with the task (a burst calls this once per task)
        ar: AsyncResult = self.client._submit_task("task", f, args, kwargs, None, self.label,
                                                   self.retries, self.timeout, False, True,
                                                   self._waiter)
        return ar

    def apply_sync(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)`` and return its result (or raise its RemoteError)."""
        return self.client._submit_task("task", f, args, kwargs, None, self.label,
                                        self.retries, self.timeout, True, True,
                                        self._waiter).get()

    def _n_workers(self) -> int:
        return max(1, len(self.client.ids))

    def __repr__(self) -> str:
        return "<LoadBalancedView>"


class DirectView(View):
    """Tasks go to the engines named by ``targets`` (ROUTER->ROUTER relay)."""

    def __init__(self, client: Client, targets: int | list[int], block: bool = False,
                 label: str | None = None, timeout: float | None = None) -> None:
        super().__init__(client, block, label, timeout)
        self.targets = targets
        self._target_list = [targets] if isinstance(targets, int) else list(targets)
        if not self._target_list:
            raise MonqError("no engines to target")

    def _single(self) -> bool:
        return isinstance(self.targets, int)

    def _n_workers(self) -> int:
        return len(self._target_list)

    def _submit(self, f: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                sync: bool = False) -> list[Any]:
        return [self.client._send_apply("direct", f, args, kwargs, engine=t, label=self.label,
                                        timeout=self.timeout, sync=sync)
                for t in self._target_list]

    def apply_async(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncResult:
        """Submit ``f(*args, **kwargs)`` to every target; return its AsyncResult at once."""
        if not isinstance(self.targets, int):
            return super().apply_async(f, *args, **kwargs)
        # one engine, one task: its AsyncResult made with it, as on a load-balanced view
        ar: AsyncResult = self.client._submit_task("direct", f, args, kwargs, self.targets,
                                                   self.label, 0, self.timeout, False, True,
                                                   self._waiter)
        return ar

    def _submit_chunks(self, f: Callable[..., Any], chunks: list[list[list[Any]]],
                       sync: bool = False) -> list[Any]:
        # spread chunks over the targets in turn
        out = []
        for i, cols in enumerate(chunks):
            t = self._target_list[i % len(self._target_list)]
            out.append(self.client._send_apply("direct", _map_chunk, (f, *cols), {}, engine=t,
                                               label=self.label, timeout=self.timeout,
                                               sync=sync))
        return out

    def execute(self, code: str) -> AsyncResult:
        """Run Python source on every target, in its ``__main__`` namespace."""
        return self.apply_async(_execute, code)

    def push(self, ns: dict[str, Any]) -> AsyncResult:
        """Set global names on every target."""
        return self.apply_async(_push, ns)

    def pull(self, names: str | Sequence[str]) -> AsyncResult:
        """Read global names from every target."""
        return self.apply_async(_pull, names)

    def scatter(self, name: str, seq: Sequence[Any]) -> AsyncResult:
        """Split ``seq`` into one contiguous part per target and set it as ``name`` there."""
        n = len(self._target_list)
        size, extra = divmod(len(seq), n)
        children: list[Any] = []
        start = 0
        for i, t in enumerate(self._target_list):
            end = start + size + (1 if i < extra else 0)
            part = seq[start:end]
            children.append(self.client._send_apply("direct", _push, ({name: part},), {},
                                                    engine=t, label=self.label,
                                          timeout=self.timeout))
            start = end
        return AsyncResult(children, single=False, waiter=self._waiter)

    def gather(self, name: str) -> AsyncResult:
        """Read ``name`` from every target and join the parts (lists, or numpy arrays)."""
        children = self._submit(_pull, (name,), {})
        return AsyncResult(children, single=False, reduce=_join, waiter=self._waiter)

    def __repr__(self) -> str:
        return f"<DirectView {self.targets!r}>"


def _join(parts: list[Any]) -> Any:
    if parts and all(type(p).__module__ == "numpy" and hasattr(p, "ndim") for p in parts):
        import numpy as np

        return np.concatenate(parts)
    out: list[Any] = []
    for p in parts:
        out.extend(p)
    return out


def _execute(code: str) -> None:
    import __main__

    exec(compile(code, "<monq execute>", "exec"), __main__.__dict__)


def _push(ns: dict[str, Any]) -> None:
    import __main__

    __main__.__dict__.update(ns)


def _pull(names: str | Sequence[str]) -> Any:
    import __main__

    g = __main__.__dict__
    if isinstance(names, str):
        return g[names]
    return [g[n] for n in names]
