"""GET /metrics: the server's counters in Prometheus' text format (version 0.0.4).

Imports the standard library only.
"""

from __future__ import annotations


def _histogram(lines: list, name: str, help_text: str, hist) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for bound, count in hist.cumulative():
        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
    lines += [f"{name}_sum {hist.sum:.6f}", f"{name}_count {hist.count}"]


def render(app) -> str:
    s = app.scheduler
    lines = ["# HELP nn2_requests_total Requests answered, by HTTP status.",
             "# TYPE nn2_requests_total counter"]
    for status, count in sorted(dict(app.by_status).items()):
        lines.append(f'nn2_requests_total{{status="{status}"}} {count}')
    lines += ["# HELP nn2_rows_running Rows (choices) in the batch now.", "# TYPE nn2_rows_running gauge",
              f"nn2_rows_running {s.running}",
              "# HELP nn2_rows_queued Rows waiting for a place in the batch.", "# TYPE nn2_rows_queued gauge",
              f"nn2_rows_queued {s.queued}",
              "# HELP nn2_tokens_generated_total Tokens (characters) sampled.",
              "# TYPE nn2_tokens_generated_total counter", f"nn2_tokens_generated_total {s.tokens}",
              "# HELP nn2_vm_steps_total VM steps run.", "# TYPE nn2_vm_steps_total counter",
              f"nn2_vm_steps_total {s.steps}",
              "# HELP nn2_draining 1 while the server drains before exit.", "# TYPE nn2_draining gauge",
              f"nn2_draining {int(app.draining)}"]
    _histogram(lines, "nn2_rows_per_step", "Live rows in each VM step.", s.rows_per_step)
    _histogram(lines, "nn2_time_to_first_token_seconds", "From arrival to the first sampled token.", s.ttft)
    return "\n".join(lines) + "\n"
