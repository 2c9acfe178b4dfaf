"""The doctor's report as text for a terminal, and its progress bar."""

from __future__ import annotations

from typing import IO, Any

from gateway.cli.doctor.report import Report

_KINDS = {
    "lmgate": "lmgate",
    "lm-studio": "LM Studio",
    "openai-compatible": "an OpenAI-compatible server",
    "unknown": "a server that speaks none of LM Studio's APIs",
}
_API_NAMES = {"api/v1": "/api/v1", "api/v0": "/api/v0", "v1": "OpenAI /v1"}
_MARKS = {"escalate": "ESCALATE", "warn": "warning", "ok": "ok", "info": "note"}


def render_text(report: Report) -> str:
    lines = [f"lmgate doctor: {report.server.url}", ""]
    _server(report, lines)
    _upstreams(report, lines)
    if report.cold is not None:
        cold = report.cold
        what = f"first token after {cold.first_token_s:.1f} s" if cold.first_token_s is not None else "no answer"
        if cold.load_s is not None:
            what += f" (of which {cold.load_s:.1f} s loading)"
        unloaded = f"unloaded {len(cold.unloaded)} instance(s), " if cold.unloaded else ""
        lines += [f"Cold load    {cold.model}: {unloaded}{what}" + (f"; {cold.note}" if cold.note else ""), ""]
    if report.tiny_prompt is not None:
        outcomes = ["ok" if a.ok else f"failed ({a.category})" for a in report.tiny_prompt.attempts]
        lines += [f"Tiny prompt  {', then '.join(outcomes)}", ""]
    if report.generations is not None:
        _generations(report.generations.summary(), lines)
    if report.heartbeat is not None:
        lines += [f"Heartbeat    {report.heartbeat.verdict}: {report.heartbeat.note}", ""]
    lines.append("Advice")
    lines += [f"  {_MARKS[a.level]:<9}{a.text}" for a in report.advice]
    if report.environment:
        lines += ["", "Environment  " + "  ".join(f"{k}={v}" for k, v in report.environment.items())]
    return "\n".join(lines) + "\n"


def _server(report: Report, lines: list[str]) -> None:
    server = report.server
    if not server.reachable:
        lines += [f"Server       not reachable: {server.error}", ""]
        return
    lines.append(f"Server       {_KINDS[server.kind]}, answered in {server.latency_ms} ms")
    lines.append("APIs         " + " · ".join(f"{_API_NAMES[k]} {'yes' if v else 'no'}" for k, v in server.apis.items()))
    if server.error:
        lines.append(f"             {server.error}")
    lines.append("")
    if report.models:
        width = max(len(m.id) for m in report.models) + 2
        lines.append(f"Models       {'MODEL':<{width}}{'STATE':<12}CONTEXT (loaded / max)")
        for m in report.models:
            context = f"{m.context_length or '–'} / {m.max_context_length or '–'}"
            lines.append(f"             {m.id:<{width}}{m.state:<12}{context}")
        lines.append("")


def _upstreams(report: Report, lines: list[str]) -> None:
    if not report.upstreams:
        return
    width = max(len(u.name) for u in report.upstreams) + 2
    for seen_by, title in (("lmgate", "as lmgate sees them"), ("direct", "asked directly (--config)")):
        checks = [u for u in report.upstreams if u.seen_by == seen_by]
        if not checks:
            continue
        lines.append(f"Upstreams    {title}")
        for u in checks:
            if not u.reachable:
                state = f"not reachable: {u.error or 'no answer'}"
            elif seen_by == "lmgate":
                parts = [f"{len(u.loaded)} loaded" + (f" ({', '.join(u.loaded)})" if u.loaded else "")]
                if u.slots:
                    parts.append(f"{u.slots.get('in_flight', 0)}/{u.slots.get('limit', 0)} slots in use")
                if u.circuit:
                    parts.append(f"circuit {u.circuit}")
                state = "reachable, " + ", ".join(parts)
            else:
                state = f"{_KINDS.get(u.kind or 'unknown', u.kind)}, answered in {u.latency_ms} ms, {u.models} model(s), " \
                        f"{len(u.loaded)} loaded"
            lines.append(f"             {u.name:<{width}}{u.url}  {state}")
    lines.append("")


def _generations(summary: dict[str, Any], lines: list[str]) -> None:
    lines.append(f"Generations  {summary['requests']} x {summary['model']}, {summary['concurrency']} at a time")
    lines.append(f"  succeeded    {summary['succeeded']} / {summary['requests']}")
    lines.append(f"  failed       {summary['failed']}")
    for category, count in summary["failed_by_category"].items():
        lines.append(f"    {category:<20}{count}")
    lines.append(f"  disconnects  {summary['disconnects']}")
    lines.append(f"  {'':<16}{'p50':>8}{'p95':>8}{'p99':>8}")
    for label, key in (("first token ms", "ttft_ms"), ("latency ms", "latency_ms")):
        values = summary[key]
        cells = "".join(f"{values[p]:>8}" for p in ("p50", "p95", "p99")) if values else f"{'–':>8}" * 3
        lines.append(f"  {label:<16}{cells}")
    rates = summary["tokens_per_s"]
    lines.append(f"  tokens/s       median {rates['median']}, slowest {rates['min']}" if rates else "  tokens/s       –")
    for error in summary["errors"]:
        lines.append(f"  e.g. {error}")
    lines.append("")


class ProgressBar:
    """``[#####.....] 5/10, 1 failed`` redrawn in place on a terminal's stderr."""

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def __call__(self, done: int, total: int, failed: int) -> None:
        filled = round(self.width * done / total) if total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= total else ""
        self.stream.write(f"\r[{bar}] {done}/{total}" + (f", {failed} failed" if failed else "") + end)
        self.stream.flush()
