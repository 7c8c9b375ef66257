"""The Prometheus client of the control loop, and every PromQL query of the project.

The local runtime (its own Prometheus) and the Kubernetes operator (``prometheusUrl``) both
call :class:`Prometheus`; neither writes PromQL. Every failure is a :class:`MetricsError`
whose message says what failed (unreachable, timeout, HTTP error, bad query, no data), so
it can be shown as it is in a status condition or on the runtime's output.

Series and labels are those of the shared metrics contract: every scraped target carries
``deployment`` and ``component`` (router|expert|gateway), Triton servers also ``slot`` and
``version``; the router counts ``autoglm_expert_tokens_total{expert}`` and the time of its
calls carrying each expert's rows (``autoglm_expert_call_seconds_total{expert}``), and its
engine's load (``autoglm_kv_cache_used_tokens``/``_capacity_tokens``,
``autoglm_generate_waiting``, the ``autoglm_time_to_first_token_seconds`` histogram).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as TimeoutError_
from urllib3.util.retry import Retry

from autoglm.autoscale import Sample
from autoglm.router_scale import RouterSample


class MetricsError(RuntimeError):
    """Prometheus could not answer the question; the message says why."""


def label_selector(labels: Mapping[str, str]) -> str:
    """``{k="v",...}`` with PromQL string escaping (sorted: queries are stable)."""
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{esc(str(v))}"' for k, v in sorted(labels.items())) + "}"


# -- the queries ------------------------------------------------------------------------------

def tokens_query(labels: Mapping[str, str], window_seconds: float) -> str:
    """Routed tokens/s per expert (label ``expert``), summed over the slot's routers."""
    return (f"sum by (expert) (rate(autoglm_expert_tokens_total{label_selector(labels)}"
            f"[{_window(window_seconds)}]))")


def tokens_newest_query(labels: Mapping[str, str]) -> str:
    """Epoch seconds of the newest scraped sample of the router's token counters."""
    return f"max(timestamp(autoglm_expert_tokens_total{label_selector(labels)}))"


def queue_query(labels: Mapping[str, str], window_seconds: float) -> str:
    """Mean time (ms) of the routers' calls that carried an expert's rows, per expert (label
    ``expert``): its servers' queue and compute as the router sees them (a server holds
    several experts in one Triton model, so Triton's own queue time is per server, not per
    expert); no calls in the window: no value (NaN)."""
    s, w = label_selector(labels), _window(window_seconds)
    return (f"sum by (expert) (rate(autoglm_expert_call_seconds_total{s}[{w}])) / "
            f"sum by (expert) (rate(autoglm_expert_calls_total{s}[{w}])) * 1000")


def router_pods_query(labels: Mapping[str, str]) -> str:
    """Router pods reporting their KV cache (one series each)."""
    return f"count(autoglm_kv_cache_capacity_tokens{label_selector(labels)})"


def router_newest_query(labels: Mapping[str, str]) -> str:
    """Epoch seconds of the newest scraped sample of the routers' KV cache gauges."""
    return f"max(timestamp(autoglm_kv_cache_capacity_tokens{label_selector(labels)}))"


def kv_utilization_query(labels: Mapping[str, str]) -> str:
    """KV cache in use / capacity, over the routers (each reserves for its sequences)."""
    s = label_selector(labels)
    return (f"sum(autoglm_kv_cache_used_tokens{s}) / "
            f"sum(autoglm_kv_cache_capacity_tokens{s})")


def waiting_query(labels: Mapping[str, str]) -> str:
    """Sequences waiting for KV cache, per router."""
    return f"avg(autoglm_generate_waiting{label_selector(labels)})"


def ttft_p90_query(labels: Mapping[str, str], window_seconds: float) -> str:
    """The 90th percentile of the time to first token over the window, across the routers
    (NaN when no generation started in it)."""
    return ("histogram_quantile(0.9, sum by (le) (rate(autoglm_time_to_first_token_seconds_"
            f"bucket{label_selector(labels)}[{_window(window_seconds)}])))")


def ttft_series_query(labels: Mapping[str, str]) -> str:
    """The routers' TTFT histograms (their count series), to tell none from an idle one."""
    return f"count(autoglm_time_to_first_token_seconds_count{label_selector(labels)})"


