"""Advice from what the doctor saw, and the troubleshooting guide's "When to Escalate" thresholds.

Escalate (the command exits 1) when:

* more than 5% of the generations failed (with the doctor's default 90 s timeout, the guide's "after
  raising timeout to 90s");
* a tiny prompt failed on the first attempt and again on the second ("consistent failures on first
  attempt even with tiny prompts");
* a context overflow happened: on prompts this short it means the model's context is misconfigured
  ("memory or context overflow repeatedly");
* nothing answers, or there is no model to test.

Everything else it noticed (disconnects, overload, a stream left silent longer than the heartbeat,
slow cold loads, one of several upstreams down or its circuit open) is a warning with the setting
to change.
"""

from __future__ import annotations

from typing import Any

from gateway.cli.doctor.report import Advice, Attempt, Generations, HeartbeatCheck, Report

THRESHOLD = 0.05
SLOW_COLD_LOAD_S = 30.0


def judge_heartbeat(heartbeat_s: float | None, attempts: list[Attempt], source: str) -> HeartbeatCheck:
    """Did the streams survive their silences? A silence longer than 1.5 heartbeats fails."""
    longest = max((a.longest_silence_s for a in attempts), default=0.0)
    seen = sum(a.heartbeats for a in attempts)

    def check(verdict: str, note: str) -> HeartbeatCheck:
        return HeartbeatCheck(verdict, heartbeat_s, round(longest, 2), seen, source, note)

    if heartbeat_s is None:
        return check("untested", f"heartbeats are off; the longest silence was {longest:.1f} s")
    if longest > heartbeat_s * 1.5:
        return check(
            "fail",
            f"a stream was silent for {longest:.1f} s, longer than the {heartbeat_s:g} s heartbeat: a proxy or client "
            f"whose idle timeout is under {longest:.0f} s cuts it",
        )
    if seen:
        return check("ok", f"silences were filled by {seen} heartbeat(s); never more than {longest:.1f} s without a byte")
    hint = "" if source.startswith("the cold load") else "; --cold MODEL tests one through a model load"
    return check("untested", f"no silence as long as {heartbeat_s:g} s in {source} (the longest was {longest:.1f} s){hint}")


class _Advice(list[Advice]):
    def escalate(self, text: str) -> None:
        self.append(Advice("escalate", text))

    def warn(self, text: str) -> None:
        self.append(Advice("warn", text))


def advise(report: Report, *, url: str) -> list[Advice]:
    advice = _Advice()
    _upstreams(report, advice)
    if not report.server.reachable:
        advice.escalate(f"Nothing answers at {url}: start LM Studio's server (Developer tab, or `lms server start`) "
                        "or check --url.")
        return advice
    generations = report.generations
    if generations is None:
        advice.escalate("The server lists no model to generate with: load one in LM Studio, or name one with --model.")
        return advice
    _thresholds(report, generations, advice)
    _warnings(report, generations.summary(), advice)
    if any(a.level == "escalate" for a in advice):
        advice.append(Advice("info", "Collect for a report: the environment variables, the model name, prompt lengths, "
                                     "the failure log lines (gen_error) and LM Studio's server version."))
    else:
        advice.insert(0, Advice("ok", "No escalation threshold crossed: under 5% failed, a tiny prompt answered at the "
                                      "first attempt, no context overflow."))
    return advice


def _upstreams(report: Report, advice: _Advice) -> None:
    """An upstream down is a warning: lmgate routes around it, but what only it has is unavailable."""
    for check in report.upstreams:
        if not check.reachable:
            who = "lmgate cannot reach" if check.seen_by == "lmgate" else "From here, nothing answers at"
            advice.warn(f"{who} upstream {check.name} ({check.url}): {check.error or 'no answer'}. Requests go to "
                        "the other upstreams; models only it has fail until it answers again.")
        elif check.circuit == "open":
            advice.warn(f"lmgate's circuit for upstream {check.name} is open: it failed repeatedly, and lmgate sends "
                        "its requests elsewhere until a probe succeeds.")


def _thresholds(report: Report, generations: Generations, advice: _Advice) -> None:
    summary = generations.summary()
    failed, total, categories = summary["failed"], summary["requests"], summary["failed_by_category"]
    ratio = generations.failure_ratio
    if ratio > THRESHOLD:
        advice.escalate(f"{failed} of {total} generations failed ({ratio:.0%}), over the 5% threshold. " + (
            "Timeouts among them: raise LLM_REQUEST_TIMEOUT_MS to 90000 (here: --timeout-s 90) and re-run; if still "
            "over 5% fail, inspect LM Studio's server logs for model-level errors."
            if "timeout" in categories else "Inspect LM Studio's server logs for model-level errors (memory, crashes)."
        ))
    elif failed:
        advice.warn(f"{failed} of {total} generations failed ({ratio:.0%}), under the 5% threshold; re-run with -n 50 "
                    "to be sure.")
    tiny = report.tiny_prompt
    if tiny is not None and tiny.consistent_failure:
        last = tiny.attempts[-1]
        advice.escalate("A tiny prompt failed at the first attempt and again at the second: the server or the model "
                        f"is broken, not the prompts ({last.category}: {last.message}).")
    elif tiny is not None and tiny.first_failed:
        advice.warn("A tiny prompt failed at the first attempt and worked at the second, as when a model is still "
                    "loading: preload it (lmgate's models.preload) or give the first request more time.")
    overflows = sum(a.category == "context_overflow" for a in [*generations.attempts, *(tiny.attempts if tiny else [])])
    if overflows:
        advice.escalate(f"{overflows} context overflow(s) on prompts of a few tokens: the model is loaded with too "
                        "small a context; load it with a larger context length (LM Studio's load settings, "
                        "`lms load --context-length`).")


def _warnings(report: Report, summary: dict[str, Any], advice: _Advice) -> None:
    categories = summary["failed_by_category"]
    if summary["disconnects"]:
        advice.warn(f"{summary['disconnects']} disconnect(s): a stream ended before its answer. Check the client's "
                    "and any proxy's timeouts (NGINX: proxy_read_timeout 300s); lmgate's heartbeats keep a silent "
                    "stream open.")
    if "overloaded" in categories or "circuit_open" in categories:
        advice.warn("Requests were refused to protect the server (overloaded, circuit open): lower EVAL_CONCURRENCY "
                    "or --concurrency, or raise lmgate's concurrency.max_queue.")
    if "auth" in categories:
        advice.warn("The server refused the key: put it in the variable named by --api-key-env.")
    heartbeat = report.heartbeat
    if heartbeat is not None and heartbeat.verdict == "fail":
        fix = ("lower models.heartbeat_s below your proxy's idle timeout" if report.server.kind == "lmgate"
               else "put lmgate in front (it sends heartbeats) or raise the proxy's and client's idle timeouts")
        advice.warn(f"Heartbeat: {heartbeat.note}; {fix}.")
    cold = report.cold
    if cold is not None and not cold.ok:
        advice.warn(f"Cold load of {cold.model}: {cold.note}.")
    elif cold is not None and cold.first_token_s is not None and cold.first_token_s > SLOW_COLD_LOAD_S:
        advice.warn(f"A cold start of {cold.model} takes {cold.first_token_s:.0f} s: list it in lmgate's "
                    "models.preload or models.keep_warm so no user waits for it.")
