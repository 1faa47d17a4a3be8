"""GET /metrics: Prometheus text through prometheus_client.

vLLM's names for what a request sees (TTFT, inter-token latency, end-to-end latency, queue
time, running / waiting requests, prompt / generation tokens), so dashboards made for vLLM
work; and ours: every collective's seconds, calls and bytes per (phase, op, site), the engine
steps, the per-step plan broadcast's bytes and seconds, the host time per step outside the
model, and the prompt tokens served from a slot's cache.

The metrics live as long as the HTTP server, across group generations (serve over tp-workers):
the request histograms and counters go on; the engine's and the collectives' counters are read
from the current generation's loop and communicator (they start again from zero after a
re-form, which Prometheus' rate() takes as a counter reset). Re-forms: how many, the seconds
from a lost worker to serving again, and the group's size now.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Read at scrape time from the loop's and the communicator's own counters."""

    def __init__(self, state) -> None:
        self.state = state  # api.ServeState: the current generation's leader and llm

    def collect(self):
        tp = GaugeMetricFamily("tp_runtime:tensor_parallel_size", "Ranks in the serving group now (fewer after a lost worker)")
        tp.add_metric([], self.state.tp)
        yield tp
        leader, llm = self.state.leader, self.state.llm
        if leader is None or llm is None:
            return
        st = leader.stats
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch")
        running.add_metric([], st.running)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for a place in the batch")
        waiting.add_metric([], st.waiting)
        yield running
        yield waiting
        for name, doc, value in (
            ("tp_runtime:engine_steps", "Engine steps run", st.steps),
            ("tp_runtime:schedule_bytes", "Bytes of the per-step plan broadcast", st.plan_bytes),
            ("tp_runtime:schedule_seconds", "Seconds spent scheduling and broadcasting step plans", st.plan_seconds),
            ("tp_runtime:step_host_seconds", "Seconds per step outside the model (taking requests, schedule, broadcast, hand-out), summed", st.host_seconds),
            ("tp_runtime:prefix_reused_tokens", "Prompt tokens whose K/V came from a slot's cache", leader.scheduler.reused_tokens),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        labels = ["phase", "op", "site"]
        seconds = CounterMetricFamily("tp_runtime:collective_seconds", "Seconds in each collective (measured + injected)", labels=labels)
        calls = CounterMetricFamily("tp_runtime:collective_calls", "Calls of each collective", labels=labels)
        nbytes = CounterMetricFamily("tp_runtime:collective_bytes", "Bytes each collective moved", labels=labels)
        for key, s in list(llm.comm.stats.by_key.items()):
            seconds.add_metric(list(key), s.seconds)
            calls.add_metric(list(key), s.count)
            nbytes.add_metric(list(key), s.bytes)
        yield seconds
        yield calls
        yield nbytes


class ServeMetrics:
    def __init__(self, state, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a request", labels, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token", labels, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to admission into the batch", labels, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests", labels, registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", labels, registry=self.registry)
        self.success = Counter("vllm:request_success", "Finished requests by reason", labels + ["finished_reason"], registry=self.registry)
        self.reforms = Counter("tp_runtime:group_reforms", "Times the serving group was formed again (a lost worker, a rejoin)",
                               ["reason"], registry=self.registry)
        self.reform_seconds = Histogram("tp_runtime:loss_to_serving_seconds", "Seconds from a lost worker noticed to serving again",
                                        registry=self.registry, buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300))
        self.last_reform_seconds = Gauge("tp_runtime:last_loss_to_serving_seconds", "The last re-form's seconds from a lost worker noticed to serving again",
                                         registry=self.registry)
        self.registry.register(_EngineCollector(state))
