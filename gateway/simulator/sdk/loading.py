"""The model endpoints of the ``llm`` and ``embedding`` namespaces, and ``system``'s listing.

* ``getOrLoad`` (``client.llm.model("key")``): an instance already loaded under that identifier or
  model key answers ``alreadyLoaded``; otherwise a JIT load (shared with a JIT load under way, TTL
  ``loadTtlMs``, Auto-Evict of other JIT models, each reported as ``unloadingOtherJITModel``), with
  ``startLoading``, ``loadProgress`` at quarters of the load delay and ``loadSuccess``.
* ``loadModel`` (``load_new_instance``): always a new, non-JIT instance (``key:2`` if taken, or
  the ``identifier`` asked for), never evicted; ``resolved``, ``progress``, ``success``.
* ``unloadModel``, ``listLoaded``, ``getModelInfo``, ``getLoadConfig``; ``listDownloadedModels``.

Loads go through the simulator's model manager, so the load delay, the ``load_failure`` and
``load_hang`` faults and the load counters are the HTTP routes' own.
"""

from __future__ import annotations

from typing import Any

import anyio

from gateway.simulator.errors import SimError
from gateway.simulator.models import Instance, Load
from gateway.simulator.sdk.session import Channel, Session
from gateway.simulator.sdk.wire import (
    SdkError,
    config_fields,
    domain,
    domain_mismatch,
    identifier_not_found,
    instance_info,
    load_config,
    model_info,
    model_path,
    no_model_matching,
    path_not_found,
)
from gateway.simulator.signals import Signals
from gateway.simulator.spec import SimModel

PROGRESS_STEPS = (0.25, 0.5, 0.75)


