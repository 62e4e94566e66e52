"""Prometheus metrics at `GET /metrics` (with the API token), from prometheus-client.

Counters and histograms live in a registry of the app's own (no process-wide state): they
are fed by the prediction service's listeners, the webhook sender's observers and a request
middleware; queue depths and model states are read from the runners at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server import keys
from server.records import Prediction
from server.runner import Runner, RunnerState
from server.webhooks import WEBHOOKS, DeliveryReport

log = logging.getLogger("replicant.predictions")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _RunnerCollector(Collector):
    def __init__(self, runners: Callable[[], Iterable[Runner]]) -> None:
        self._runners = runners

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "replicant_queue_depth", "Predictions waiting for a model", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "replicant_model_ready", "1 when the model is loaded and serving", labels=["model"]
        )
        for runner in self._runners():
            depth.add_metric([runner.name], runner.queue_depth)
            ready.add_metric([runner.name], 1 if runner.state is RunnerState.READY else 0)
        yield depth
        yield ready


class Metrics:
    def __init__(self, runners: Callable[[], Iterable[Runner]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.predictions = Counter(
            "replicant_predictions",
            "Predictions that ended, by status",
            ["model", "status"],
            registry=r,
        )
        self.created = Counter(
            "replicant_predictions_submitted",
            "Predictions accepted by create",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "replicant_tokens_generated", "Output tokens generated", ["model"], registry=r
        )
        self.predict_time = Histogram(
            "replicant_predict_seconds",
            "Time a prediction ran on its model",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.total_time = Histogram(
            "replicant_prediction_total_seconds",
            "Time from create to end, queueing included",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "replicant_time_to_first_token_seconds",
            "Time to the first output token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.webhooks = Counter(
            "replicant_webhook_attempts", "Webhook requests, by outcome", ["outcome"], registry=r
        )
        self.requests = Histogram(
            "replicant_http_request_seconds",
            "HTTP requests, by route, method and status",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_RunnerCollector(runners))

    def on_prediction_event(self, prediction: Prediction, event: str) -> None:
        """A `PredictionService` listener: counts, and one log line per transition."""
        model = prediction.model
        if event == "created":
            self.created.labels(model).inc()
            log.info("prediction=%s model=%s status=starting", prediction.id, model)
        elif event == "start":
            log.info("prediction=%s model=%s status=processing", prediction.id, model)
        elif event == "completed":
            status = str(prediction.status)
            self.predictions.labels(model, status).inc()
            values = prediction.metrics
            if isinstance(values.get("output_token_count"), int):
                self.tokens.labels(model).inc(values["output_token_count"])
            for histogram, name in (
                (self.predict_time, "predict_time"),
                (self.total_time, "total_time"),
                (self.ttft, "time_to_first_token"),
            ):
                if isinstance(values.get(name), int | float):
                    histogram.labels(model).observe(values[name])
            log.info(
                "prediction=%s model=%s status=%s predict_time=%s error=%s",
                prediction.id,
                model,
                status,
                values.get("predict_time"),
                prediction.error is not None,
            )

    def on_webhook_attempt(self, report: DeliveryReport) -> None:
        """A `WebhookService` observer: every attempt, intermediate webhooks included."""
        attempt = report.result
        if attempt.succeeded:
            outcome = "delivered"
        elif attempt.status_code is not None:
            outcome = f"http_{attempt.status_code // 100}xx"
        else:
            outcome = "error"
        self.webhooks.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.requests.labels(name, request.method, str(status)).observe(
                time.perf_counter() - started
            )


async def get_metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    metrics = Metrics(lambda: app[keys.RUNNERS].values())
    app[METRICS] = metrics
    predictions = app[keys.PREDICTIONS]
    predictions.listeners.append(metrics.on_prediction_event)
    webhooks = app[WEBHOOKS]
    webhooks.observers.append(metrics.on_webhook_attempt)
    yield
    predictions.listeners.remove(metrics.on_prediction_event)
    webhooks.observers.remove(metrics.on_webhook_attempt)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", get_metrics)
