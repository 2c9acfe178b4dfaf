"""Single-flight model loads, at most ``max_concurrent`` at once per upstream, each within a timeout.

LM Studio loads a model just in time for every request that names it while it is not loaded; N
concurrent first requests can load N instances (lmstudio-bug-tracker#1751), and two big loads at
once run out of memory. So lmgate loads models itself, once: the first request for a model that is
not loaded starts a :class:`LoadJob`, later ones join it, and a semaphore lets at most
``max_concurrent`` jobs talk to the upstream at a time (the others wait their turn, shown as
``loading`` with the full ETA).

A load must outlive the request that started it: a client that leaves (NGINX's timeout, a user
closing the tab) must not waste the load for the others, nor for its own retry. Jobs therefore run
in a task group owned by the gateway (opened by its ASGI lifespan, :meth:`Loader.attach`). Mounted
without lifespan events there is no such group; the request that started a job then runs it itself,
shielded from cancellation, and a client that leaves is let go once the load ends.

Each load gets ``timeout_s`` once it has its turn; a load that does not finish in time, or that the
upstream refuses, fails every waiting request with the upstream's message (``model_load_failed``).
Just before loading, the upstream's listing is re-read: a model loaded meanwhile (by another client,
or LM Studio's own JIT) is not loaded twice, since a second ``/api/v1/models/load`` would add an
instance.

With ``shared`` (a :class:`~gateway.models.shared.SharedLoads`, Redis through gateway/state), a
job first claims the model's load across every replica: the replica that wins it loads as above
and publishes the outcome; the others follow that load (the job stays ``loading``, its requests
get their heartbeats) and end with its outcome: loaded, or failed with the same message. While
the store cannot decide, each replica loads on its own, as without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from gateway.models.registry import ModelRegistry
from gateway.models.shared import Claim, SharedLoads
from gateway.models.upstream import Listed, LoadError, UpstreamModels
from gateway.proxy.upstream_errors import describe

logger = logging.getLogger("lmgate.models")

#: Pauses between the questions of a replica following another's load: short at first (a load
#: that was nearly done), growing to a bound (one question per half second for a long load).
_FOLLOW_MIN_S = 0.05
_FOLLOW_MAX_S = 0.5


@dataclass(eq=False)
class LoadJob:
    """One load of one model, shared by every request waiting for it."""

    model: str
    asked_at: float  # anyio time
    began_at: float | None = None  # when it got its turn (the semaphore)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: str | None = None  # the upstream's message, or why lmgate gave up
    seconds: float | None = None  # the load's duration (LM Studio's own figure when it gives one)
    instance: str | None = None  # the instance id the upstream reported
    loaded_here: bool = False  # False when the model turned out to be loaded already (by ``owner`` too)
    in_background: bool = False  # runs in the gateway's task group, else its creator runs it
    owner: str | None = None  # the replica that ran the load, when another one did (shared loads)

    @property
    def finished(self) -> bool:
        return self.done.is_set()


class Loader:
    """Starts, shares and runs loads; see the module docstring."""

    def __init__(
        self,
        registry: ModelRegistry,
        upstream: UpstreamModels,
        *,
        max_concurrent: int = 1,
        timeout_s: float = 300.0,
        ttl_for: Callable[[str], float | None] = lambda model: None,
        on_finished: Callable[[LoadJob], None] | None = None,
        shared: SharedLoads | None = None,
    ) -> None:
        self.registry = registry
        self.on_finished = on_finished
        self.upstream = upstream
        self.max_concurrent = max_concurrent
        self.timeout_s = timeout_s
        self.ttl_for = ttl_for
        self.jobs: dict[str, LoadJob] = {}
        self.shared = shared  # loads claimed across replicas; None: this process alone
        self._turns = anyio.Semaphore(max_concurrent)
        self._task_group: TaskGroup | None = None

    # -- ownership ------------------------------------------------------------------------------

    def attach(self, task_group: TaskGroup) -> None:
        """Run loads in ``task_group`` from now on (the gateway's lifespan)."""
        self._task_group = task_group

    def detach(self) -> None:
        self._task_group = None

    @property
    def in_background(self) -> bool:
        """Whether loads run in the gateway's task group (else in the requester's task)."""
        return self._task_group is not None

    # -- loads ----------------------------------------------------------------------------------

    def start(self, model: str) -> tuple[LoadJob, bool]:
        """The job loading ``model``: the one under way, or a new one. True if this call created it.

        A new job starts at once in the background task group; without one, its creator must run
        it with :meth:`wait` (``runner=True``).
        """
        job = self.jobs.get(model)
        if job is not None:
            return job, False
        job = self.jobs[model] = LoadJob(model, asked_at=anyio.current_time())
        self.registry.load_started(model, job.asked_at)
        if self._task_group is not None:
            job.in_background = True
            self._task_group.start_soon(self._run, job)
        return job, True

    async def wait(self, job: LoadJob, *, runner: bool) -> None:
        """Wait until ``job`` ends. Its creator runs it, shielded, when there is no task group."""
        if runner and not job.in_background and not job.finished:
            with anyio.CancelScope(shield=True):
                await self._run(job)
        else:
            await job.done.wait()

    async def load(self, model: str) -> LoadJob:
        """Load ``model`` (or join its load) and wait for the outcome; see ``job.error``."""
        job, created = self.start(model)
        await self.wait(job, runner=created)
        return job

    @property
    def loading(self) -> list[str]:
        """Models loading now: this replica's jobs, and loads under way on other replicas."""
        elsewhere = self.shared.elsewhere() if self.shared is not None else {}
        return sorted({*self.jobs, *elsewhere})

    async def _run(self, job: LoadJob) -> None:
        claim: Claim | None = None
        try:
            if self.shared is not None:
                with anyio.fail_after(self.timeout_s):
                    claim = await self._follow(job)
                if job.owner is not None:
                    return  # another replica loaded it (or failed to): its outcome is the job's
            async with self._turns:
                job.began_at = anyio.current_time()
                with anyio.fail_after(self.timeout_s):
                    await self._load(job)
        except TimeoutError:
            job.error = (
                f'The model "{job.model}" did not finish loading within models.load_timeout_s '
                f"({self.timeout_s:g} s)."
            )
        except LoadError as exc:
            job.error = exc.message
        except Exception as exc:  # a background task must not take the gateway's task group down
            logger.exception("loading model %s failed unexpectedly", job.model, extra={"event": "model_load_failed"})
            job.error = f"lmgate failed to load the model: {describe(exc)}"
        finally:
            if job.error is None and job.seconds is None:
                job.error = "lmgate stopped before the model finished loading."
            if claim is not None and self.shared is not None:
                with anyio.CancelScope(shield=True):  # bounded by the store's own deadline
                    seconds = job.seconds if job.loaded_here else None  # None: found loaded, nothing to learn
                    await self.shared.finish(claim, error=job.error, instance=job.instance, seconds=seconds)
            self._finish(job)

    async def _follow(self, job: LoadJob) -> Claim | None:
        """Claim the model's load across replicas, or follow another replica's to its outcome.

        Returns the claim when this replica is to load (None: the store cannot decide, load
        alone). After following, ``job.owner`` names the replica that loaded, and the job holds
        its outcome.
        """
        assert self.shared is not None
        following: str | None = None
        pause_s = _FOLLOW_MIN_S
        while True:
            claim = await self.shared.claim(job.model, expected_s=self.registry.expected_load_s(job.model), following=following)
            if claim is None or claim.mine:
                return claim
            load = claim.load
            if load.state == "loading":
                if following != load.token:
                    following = load.token
                    job.began_at = anyio.current_time() - load.elapsed_s  # for the ETA in heartbeats
                    logger.info(
                        "model %s is loading on another replica; waiting for it", job.model,
                        extra={"event": "model_load_follow", "model": job.model, "replica": load.owner},
                    )  # fmt: skip
                await anyio.sleep(pause_s)
                pause_s = min(pause_s * 1.5, _FOLLOW_MAX_S)
                continue
            job.owner = load.owner
            if load.state == "failed":
                job.error = load.error or f'Loading the model "{job.model}" failed on another lmgate replica.'
            else:
                # A real load there (not "found loaded already") teaches this replica its duration.
                job.loaded_here = load.seconds is not None
                job.seconds, job.instance = load.seconds if load.seconds is not None else 0.0, load.instance
            return None

    async def _load(self, job: LoadJob) -> None:
        await self.registry.refresh(force=True)
        if self.registry.state(job.model) == "loaded":
            job.seconds = 0.0  # loaded meanwhile, by someone else
            return
        listed = self.registry.record(job.model).listed or Listed(job.model)
        logger.info("loading model %s", job.model, extra={"event": "model_load_start", "model": job.model})
        assert job.began_at is not None
        job.instance, reported = await self.upstream.load(listed, ttl_s=self.ttl_for(job.model))
        job.seconds = reported if reported is not None else anyio.current_time() - job.began_at
        job.loaded_here = True

    def _finish(self, job: LoadJob) -> None:
        if self.jobs.get(job.model) is job:
            del self.jobs[job.model]
        self.registry.load_finished(
            job.model,
            instance=job.instance,
            seconds=job.seconds if job.loaded_here else None,
            error=job.error,
        )
        if job.owner is not None:
            logger.info(
                "model %s %s on another replica", job.model, "failed to load" if job.error else "loaded",
                extra={"event": "model_load_followed", "model": job.model, "replica": job.owner, "error": job.error},
            )  # fmt: skip
        elif job.error is not None:
            logger.warning(
                "loading model %s failed: %s", job.model, job.error,
                extra={"event": "model_load_failed", "model": job.model},
            )
        elif job.loaded_here:
            logger.info(
                "model %s loaded in %.1f s", job.model, job.seconds or 0.0,
                extra={"event": "model_load_end", "model": job.model, "load_s": job.seconds},
            )
        job.done.set()
        # Counted once, by the replica that loaded (telemetry's loads and failures).
        if self.on_finished is not None and job.owner is None and (job.loaded_here or job.error is not None):
            self.on_finished(job)