def _parameter(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SdkError("Invalid parameter: expected an object.")
    return value


def _string(parameter: dict[str, Any], key: str) -> str:
    value = parameter.get(key)
    if not isinstance(value, str) or not value:
        raise SdkError(f'Invalid parameter: "{key}" must be a non-empty string.')
    return value


def _ttl_s(value: Any) -> float | None:
    return value / 1000 if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def loaded_in(session: Session) -> list[Instance]:
    return [i for i in session.ctx.manager.instances if domain(i.model) == session.namespace]


def find_instance(session: Session, specifier: Any) -> Instance:
    """The loaded instance a ``modelSpecifier`` names: ``{"type": "instanceReference", ...}`` or a
    ``{"type": "query", "query": {"identifier", "path"}}`` matched on identifier, then model key.
    Queries match loaded models only: a prediction never loads one (``client.llm.model`` does)."""
    candidates = loaded_in(session)
    spec = specifier if isinstance(specifier, dict) else {}
    if spec.get("type") == "instanceReference":
        found = next((i for i in candidates if i.reference == spec.get("instanceReference")), None)
        if found is None:
            raise SdkError("Model unloaded.", display={"code": "generic.specificModelUnloaded"})
        return found
    query = spec.get("query") if isinstance(spec.get("query"), dict) else {}
    assert isinstance(query, dict)
    matches = candidates
    if isinstance(name := query.get("identifier"), str):
        matches = [i for i in matches if i.identifier == name] or [i for i in matches if i.model.id == name]
    if isinstance(path := query.get("path"), str):
        matches = [i for i in matches if path in (i.model.id, model_path(i.model))]
    if not matches:
        raise no_model_matching(query, [i.identifier for i in candidates])
    return min(matches, key=lambda i: len(i.users))


def _downloaded(session: Session, name: str) -> SimModel:
    models = session.ctx.manager.models
    model = models.get(name) or next((m for m in models.values() if model_path(m) == name), None)
    if model is None:
        raise path_not_found(name, list(models))
    if domain(model) != session.namespace:
        raise domain_mismatch(model, session.namespace)
    return model


async def _await_load(session: Session, channel: Channel, load: Load, progress_type: str) -> Instance | None:
    """Wait for ``load``, reporting progress; None if the client cancelled or left meanwhile."""
    ctx = session.ctx
    abortable = ctx.settings.abort_load_on_disconnect

    async def report() -> None:
        for step in PROGRESS_STEPS:
            await ctx.clock.sleep_until(load.started_at + step * load.model.load_delay_s)
            if load.done.is_set():
                return
            await channel.send({"type": progress_type, "progress": step})

    instance: Instance | None = None
    failure: SimError | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(report)
        try:
            instance = await ctx.manager.wait(load, channel.signals, abortable=abortable)
        except SimError as error:
            failure = error  # raised outside the task group, which would wrap it in a group
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return instance


async def get_or_load(session: Session, channel: Channel, raw: Any) -> None:
    parameter = _parameter(raw)
    name = _string(parameter, "identifier")
    loaded = loaded_in(session)
    existing = [i for i in loaded if i.identifier == name] or [i for i in loaded if i.model.id == name]
    if existing:
        await channel.send({"type": "alreadyLoaded", "info": instance_info(min(existing, key=lambda i: len(i.users)))})
        return
    model = _downloaded(session, name)
    manager = session.ctx.manager
    before = list(manager.instances)
    load = manager.jit_load(model, ttl_s=_ttl_s(parameter.get("loadTtlMs")))
    for evicted in [i for i in before if i.unloaded]:
        await channel.send({"type": "unloadingOtherJITModel", "info": instance_info(evicted)})
    await channel.send({"type": "startLoading", "identifier": load.identifier, "info": model_info(model)})
    instance = await _await_load(session, channel, load, "loadProgress")
    if instance is not None:
        await channel.send({"type": "loadSuccess", "info": instance_info(instance)})


async def load_model(session: Session, channel: Channel, raw: Any) -> None:
    parameter = _parameter(raw)
    model = _downloaded(session, _string(parameter, "modelKey"))
    manager = session.ctx.manager
    identifier = parameter.get("identifier") if isinstance(parameter.get("identifier"), str) else None
    if identifier and manager.identifier_taken(identifier):
        raise SdkError(f'A model with the identifier "{identifier}" is already loaded.')
    context = config_fields(parameter.get("loadConfigStack")).get(f"{session.namespace}.load.contextLength")
    if context is not None and not (isinstance(context, int) and 0 < context <= model.max_context_length):
        raise SdkError(f"Invalid context length {context!r}: expected 1 to {model.max_context_length}.")
    await channel.send({"type": "resolved", "info": model_info(model)})
    load = manager.start_load(
        model, jit=False, ttl_s=_ttl_s(parameter.get("ttlMs")), context_length=context, identifier=identifier
    )
    instance = await _await_load(session, channel, load, "progress")
    if instance is not None:
        await channel.send({"type": "success", "info": instance_info(instance)})


async def unload_model(session: Session, raw: Any, signals: Signals) -> None:
    name = _string(_parameter(raw), "identifier")
    loaded = loaded_in(session)
    instance = next((i for i in loaded if i.identifier == name), None)
    if instance is None:
        raise identifier_not_found(name, [i.identifier for i in loaded])
    session.ctx.manager.unload(instance, reason="unload")


async def list_loaded(session: Session, raw: Any, signals: Signals) -> list[dict[str, Any]]:
    return [instance_info(i) for i in loaded_in(session)]


async def get_model_info(session: Session, raw: Any, signals: Signals) -> dict[str, Any] | None:
    parameter = _parameter(raw)
    try:
        return instance_info(find_instance(session, parameter.get("specifier")))
    except SdkError:
        if parameter.get("throwIfNotFound") is False:
            return None
        raise


async def get_load_config(session: Session, raw: Any, signals: Signals) -> dict[str, Any]:
    return load_config(find_instance(session, _parameter(raw).get("specifier")))


async def list_downloaded(session: Session, raw: Any, signals: Signals) -> list[dict[str, Any]]:
    return [model_info(m) for m in session.ctx.manager.models.values()]