def _window(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def slot_labels(base: Mapping[str, str], component: str, slot: str) -> dict[str, str]:
    return {**base, "component": component, "slot": slot}


class Prometheus:
    """A Prometheus HTTP API at ``url``; each query gives up after ``timeout`` seconds and is
    not retried (the control loop asks again next interval)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # no retry: the control loop asks again next interval; requests takes float seconds
        self._conn = PrometheusConnect(self.url, retry=Retry(total=0),
                                       timeout=timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector; :class:`MetricsError` on any failure."""
        try:
            return list(self._conn.custom_query(promql))
        except (requests.Timeout, requests.ConnectionError) as e:
            # with no retry, urllib3 wraps the cause in MaxRetryError
            cause = getattr(e.args[0] if e.args else None, "reason", e)
            if isinstance(e, requests.Timeout) or (isinstance(cause, TimeoutError_) and not
                                                   isinstance(cause, NewConnectionError)):
                raise MetricsError(f"Prometheus at {self.url} did not answer within "
                                   f"{self.timeout:g} s") from None
            raise MetricsError(f"Prometheus at {self.url} is unreachable: "
                               f"{_root_cause(e)}") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as e:
            raise MetricsError(f"bad Prometheus URL {self.url!r}: {e}") from None
        except requests.RequestException as e:
            raise MetricsError(f"Prometheus at {self.url}: {e}") from None
        except PrometheusApiClientException as e:
            raise MetricsError(self._http_error(str(e), promql)) from None
        except (ValueError, KeyError, TypeError) as e:  # 200 but not the API's JSON
            raise MetricsError(f"{self.url} did not answer as a Prometheus API: "
                               f"{type(e).__name__}: {e}") from None

    def _http_error(self, message: str, promql: str) -> str:
        # The library says 'HTTP Status Code <code> (<body bytes repr>)'.
        m = re.fullmatch(r"HTTP Status Code (\d+) \((.*)\)", message, re.DOTALL)
        if not m:
            return f"Prometheus at {self.url}: {message}"
        code, body = int(m.group(1)), m.group(2)
        detail = body
        try:
            raw = ast.literal_eval(body)
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            detail = text.strip()
            doc = json.loads(text)
            if isinstance(doc, dict) and doc.get("error"):
                detail = str(doc["error"])
                if doc.get("errorType") == "bad_data":
                    return f"bad query {promql!r}: {detail}"
        except (ValueError, SyntaxError):
            pass
        return f"HTTP {code} from Prometheus at {self.url}: {detail[:300]}"

    def vector(self, promql: str, by: str) -> dict[str, tuple[float, float]]:
        """Label ``by`` → (timestamp, value) of each series of an instant query."""
        out: dict[str, tuple[float, float]] = {}
        for series in self.query(promql):
            key = series.get("metric", {}).get(by)
            if key is not None:
                ts, value = series["value"]
                out[str(key)] = (float(ts), float(value))
        return out

    def scalar(self, promql: str) -> float | None:
        res = self.query(promql)
        return float(res[0]["value"][1]) if res else None

    def expert_sample(self, selector: Mapping[str, str], slot: str, num_experts: int,
                      window_seconds: float) -> Sample:
        """The autoscaler's input for one slot of a deployment: routed tokens/s per expert
        (None for an expert without data), queue ms per expert (None: no request in the
        window), and ``at``: when the newest token counter sample was scraped.

        ``selector``: the deployment's base labels, ``namespace`` and ``deployment``."""
        router = slot_labels(selector, "router", slot)
        newest = self.scalar(tokens_newest_query(router))
        if newest is None:
            raise MetricsError(f"no data: Prometheus at {self.url} has no "
                               f"autoglm_expert_tokens_total{label_selector(router)} "
                               "(is the router scraped?)")
        tokens = self.vector(tokens_query(router, window_seconds), "expert")
        queue = self.vector(queue_query(router, window_seconds), "expert")

        def value(v: tuple[float, float] | None) -> float | None:
            return None if v is None or math.isnan(v[1]) else v[1]

        return Sample(
            at=newest,
            tokens_per_s=tuple(value(tokens.get(str(i))) for i in range(num_experts)),
            queue_ms=tuple(value(queue.get(str(i))) for i in range(num_experts)))

    def router_sample(self, selector: Mapping[str, str], slot: str, window_seconds: float,
                      waiting: bool = False, ttft: bool = False) -> RouterSample:
        """The router autoscaler's input for one slot of a deployment: the routers' KV cache
        use, and if asked their waiting sequences per pod and TTFT p90 (None where a series
        is missing; TTFT 0 when no generation started in the window), ``pods`` reporting,
        and ``at``: when the newest KV cache sample was scraped.

        ``selector``: the deployment's base labels, ``namespace`` and ``deployment``."""
        router = slot_labels(selector, "router", slot)
        newest = self.scalar(router_newest_query(router))
        if newest is None:
            raise MetricsError(f"no data: Prometheus at {self.url} has no "
                               f"autoglm_kv_cache_capacity_tokens{label_selector(router)} "
                               "(is the router scraped?)")

        def value(promql: str) -> float | None:
            v = self.scalar(promql)
            return v if v is not None and math.isfinite(v) else None

        p90: float | None = None
        if ttft and self.scalar(ttft_series_query(router)):
            p90 = value(ttft_p90_query(router, window_seconds)) or 0.0
        return RouterSample(
            at=newest, pods=round(self.scalar(router_pods_query(router)) or 0),
            kv_cache_utilization=value(kv_utilization_query(router)),
            waiting_per_replica=value(waiting_query(router)) if waiting else None,
            ttft_p90_seconds=p90)

    def gateway_inflight(self, selector: Mapping[str, str], slot: str,
                         since: float) -> int | None:
        """In-flight requests on ``slot`` summed over the gateways, if every gateway's
        newest sample was scraped after ``since`` (epoch seconds); else None: unknown."""
        s = label_selector({**selector, "component": "gateway", "slot": slot})
        oldest = self.scalar(f"min(timestamp(autoglm_gateway_inflight{s}))")
        if oldest is None or oldest <= since:
            return None
        total = self.scalar(f"sum(autoglm_gateway_inflight{s})")
        return None if total is None else round(total)


def _root_cause(e: BaseException) -> str:
    """The OS reason inside a requests/urllib3 error (e.g. 'Connection refused')."""
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
    return m.group(1).strip() if m else str(e)
